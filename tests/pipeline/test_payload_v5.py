"""Payload format version 5: version 4's layout with the embedding at 4 bits per value and the 64 bytes saved
spent on a finer face thumbnail (kind 2, ``pipeline.thumbnail``); what new runs write where the capacity holds it."""
from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pytest

from test_payload import DS, MASTER, SHARD, _ctx, _key
from test_payload_v3 import _passes_rs_check, _spec_mask

from pipeline.payload import (
    FORMAT_VERSION,
    THUMBNAIL_FORMS,
    PayloadError,
    PayloadLayout,
    decode,
    encode,
    minimum_capacity_bits,
    quantize,
    writing_version,
)


def _emb(seed=0, dim=128, scale=0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(dim) * scale).astype(np.float32)


def _thumb(seed=0, size=143) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def test_version_5_is_written_and_has_version_4s_length_for_a_128_d_embedding():
    assert FORMAT_VERSION == 5 and THUMBNAIL_FORMS[5] == (2, 143)
    # K = 6 + 64 (128 values, 4 bits) + 1 + 143 + 16 = 230, as version 4: same codewords, same error correction
    assert minimum_capacity_bits(128, 5) == minimum_capacity_bits(128, 4) == 2352
    v4, v5 = PayloadLayout(3240, 128, 4), PayloadLayout(3240, 128, 5)
    assert (v5.codewords, v5.stream_bytes, v5.plaintext_bytes) == (v4.codewords, v4.stream_bytes, v4.plaintext_bytes)
    assert writing_version(3240, 128) == 5 and PayloadLayout(3240, 128).format_version == 5
    # a 512-d embedding is 256 bytes shorter than in version 4
    assert PayloadLayout(16384, 512, 5).plaintext_bytes == PayloadLayout(16384, 512, 4).plaintext_bytes - 256 + 64
    # tiny embeddings are longer in version 5 (the thumbnail): a capacity that holds only version 4 writes 4
    assert writing_version(minimum_capacity_bits(8, 4), 8) == 4 < writing_version(minimum_capacity_bits(8, 5), 8)


def test_int4_embedding_values_and_their_error_bound():
    for seed, dim in ((0, 128), (1, 127), (2, 1), (3, 512)):
        e = _emb(seed, dim)
        q = quantize(e, 5)
        scale = float(np.max(np.abs(q)) / 7) if np.any(q) else 0.0
        assert np.max(np.abs(q - e)) <= np.max(np.abs(e)) / 14 * (1 + 2**-9) + 2**-25
        assert len(np.unique(np.round(q / scale))) <= 15 if scale else True
    assert np.array_equal(quantize(np.zeros(16, np.float32), 5), np.zeros(16, np.float32))


def test_round_trip_returns_the_int4_embedding_and_the_thumbnail_and_hides_them_from_repr():
    for cap, dim in ((3240, 128), (16384, 512), (2352, 128), (4096, 127)):
        lay, key, ctx, e, t = PayloadLayout(cap, dim, 5), _key(), _ctx(), _emb(3, dim), _thumb(1)
        res = decode(encode(e, ctx, key, lay, t), ctx, key, lay)
        assert res.ok and np.array_equal(res.embedding, quantize(e, 5)) and res.thumbnail == t
        assert res.thumbnail_kind == 2 and t.hex() not in repr(res)


def test_the_kind_2_thumbnail_is_required_with_its_length():
    lay = PayloadLayout(3240, 128, 5)
    with pytest.raises(PayloadError, match="143-byte face thumbnail of kind 2; got NoneType"):
        encode(_emb(), _ctx(), _key(), lay)
    with pytest.raises(PayloadError, match="143-byte face thumbnail of kind 2; got 79"):
        encode(_emb(), _ctx(), _key(), lay, _thumb(size=79))


