"""Payload format version 2 (int8 values with one float16 scale): what runs wrote before version 3 (the same
bits, masked: test_payload_v3.py), still read.

Error correction, binding and leakage are shared with version 1 and tested in test_payload.py; here: the
sizes, the exact values returned, the precision on real dlib embeddings, the known answer, the bytes as
schemas/payload.md describes them, and that versions 1 and 2 never open each other's payloads.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from test_payload import DS, MASTER, SHARD, _ctx, _key

from pipeline.payload import (
    FORMAT_VERSION,
    PayloadError,
    PayloadLayout,
    decode,
    encode,
    minimum_capacity_bits,
    quantize,
)


def _emb(seed=0, dim=128, scale=1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(dim) * scale).astype(np.float32)


def test_version_2_needs_about_half_the_capacity_of_version_1():
    assert FORMAT_VERSION == 5 and PayloadLayout(4096, 128, 2).format_version == 2
    assert minimum_capacity_bits(128, 2) == 1456 and minimum_capacity_bits(128, 1) == 2720
    assert minimum_capacity_bits(512, 2) == 5040
    PayloadLayout(1620, 128, 2)  # one face plane of lite-128 carries a 128-d payload
    with pytest.raises(PayloadError, match="format version 1: it needs at least 2720 bits"):
        PayloadLayout(1620, 128, 1)
    with pytest.raises(PayloadError, match="format_version must be one of"):
        PayloadLayout(4096, 128, 6)
    # the spare capacity becomes parity: lite-128's 3,240 bits tolerate ~3% random bit errors (1.15% in version 1)
    d = PayloadLayout(3240, 128, 2).describe()
    assert d["format_version"] == 2 and d["rs_codewords"] == [[203, 75], [202, 75]]
    assert d["random_ber_limit_1e-3"] > 0.025 > 2 * PayloadLayout(3240, 128, 1).random_ber_limit()


@pytest.mark.parametrize("cap,dim,scale", [(3240, 128, 0.1), (4096, 128, 1.0), (1456, 128, 30.0), (16384, 512, 20.0),
                                           (5040, 512, 1e-3)])
def test_round_trip_returns_exactly_the_quantized_embedding(cap, dim, scale):
    lay, key, ctx, e = PayloadLayout(cap, dim, 3), _key(), _ctx(), _emb(3, dim, scale)
    res = decode(encode(e, ctx, key, lay), ctx, key, lay)
    assert res.ok and res.embedding.dtype == np.float32 and res.embedding.shape == (dim,)
    assert np.array_equal(res.embedding, quantize(e, 3))
    peak = np.abs(e).max()
    assert np.abs(res.embedding - e).max() <= peak / 254 * 1.01  # half a step of max|x| / 127
    assert np.abs(res.embedding).max() <= peak * 1.01


def test_zero_and_tiny_embeddings_round_trip():
    lay, key, ctx = PayloadLayout(3240, 128, 3), _key(), _ctx()
    for e in (np.zeros(128, np.float32), np.full(128, 1e-7, np.float32), np.eye(1, 128, 5, dtype=np.float32)[0]):
        res = decode(encode(e, ctx, key, lay), ctx, key, lay)
        assert res.ok and np.array_equal(res.embedding, quantize(e, 3))
        # float16 cannot hold scales below 2^-24: the error floor is half of that
        assert np.abs(res.embedding - e).max() <= max(np.abs(e).max() / 254 * 1.01, 2.0**-25)


def test_int8_precision_is_negligible_for_real_dlib_embeddings():
    """Distances between the real embeddings of the demo portraits and their version 2 copies stay below
    0.02 (measured ~0.01, under 3% of dlib's 0.6 same-person threshold), and so do the changes of every
    pairwise distance between people."""
    import torch
    from hiding_model import aligned_demo_faces

    from g2face.identity import aligned_to_chip, load_dlib_face_resnet
    from pipeline import align

    crops = torch.from_numpy(aligned_demo_faces(128)[3]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        emb = load_dlib_face_resnet()(aligned_to_chip(crops, align.template(128))).numpy()
    q = np.stack([quantize(e, 3) for e in emb])
    assert np.linalg.norm(q - emb, axis=1).max() < 0.02
    pair = lambda x: np.linalg.norm(x[:, None] - x[None], axis=-1)  # noqa: E731
    assert np.abs(pair(q) - pair(emb)).max() < 0.02


def test_format_2_known_answer():
    # pins format version 2 (header, scale, int8, AEAD, nonce, AAD, RS, interleaving): any change to the bytes
    # written needs a new FORMAT_VERSION and a spec update
    e = (np.arange(128, dtype=np.float32) - 64) / 32
    bits = encode(e, _ctx(), _key(), PayloadLayout(3240, 128, 2))
    assert hashlib.sha256(np.packbits(bits).tobytes()).hexdigest() == KNOWN_ANSWER_SHA256


KNOWN_ANSWER_SHA256 = "426b11a0da4cb032c4afbd5148fb76372c54b1fbddbbdbf679a9c0af31bd9559"


def test_format_2_bytes_follow_the_written_spec():
    # rebuilds the version 2 plaintext and ciphertext from schemas/payload.md alone and finds the ciphertext
    # as the systematic part of the two interleaved codewords of a 3,240-bit layout
    import hmac

    import reedsolo
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def hkdf(ikm, info):
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)

    def lp(s):
        return len(s.encode()).to_bytes(4, "big") + s.encode()

    e = _emb(20, 128, 0.1)
    shard_key = hkdf(MASTER, b"g2face-pipe/v1/shard-key" + lp(DS) + lp(SHARD))
    aead_key = hkdf(shard_key, b"g2face-pipe/v1/shard-subkey/payload/v1/aead")
    nonce_key = hkdf(shard_key, b"g2face-pipe/v1/shard-subkey/payload/v1/nonce")
    nonce = hmac.new(nonce_key, (7).to_bytes(8, "big") + lp("img_0001") + (0).to_bytes(4, "big"), "sha256").digest()[:12]
    aad = (b"g2face-pipe/payload" + bytes([2]) + (3240).to_bytes(4, "big") + (128).to_bytes(2, "big")
           + lp(DS) + lp(SHARD) + lp("img_0001") + (0).to_bytes(4, "big") + lp("g2face-hide-v1"))
    # scale: the smallest float16 s >= max|x| / 127 with 127.5 s >= max|x|; values round(x / s) as int8
    peak = float(np.abs(e.astype(np.float64)).max())
    scale = np.float16(peak / 127)
    while float(scale) * 127.5 < peak:
        scale = np.nextafter(scale, np.float16(np.inf))
    values = np.clip(np.rint(e.astype(np.float64) / float(scale)), -127, 127).astype(np.int8)
    plaintext = bytes([2, 2]) + (128).to_bytes(2, "big") + np.array([scale], "<f2").tobytes() + values.tobytes()
    ct = AESGCMSIV(aead_key).encrypt(nonce, plaintext, aad)
    assert len(plaintext) == 134 and len(ct) == 150

    bits = encode(e, _ctx(), _key(), PayloadLayout(3240, 128, 2))
    stream = np.packbits(bits[: 8 * 405])
    cws = [bytearray(), bytearray()]
    for s, byte in enumerate(stream):
        cws[s % 2].append(int(byte))
    assert [len(c) for c in cws] == [203, 202]
    assert bytes(cws[0][:75]) + bytes(cws[1][:75]) == ct
    for c in cws:
        assert bytes(reedsolo.RSCodec(len(c) - 75).encode(bytes(c[:75]))) == bytes(c)


def test_versions_never_open_each_others_payloads():
    key, ctx, e = _key(), _ctx(), _emb(9, 128, 0.1)
    layouts = [PayloadLayout(4096, 128, v) for v in (1, 2, 3)]
    assert all(decode(encode(e, ctx, key, lay), ctx, key, lay).ok for lay in layouts)
    for written, read in ((a, b) for a in layouts for b in layouts if a != b):
        res = decode(encode(e, ctx, key, written), ctx, key, read)
        assert not res.ok and res.embedding is None
