"""Payload format version 3: version 2's bits XOR a keyed per-face mask (versions 4 and 5 add the thumbnail to
it; new runs write version 5, or 3 for small hiding models).

Without the mask, anyone with the public extractor could run the public Reed-Solomon check (or compare the
repeated copies) on the bits read from a face and tell a face that carries a payload from one carrying
random bits. Here: the mask as schemas/payload.md describes it, that the check no longer passes without
the key, and that error correction is unchanged (errors stay where they fall, the mask only flips signs).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import reedsolo

from test_payload import DS, MASTER, SHARD, _ctx, _key

from pipeline.payload import FORMAT_VERSION, MAX_MASK_BITS, PayloadError, PayloadLayout, decode, encode, quantize


def _emb(seed=0, dim=128, scale=0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(dim) * scale).astype(np.float32)


def _passes_rs_check(bits: np.ndarray, layout: PayloadLayout) -> list[bool]:
    """The check anyone can run without a key: is each interleaved codeword a valid RS codeword?"""
    stream = np.packbits(bits[: 8 * layout.stream_bytes])
    ok = []
    for j, (n, k) in enumerate(layout.codewords):
        cw = bytes(stream[j :: len(layout.codewords)][:n])
        ok.append(bool(reedsolo.RSCodec(n - k, nsize=255).check(cw)[0]))
    return ok


def _spec_mask(ctx, layout) -> np.ndarray:
    """The mask rebuilt from schemas/payload.md alone."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

    def hkdf(ikm, info):
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)

    def lp(s):
        return len(s.encode()).to_bytes(4, "big") + s.encode()

    shard_key = hkdf(MASTER, b"g2face-pipe/v1/shard-key" + lp(DS) + lp(SHARD))
    mask_key = hkdf(shard_key, b"g2face-pipe/v1/shard-subkey/payload/v3/mask")
    info = (b"g2face-pipe/payload-mask" + lp(DS) + lp(SHARD) + ctx.seed.to_bytes(8, "big") + lp(ctx.sample_key)
            + ctx.face_index.to_bytes(4, "big") + layout.capacity_bits.to_bytes(4, "big"))
    stream = HKDFExpand(hashes.SHA256(), -(-layout.capacity_bits // 8), info).derive(mask_key)
    return np.unpackbits(np.frombuffer(stream, np.uint8))[: layout.capacity_bits]


def test_version_3_payloads_have_version_2_layouts():
    assert FORMAT_VERSION == 5
    for cap, dim in ((3240, 128), (8192, 128), (16384, 512)):
        v2, v3 = PayloadLayout(cap, dim, 2), PayloadLayout(cap, dim, 3)
        assert v3.format_version == 3
        assert (v3.codewords, v3.copies, v3.stream_bytes) == (v2.codewords, v2.copies, v2.stream_bytes)
        assert v3.describe()["random_ber_limit_1e-3"] == v2.describe()["random_ber_limit_1e-3"]


def test_version_3_bits_are_a_valid_coded_stream_once_the_documented_mask_is_removed():
    """Bits XOR the spec's mask: valid RS codewords whose data part opens, under the version 3 aad, with the
    documented keys, to a version 3 plaintext."""
    import hmac

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def hkdf(ikm, info):
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)

    def lp(s):
        return len(s.encode()).to_bytes(4, "big") + s.encode()

    layout, ctx, e = PayloadLayout(3240, 128, 3), _ctx(), _emb(20)
    unmasked = encode(e, ctx, _key(), layout) ^ _spec_mask(ctx, layout)
    assert all(_passes_rs_check(unmasked, layout))
    stream = np.packbits(unmasked[: 8 * 405])
    ct = bytes(stream[0::2][:75]) + bytes(stream[1::2][:75])
    shard_key = hkdf(MASTER, b"g2face-pipe/v1/shard-key" + lp(DS) + lp(SHARD))
    nonce = hmac.new(hkdf(shard_key, b"g2face-pipe/v1/shard-subkey/payload/v1/nonce"),
                     (7).to_bytes(8, "big") + lp("img_0001") + (0).to_bytes(4, "big"), "sha256").digest()[:12]
    aad = (b"g2face-pipe/payload" + bytes([3]) + (3240).to_bytes(4, "big") + (128).to_bytes(2, "big")
           + lp(DS) + lp(SHARD) + lp("img_0001") + (0).to_bytes(4, "big") + lp("g2face-hide-v1"))
    plaintext = AESGCMSIV(hkdf(shard_key, b"g2face-pipe/v1/shard-subkey/payload/v1/aead")).decrypt(nonce, ct, aad)
    assert plaintext[:4] == bytes([3, 2]) + (128).to_bytes(2, "big")
    scale = np.frombuffer(plaintext[4:6], "<f2")[0]
    assert np.array_equal(np.frombuffer(plaintext[6:], np.int8).astype(np.float32) * np.float32(scale), quantize(e, 3))


def test_format_3_known_answer():
    # pins format version 3: any change to the bytes written needs a new FORMAT_VERSION and a spec update
    e = (np.arange(128, dtype=np.float32) - 64) / 32
    bits = encode(e, _ctx(), _key(), PayloadLayout(3240, 128, 3))
    assert hashlib.sha256(np.packbits(bits).tobytes()).hexdigest() == KNOWN_ANSWER_SHA256


KNOWN_ANSWER_SHA256 = "afcc9a4773c75753f95e9b4131cc0c5fba40022d346ec9bfdfc94f3ff780f7cc"


def test_without_the_key_no_parity_check_passes_and_copies_do_not_repeat():
    """Version 2's bits give themselves away to anyone (valid public RS codewords, identical copies); version
    3's do not, for any face: the mask differs per face, so XOR-ing two faces' bits does not cancel it."""
    e = _emb(5)
    for cap in (3240, 8192):
        v2, v3 = PayloadLayout(cap, 128, 2), PayloadLayout(cap, 128, 3)
        assert all(_passes_rs_check(encode(e, _ctx(), _key(), v2), v2))
        faces = [encode(e, _ctx(face_index=i, sample_key=f"s{i // 3}"), _key(), v3) for i in range(12)]
        assert not any(any(_passes_rs_check(b, v3)) for b in faces)
        assert not any(any(_passes_rs_check(a ^ b, v3)) for a in faces for b in faces if a is not b)
    v2, v3 = PayloadLayout(8192, 128, 2), PayloadLayout(8192, 128, 3)
    period = 8 * v2.stream_bytes
    assert v2.copies == 5
    copies2 = encode(e, _ctx(), _key(), v2)[: 2 * period].reshape(2, period)
    copies3 = encode(e, _ctx(), _key(), v3)[: 2 * period].reshape(2, period)
    assert np.array_equal(copies2[0], copies2[1])
    assert 0.45 < np.mean(copies3[0] == copies3[1]) < 0.55


def test_version_3_corrects_the_same_flips_and_reports_the_same_raw_ber():
    layout, key, ctx, e = PayloadLayout(3240, 128, 3), _key(), _ctx(), _emb(8)
    bits = encode(e, ctx, key, layout)
    rng = np.random.default_rng(0)
    for n in (0, 40, layout.guaranteed_bit_errors):
        flipped = bits.copy()
        flipped[rng.choice(bits.size, n, replace=False)] ^= 1
        res = decode(flipped, ctx, key, layout)
        assert res.ok and np.array_equal(res.embedding, quantize(e, 3))
        assert res.raw_ber == pytest.approx(n / bits.size)
    logits = np.where(bits.astype(bool), 2.0, -2.0)
    assert decode(logits, ctx, key, layout).ok  # soft logits too: the mask flips their signs back
    heavy = bits ^ (rng.random(bits.size) < 0.3)
    res = decode(heavy, ctx, key, layout)
    assert not res.ok and res.embedding is None


def test_a_capacity_beyond_the_mask_is_refused_naming_what_to_do():
    assert PayloadLayout(MAX_MASK_BITS, 512).format_version == 5
    for version in (3, 4, 5):
        with pytest.raises(PayloadError, match=f"exceeds the 65280 bits that format version {version}'s mask covers.*"
                                               "anonymizer.payload: irreversible"):
            PayloadLayout(MAX_MASK_BITS + 8, 512, version)
    PayloadLayout(MAX_MASK_BITS + 8, 512, 2)