def test_version_5_bits_open_from_schemas_payload_md_alone():
    """Unmasked with the documented mask: valid RS codewords whose data opens under the version 5 aad to the
    documented plaintext: header (5, 3, 128), float16 scale, 64 bytes of nibbles q + 8 (high nibble first),
    the thumbnail kind byte 2 and its 143 bytes."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def hkdf(ikm, info):
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)

    def lp(s):
        return len(s.encode()).to_bytes(4, "big") + s.encode()

    layout, ctx, e, t = PayloadLayout(3240, 128, 5), _ctx(), _emb(20), _thumb(5)
    unmasked = encode(e, ctx, _key(), layout, t) ^ _spec_mask(ctx, layout)
    assert all(_passes_rs_check(unmasked, layout))
    stream = np.packbits(unmasked[: 8 * 405])
    ct = bytes(stream[0::2][:115]) + bytes(stream[1::2][:115])
    shard_key = hkdf(MASTER, b"g2face-pipe/v1/shard-key" + lp(DS) + lp(SHARD))
    nonce = hmac.new(hkdf(shard_key, b"g2face-pipe/v1/shard-subkey/payload/v1/nonce"),
                     (7).to_bytes(8, "big") + lp("img_0001") + (0).to_bytes(4, "big"), "sha256").digest()[:12]
    aad = (b"g2face-pipe/payload" + bytes([5]) + (3240).to_bytes(4, "big") + (128).to_bytes(2, "big")
           + lp(DS) + lp(SHARD) + lp("img_0001") + (0).to_bytes(4, "big") + lp("g2face-hide-v1"))
    plaintext = AESGCMSIV(hkdf(shard_key, b"g2face-pipe/v1/shard-subkey/payload/v1/aead")).decrypt(nonce, ct, aad)
    assert len(plaintext) == 214 and plaintext[:4] == bytes([5, 3]) + (128).to_bytes(2, "big")
    scale = float(np.frombuffer(plaintext[4:6], "<f2")[0])
    # float16(max|x| / 7), raised one float16 step at a time while some |x| / scale exceeds 7.5
    peak = float(np.max(np.abs(e.astype(np.float64))))
    expected = np.float16(peak / 7)
    while float(expected) * 7.5 < peak:
        expected = np.nextafter(expected, np.float16(np.inf))
    assert scale == float(expected)
    nibbles = np.stack([np.frombuffer(plaintext[6:70], np.uint8) >> 4, np.frombuffer(plaintext[6:70], np.uint8) & 15], 1)
    q = nibbles.ravel().astype(np.int64) - 8
    assert np.array_equal(q, np.clip(np.rint(e.astype(np.float64) / scale), -7, 7))
    assert np.array_equal(q.astype(np.float32) * np.float32(scale), quantize(e, 5))
    assert plaintext[70] == 2 and plaintext[71:] == t


def test_format_5_known_answer():
    # pins format version 5: any change to the bytes written needs a new FORMAT_VERSION and a spec update
    e = (np.arange(128, dtype=np.float32) - 64) / 32
    bits = encode(e, _ctx(), _key(), PayloadLayout(3240, 128, 5), bytes(range(143)))
    assert hashlib.sha256(np.packbits(bits).tobytes()).hexdigest() == KNOWN_ANSWER_SHA256


KNOWN_ANSWER_SHA256 = "ae605829e8467354726350bef9a43141343d07de849612c9f550d3cbf502a77a"


def test_versions_do_not_open_each_other():
    key, ctx, e = _key(), _ctx(), _emb(4)
    v4, v5 = PayloadLayout(3240, 128, 4), PayloadLayout(3240, 128, 5)
    assert not decode(encode(e, ctx, key, v5, _thumb(1)), ctx, key, v4).ok  # the aad names the version
    assert not decode(encode(e, ctx, key, v4, _thumb(1, 79)), ctx, key, v5).ok


def test_an_authenticated_plaintext_with_a_bad_nibble_is_a_format_error(monkeypatch):
    """A nibble 0 (no value) or a non-zero padding nibble can only come from another writer: refused, never read."""
    import pipeline.payload as payload

    good = payload._pack_int4
    layout, key, ctx = PayloadLayout(4096, 127, 5), _key(), _ctx()
    for bad in (lambda q: b"\x08" + good(q)[1:],  # first value's nibble 0
                lambda q: good(q)[:-1] + bytes([good(q)[-1] | 1])):  # padding nibble set
        monkeypatch.setattr(payload, "_pack_int4", bad)
        bits = encode(_emb(6, 127), ctx, key, layout, _thumb(2))
        monkeypatch.setattr(payload, "_pack_int4", good)
        with pytest.raises(PayloadError, match="int4 value outside|padding nibble"):
            decode(bits, ctx, key, layout)
