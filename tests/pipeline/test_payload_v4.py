"""Payload format version 4: version 3 with the original face's thumbnail (``pipeline.thumbnail``) in the
plaintext after the embedding; what new runs write where the model's capacity holds it (lite-128 does)."""
from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pytest
import reedsolo

from test_payload import DS, MASTER, SHARD, _ctx, _key
from test_payload_v3 import _passes_rs_check, _spec_mask

from pipeline.payload import (
    FORMAT_VERSION,
    THUMBNAIL_BYTES,
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


def _thumb(seed=0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, THUMBNAIL_BYTES, dtype=np.uint8).tobytes()


def test_version_4_layouts_and_what_new_runs_write():
    assert FORMAT_VERSION == 5 and THUMBNAIL_BYTES == 79
    assert minimum_capacity_bits(128, 4) == 2352  # K = 6 + 128 + 1 + 79 + 16 = 230: two codewords of 115 + 32
    # version 5 has the same length for a 128-d embedding, so new runs write it wherever version 4 fitted
    assert writing_version(3240, 128) == 5 and writing_version(16384, 512) == 5
    assert writing_version(2351, 128) == 3 and writing_version(1620, 128) == 3  # small hiding models keep version 3
    d = PayloadLayout(3240, 128, 4).describe()
    assert d["format_version"] == 4 and d["ciphertext_bytes"] == 230 and d["rs_codewords"] == [[203, 115], [202, 115]]
    # the thumbnail costs parity: lite-128 now survives ~1.8% random bit errors (3.0% in version 3)
    assert 0.015 < d["random_ber_limit_1e-3"] < PayloadLayout(3240, 128, 3).random_ber_limit()


def test_round_trip_returns_the_embedding_and_the_thumbnail_and_hides_them_from_repr():
    for cap, dim in ((3240, 128), (16384, 512), (2352, 128)):
        lay, key, ctx, e, t = PayloadLayout(cap, dim, 4), _key(), _ctx(), _emb(3, dim), _thumb(1)
        res = decode(encode(e, ctx, key, lay, t), ctx, key, lay)
        assert res.ok and np.array_equal(res.embedding, quantize(e, 4)) and res.thumbnail == t
        assert t.hex() not in repr(res)
    lay3 = PayloadLayout(3240, 128, 3)
    assert decode(encode(_emb(), _ctx(), _key(), lay3), _ctx(), _key(), lay3).thumbnail is None


def test_the_thumbnail_is_required_by_version_4_and_refused_by_earlier_versions():
    lay = PayloadLayout(3240, 128, 4)
    with pytest.raises(PayloadError, match="79-byte face thumbnail of kind 1; got NoneType"):
        encode(_emb(), _ctx(), _key(), lay)
    with pytest.raises(PayloadError, match="79-byte face thumbnail of kind 1; got 78"):
        encode(_emb(), _ctx(), _key(), lay, _thumb()[:78])
    with pytest.raises(PayloadError, match="format version 3 carries no thumbnail"):
        encode(_emb(), _ctx(), _key(), PayloadLayout(3240, 128, 3), _thumb())


def test_version_4_bits_open_from_schemas_payload_md_alone():
    """Unmasked with the documented mask: valid RS codewords whose data opens under the version 4 aad to the
    documented plaintext: version 3's fields, then the thumbnail kind byte 1 and the 79 thumbnail bytes."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def hkdf(ikm, info):
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)

    def lp(s):
        return len(s.encode()).to_bytes(4, "big") + s.encode()

    layout, ctx, e, t = PayloadLayout(3240, 128, 4), _ctx(), _emb(20), _thumb(5)
    unmasked = encode(e, ctx, _key(), layout, t) ^ _spec_mask(ctx, layout)
    assert all(_passes_rs_check(unmasked, layout))
    stream = np.packbits(unmasked[: 8 * 405])
    ct = bytes(stream[0::2][:115]) + bytes(stream[1::2][:115])
    shard_key = hkdf(MASTER, b"g2face-pipe/v1/shard-key" + lp(DS) + lp(SHARD))
    nonce = hmac.new(hkdf(shard_key, b"g2face-pipe/v1/shard-subkey/payload/v1/nonce"),
                     (7).to_bytes(8, "big") + lp("img_0001") + (0).to_bytes(4, "big"), "sha256").digest()[:12]
    aad = (b"g2face-pipe/payload" + bytes([4]) + (3240).to_bytes(4, "big") + (128).to_bytes(2, "big")
           + lp(DS) + lp(SHARD) + lp("img_0001") + (0).to_bytes(4, "big") + lp("g2face-hide-v1"))
    plaintext = AESGCMSIV(hkdf(shard_key, b"g2face-pipe/v1/shard-subkey/payload/v1/aead")).decrypt(nonce, ct, aad)
    assert len(plaintext) == 214 and plaintext[:4] == bytes([4, 2]) + (128).to_bytes(2, "big")
    scale = np.frombuffer(plaintext[4:6], "<f2")[0]
    assert np.array_equal(np.frombuffer(plaintext[6:134], np.int8).astype(np.float32) * np.float32(scale), quantize(e, 4))
    assert plaintext[134] == 1 and plaintext[135:] == t
    assert reedsolo.RSCodec(88, nsize=255).check(bytes(stream[0::2][:203]))[0]


def test_format_4_known_answer():
    # pins format version 4: any change to the bytes written needs a new FORMAT_VERSION and a spec update
    e = (np.arange(128, dtype=np.float32) - 64) / 32
    bits = encode(e, _ctx(), _key(), PayloadLayout(3240, 128, 4), bytes(range(79)))
    assert hashlib.sha256(np.packbits(bits).tobytes()).hexdigest() == KNOWN_ANSWER_SHA256


KNOWN_ANSWER_SHA256 = "2da7757ecc34f773fc4091643a6569559423ba6f093f4ae27729213d4bff8060"


def test_a_wrong_thumbnail_never_comes_back_and_errors_are_corrected_as_before():
    layout, key, ctx, e, t = PayloadLayout(3240, 128, 4), _key(), _ctx(), _emb(8), _thumb(2)
    bits = encode(e, ctx, key, layout, t)
    rng = np.random.default_rng(0)
    flipped = bits.copy()
    flipped[rng.choice(bits.size, layout.guaranteed_bit_errors, replace=False)] ^= 1
    res = decode(flipped, ctx, key, layout)
    assert res.ok and res.thumbnail == t
    other = decode(bits, _ctx(face_index=1), key, layout)
    assert not other.ok and other.thumbnail is None and other.embedding is None
