"""Key-gated payload: layout figures, round trips, correction limits, binding, leakage, soft decoding.

These pin format version 1 (float16 values), which runs written before version 2 still use; error
correction, binding and leakage are shared by both versions. Version 2 (int8 + scale): test_payload_v2.py."""
from __future__ import annotations

import base64
import hashlib
import pickle

import numpy as np
import pytest

from pipeline.keys import ShardKey
from pipeline.payload import (
    FORMAT_VERSION,
    MIN_PARITY,
    DecodeResult,
    PayloadContext,
    PayloadError,
    PayloadLayout,
    decode,
    encode,
    minimum_capacity_bits,
)

MASTER = bytes(range(32))
DS, SHARD = "demo-ds", "shard-000001.tar"
L128 = PayloadLayout(4096, 128, 1)  # one copy, 3 RS codewords
L128_REP = PayloadLayout(16384, 128, 1)  # five copies, 2 RS codewords


def _key(master=MASTER, ds=DS, shard=SHARD) -> ShardKey:
    return ShardKey.from_master(master, ds, shard)


def _ctx(**kw) -> PayloadContext:
    base = dict(dataset_id=DS, shard=SHARD, sample_key="img_0001", face_index=0, model_id="g2face-hide-v1", seed=7)
    return PayloadContext(**{**base, **kw})


def _emb(seed=0, dim=128) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def _positions(layout: PayloadLayout, cw: int, sym: int, bit: int) -> np.ndarray:
    """Every capacity position that carries bit `bit` of symbol `sym` of codeword `cw`."""
    stream_bit = 8 * int(layout._interleave[cw][sym]) + bit
    return np.arange(stream_bit, layout.capacity_bits, 8 * layout.stream_bytes)


def _flip_symbols(bits: np.ndarray, layout: PayloadLayout, per_codeword: list[int], copies: int) -> np.ndarray:
    """Corrupt `per_codeword[j]` distinct symbols of codeword j, flipping `copies` copies of one bit in each."""
    out = bits.copy()
    rng = np.random.default_rng(1)
    for j, count in enumerate(per_codeword):
        n = layout.codewords[j][0]
        for sym in rng.choice(n, size=count, replace=False):
            pos = _positions(layout, j, int(sym), int(rng.integers(8)))
            out[pos[:copies]] ^= 1
    return out


# --- layout --------------------------------------------------------------------------------------------


def test_minimum_capacities_and_too_small_capacity_is_a_clear_error():
    assert minimum_capacity_bits(128, 1) == 2720
    assert minimum_capacity_bits(512, 1) == 9640
    PayloadLayout(2720, 128, 1)
    with pytest.raises(PayloadError, match="at least 2720 bits"):
        PayloadLayout(2719, 128, 1)
    with pytest.raises(PayloadError, match="at least 2720 bits"):
        PayloadLayout(2048, 128, 1)
    with pytest.raises(PayloadError, match="at least 9640 bits"):
        PayloadLayout(8192, 512, 1)


def test_every_capacity_above_the_minimum_gives_a_valid_layout():
    for dim in (128, 512):
        lo = minimum_capacity_bits(dim, 1)
        for cap in list(range(lo, lo + 2100, 7)) + [c for c in (4096, 8192, 16384, 32768, 65536) if c >= lo]:
            lay = PayloadLayout(cap, dim, 1)
            assert sum(k for _, k in lay.codewords) == lay.ciphertext_bytes == 4 + 2 * dim + 16
            assert sum(n for n, _ in lay.codewords) == lay.stream_bytes
            assert all(n <= 255 and n - k >= MIN_PARITY for n, k in lay.codewords)
            assert lay.copies % 2 == 1 and lay.min_copies >= lay.copies
            assert 8 * lay.stream_bytes * lay.min_copies <= cap < 8 * lay.stream_bytes * (lay.min_copies + 1)


def test_layouts_for_any_dim_keep_the_parity_floor_including_the_fewer_codewords_case():
    fewer = 0
    for dim in range(1, 700, 7):
        lo = minimum_capacity_bits(dim, 1)
        for cap in range(lo, lo + 8 * 600, 13):
            lay = PayloadLayout(cap, dim, 1)
            assert all(n <= 255 and n - k >= MIN_PARITY for n, k in lay.codewords)
            fewer += lay.stream_bytes != cap // (8 * lay.copies)
    assert fewer > 0  # the rule's step 3 fallback is exercised
    lay = PayloadLayout(2057, 92, 1)  # 257 bytes would make two codewords with < 32 parity each
    assert lay.codewords == ((255, 204),) and lay.stream_bytes == 255
    key, ctx, e = _key(), _ctx(), _emb(22, 92)
    res = decode(encode(e, ctx, key, lay), ctx, key, lay)
    assert res.ok and np.array_equal(res.embedding, e.astype(np.float16))


def test_documented_figures_for_the_reference_layouts():
    d = L128.describe()
    assert d["rs_codewords"] == [[171, 92], [171, 92], [170, 92]]
    assert d["correctable_symbols_per_codeword"] == [39, 39, 39]
    assert d["guaranteed_bit_errors"] == 39 and d["copies_min"] == 1
    d = L128_REP.describe()
    assert d["rs_codewords"] == [[205, 138], [204, 138]] and d["copies_min"] == 5
    assert d["guaranteed_bit_errors"] == 101  # 34 symbols x 3 flipped copies - 1
    assert PayloadLayout(16384, 512, 1).describe()["guaranteed_bit_errors"] == 55
    # the random-error limit grows with capacity
    assert L128.random_ber_limit() < L128_REP.random_ber_limit()
    assert 0.015 < L128.random_ber_limit() < 0.02 and 0.10 < L128_REP.random_ber_limit() < 0.12


# --- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap,dim", [(4096, 128), (16384, 128), (2720, 128), (9640, 512), (16384, 512)])
def test_round_trip_returns_the_float16_embedding(cap, dim):
    lay, key, ctx, e = PayloadLayout(cap, dim, 1), _key(), _ctx(), _emb(3, dim)
    bits = encode(e, ctx, key, lay)
    assert bits.shape == (cap,) and bits.dtype == np.uint8 and set(np.unique(bits)) <= {0, 1}
    res = decode(bits, ctx, key, lay)
    assert res.ok and res.status == "ok" and res.raw_ber == 0.0 and res.corrected_symbols == 0
    assert res.embedding.dtype == np.float16 and res.embedding.shape == (dim,)
    assert np.array_equal(res.embedding, e.astype(np.float16))


def test_bits_logits_bools_and_torch_tensors_are_all_accepted():
    import torch

    key, ctx, e = _key(), _ctx(), _emb(4)
    bits = encode(e, ctx, key, L128)
    logits = (bits.astype(np.float32) * 2 - 1) * 3.0
    for received in (bits, bits.astype(bool), bits.astype(np.int64), logits, torch.from_numpy(logits).reshape(64, 64)):
        res = decode(received, ctx, key, L128)
        assert res.ok and np.array_equal(res.embedding, e.astype(np.float16))


def test_encoding_is_deterministic_so_reruns_are_byte_identical():
    key, ctx, e = _key(), _ctx(), _emb(5)
    a = encode(e, ctx, key, L128)
    assert np.array_equal(a, encode(e.copy(), ctx, _key(), L128))


def test_format_known_answer():
    # pins format version 1 (header, AEAD, nonce, AAD, RS, interleaving, repetition): any change to the bytes
    # written needs a new FORMAT_VERSION and a spec update
    e = (np.arange(128, dtype=np.float32) - 64) / 32
    bits = encode(e, _ctx(), _key(), L128)
    assert L128.format_version == 1 and FORMAT_VERSION == 5  # version 1 is still read
    assert hashlib.sha256(np.packbits(bits).tobytes()).hexdigest() == KNOWN_ANSWER_SHA256


KNOWN_ANSWER_SHA256 = "4ee720c7e765f0f5ee79b7882c63092550bff06e96626f1bbd7fd9d9d38f679f"


def test_bits_follow_the_written_spec():
    # rebuilds the ciphertext from schemas/payload.md alone (not via pipeline.payload) and finds it, codeword
    # by codeword, as the systematic part of the interleaved stream
    import hmac
    import reedsolo
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def hkdf(ikm, info, n=32):
        return HKDF(algorithm=hashes.SHA256(), length=n, salt=None, info=info).derive(ikm)

    def lp(s):
        return len(s.encode()).to_bytes(4, "big") + s.encode()

    ctx, e = _ctx(), _emb(20)
    shard_key = hkdf(MASTER, b"g2face-pipe/v1/shard-key" + lp(DS) + lp(SHARD))
    aead_key = hkdf(shard_key, b"g2face-pipe/v1/shard-subkey/payload/v1/aead")
    nonce_key = hkdf(shard_key, b"g2face-pipe/v1/shard-subkey/payload/v1/nonce")
    nonce = hmac.new(nonce_key, (7).to_bytes(8, "big") + lp("img_0001") + (0).to_bytes(4, "big"), "sha256").digest()[:12]
    aad = (b"g2face-pipe/payload" + bytes([1]) + (4096).to_bytes(4, "big") + (128).to_bytes(2, "big")
           + lp(DS) + lp(SHARD) + lp("img_0001") + (0).to_bytes(4, "big") + lp("g2face-hide-v1"))
    plaintext = bytes([1, 1]) + (128).to_bytes(2, "big") + e.astype("<f2").tobytes()
    ct = AESGCMSIV(aead_key).encrypt(nonce, plaintext, aad)
    assert len(ct) == 276

    bits = encode(e, ctx, _key(), L128)
    stream = np.packbits(bits[: 8 * 512])  # one copy: 512 stream bytes fill the 4096 bits exactly
    cws = [bytearray() for _ in range(3)]
    for s, byte in enumerate(stream):  # round robin: stream byte s is symbol s // 3 of codeword s % 3
        cws[s % 3].append(int(byte))
    assert [len(c) for c in cws] == [171, 171, 170]
    assert b"".join(bytes(c[:92]) for c in cws) == ct
    for c in cws:
        assert bytes(reedsolo.RSCodec(len(c) - 92).encode(bytes(c[:92]))) == bytes(c)


# --- error correction limits ---------------------------------------------------------------------------


def test_flipping_up_to_the_guaranteed_limit_decodes_single_copy():
    key, ctx, e = _key(), _ctx(), _emb(6)
    bits = encode(e, ctx, key, L128)
    t = L128.correctable_symbols
    bad = _flip_symbols(bits, L128, list(t), copies=1)  # worst placement: every flip in its own symbol
    assert int(np.sum(bad != bits)) == sum(t) > L128.guaranteed_bit_errors
    res = decode(bad, ctx, key, L128)
    assert res.ok and np.array_equal(res.embedding, e.astype(np.float16))
    assert res.symbol_errors == t and res.corrected_symbols == sum(t)
    assert res.raw_ber == pytest.approx(sum(t) / 4096)
    # any guaranteed_bit_errors flips anywhere, too
    rng = np.random.default_rng(2)
    for _ in range(5):
        bad = bits.copy()
        bad[rng.choice(4096, L128.guaranteed_bit_errors, replace=False)] ^= 1
        assert decode(bad, ctx, key, L128).ok


def test_flipping_up_to_the_guaranteed_limit_decodes_with_copies():
    key, ctx, e = _key(), _ctx(), _emb(7)
    lay = L128_REP
    bits = encode(e, ctx, key, lay)
    per_symbol = (lay.min_copies + 1) // 2  # 3 of 5 copies flipped turns a bit
    bad = _flip_symbols(bits, lay, list(lay.correctable_symbols), copies=per_symbol)
    res = decode(bad, ctx, key, lay, hard=True)
    assert res.ok and np.array_equal(res.embedding, e.astype(np.float16))
    assert res.symbol_errors == lay.correctable_symbols
    # two flipped copies of every bit of every symbol are outvoted: nothing to correct at all
    bad = bits.copy()
    for p in range(8 * lay.stream_bytes):
        bad[np.arange(p, lay.capacity_bits, 8 * lay.stream_bytes)[:2]] ^= 1
    res = decode(bad, ctx, key, lay, hard=True)
    assert res.ok and res.corrected_symbols == 0 and res.raw_ber == pytest.approx(0.4, abs=0.01)


@pytest.mark.parametrize("layout", [L128, L128_REP], ids=["1copy", "5copies"])
def test_one_symbol_beyond_the_limit_fails_and_returns_no_plaintext(layout):
    key, ctx = _key(), _ctx()
    bits = encode(_emb(8), ctx, key, layout)
    per_cw = list(layout.correctable_symbols)
    per_cw[0] += 1
    # every copy flipped: the wrong symbols look as sure as the right ones, so erasures cannot help either
    bad = _flip_symbols(bits, layout, per_cw, copies=layout.min_copies)
    res = decode(bad, ctx, key, layout, hard=True)
    assert not res.ok and res.embedding is None
    assert res.status in ("uncorrectable", "authentication_failed")
    assert "uncorrectable" in res.message or "authentication failed" in res.message


def test_erasure_decoding_may_go_beyond_the_guarantee_with_unsure_bits():
    # 3 of 5 copies flipped leaves those bits visibly unsure (sum of +-1 copies = -1 against +5 elsewhere):
    # the decoder erases them and still opens the payload, one symbol past the errors-only limit
    key, ctx, e = _key(), _ctx(), _emb(21)
    bits = encode(e, ctx, key, L128_REP)
    per_cw = [t + 1 for t in L128_REP.correctable_symbols]
    res = decode(_flip_symbols(bits, L128_REP, per_cw, copies=3), ctx, key, L128_REP, hard=True)
    assert res.ok and res.erased_symbols > 0 and np.array_equal(res.embedding, e.astype(np.float16))


def test_heavy_noise_never_yields_a_plaintext():
    key, ctx = _key(), _ctx()
    bits = encode(_emb(9), ctx, key, L128)
    rng = np.random.default_rng(3)
    for ber in (0.05, 0.1, 0.3, 0.5):
        bad = bits ^ (rng.random(4096) < ber).astype(np.uint8)
        res = decode(bad, ctx, key, L128)
        assert not res.ok and res.embedding is None and res.status == "uncorrectable"
        assert "codeword" in res.message


def test_a_miscorrection_is_caught_by_authentication():
    # replace one codeword by another valid RS codeword (different data, correct parity): the RS decoder
    # sees no error at all, so only the authentication tag stands between this and a wrong identity
    import reedsolo

    key, ctx = _key(), _ctx()
    bits = encode(_emb(10), ctx, key, L128)
    stream = np.packbits(bits[: 8 * L128.stream_bytes])
    n, k = L128.codewords[1]
    pos = L128._interleave[1]
    data = bytearray(stream[pos][:k].tobytes())
    data[5] ^= 0x40
    stream[pos] = np.frombuffer(bytes(reedsolo.RSCodec(n - k).encode(data)), np.uint8)
    res = decode(np.unpackbits(stream), ctx, key, L128)
    assert res.status == "authentication_failed" and res.embedding is None
    assert res.corrected_symbols == 0
    assert res.message.startswith("authentication failed: wrong key or modified image")


def test_raw_ber_is_estimated_from_copies_when_decoding_fails():
    key, ctx = _key(), _ctx()
    bits = encode(_emb(11), ctx, key, L128_REP)
    bad = bits ^ (np.random.default_rng(4).random(16384) < 0.3).astype(np.uint8)
    res = decode(bad, ctx, key, L128_REP)
    assert not res.ok and not res.raw_ber_exact and res.raw_ber == pytest.approx(0.3, abs=0.03)
    # a single copy gives no estimate
    bad = encode(_emb(11), ctx, key, L128) ^ (np.random.default_rng(4).random(4096) < 0.3).astype(np.uint8)
    assert decode(bad, ctx, key, L128).raw_ber is None


def test_nan_logits_count_as_unknown_bits():
    key, ctx, e = _key(), _ctx(), _emb(12)
    logits = encode(e, ctx, key, L128_REP).astype(np.float64) * 2 - 1
    logits[::7] = np.nan  # every 7th position: every stream bit keeps most of its copies
    res = decode(logits, ctx, key, L128_REP)
    assert res.ok and np.array_equal(res.embedding, e.astype(np.float16))


def test_soft_logits_beat_hard_decisions_on_noisy_input():
    key = _key()
    rng = np.random.default_rng(5)
    soft = hard = 0
    for i in range(8):
        ctx = _ctx(sample_key=f"img_{i}")
        bits = encode(_emb(100 + i), ctx, key, L128_REP)
        logits = (bits * 2.0 - 1.0) + 1.0 * rng.standard_normal(bits.size)  # raw BER ~16% per received bit
        soft += decode(logits, ctx, key, L128_REP).ok
        hard += decode(logits, ctx, key, L128_REP, hard=True).ok
    assert soft >= 7 and hard <= 1, (soft, hard)


# --- binding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"face_index": 1},
        {"sample_key": "img_0002"},
        {"model_id": "g2face-hide-v2"},
        {"seed": 8},
        {"shard": "shard-000002.tar"},
        {"dataset_id": "other-ds"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_payload_moved_to_another_face_sample_shard_or_dataset_fails(change):
    key, ctx = _key(), _ctx()
    bits = encode(_emb(13), ctx, key, L128)
    other = _ctx(**change)
    other_key = _key(ds=other.dataset_id, shard=other.shard)  # the right key for where it now sits
    res = decode(bits, other, other_key, L128)
    assert res.status == "authentication_failed" and res.embedding is None
    assert res.corrected_symbols == 0 and res.raw_ber == 0.0  # the bits were intact; only the binding differs


def test_a_payload_read_with_another_layout_fails():
    key, ctx = _key(), _ctx()
    bits = encode(_emb(14), ctx, key, PayloadLayout(4096, 128, 1))
    assert not decode(bits, ctx, key, PayloadLayout(4096, 136, 1)).ok


def test_wrong_master_key_fails_authentication():
    ctx = _ctx()
    bits = encode(_emb(15), ctx, _key(), L128)
    res = decode(bits, ctx, _key(master=bytes(32)), L128)
    assert res.status == "authentication_failed" and res.embedding is None


def test_a_key_for_another_shard_is_a_caller_error():
    with pytest.raises(PayloadError, match="shard-000002.tar") as ei:
        encode(_emb(16), _ctx(), _key(shard="shard-000002.tar"), L128)
    assert base64.b64encode(MASTER).decode() not in str(ei.value)
    with pytest.raises(PayloadError, match="ShardKey"):
        decode(np.zeros(4096, np.uint8), _ctx(), MASTER, L128)


def test_ciphertext_differs_for_another_seed_or_job():
    key, ctx, e = _key(), _ctx(), _emb(17)
    base = encode(e, ctx, key, L128)
    for other in (_ctx(seed=8), _ctx(model_id="g2face-hide-v2")):
        diff = np.mean(encode(e, other, key, L128) != base)
        assert 0.45 < diff < 0.55
    diff = np.mean(encode(e, ctx, _key(master=bytes(32)), L128) != base)  # a job under another master key
    assert 0.45 < diff < 0.55


# --- leakage -------------------------------------------------------------------------------------------


def test_payload_bits_are_balanced_per_position_over_many_faces():
    key, lay, n = _key(), L128, 256
    bits = np.stack([encode(_emb(1000 + i), _ctx(sample_key=f"img_{i:04d}"), key, lay) for i in range(n)])
    ones = bits.mean(axis=0)
    sigma = 0.5 / np.sqrt(n)
    assert abs(bits.mean() - 0.5) < 0.005
    assert np.max(np.abs(ones - 0.5)) < 5.5 * sigma  # no position is stuck or biased (a clear header would be)
    assert np.mean(np.abs(ones - 0.5) > 3 * sigma) < 0.01


def test_same_person_embeddings_give_bits_no_more_alike_than_different_people():
    key, rng = _key(), np.random.default_rng(6)
    same, diff = [], []
    for i in range(24):
        e = _emb(2000 + i)
        near = e + 0.01 * rng.standard_normal(128).astype(np.float32)  # another photo of the same person
        stranger = _emb(3000 + i)
        a = encode(e, _ctx(sample_key=f"a{i}"), key, L128)
        # same face slot (identical nonce) and another photo's slot: both must look unrelated
        same.append(np.mean(a == encode(near, _ctx(sample_key=f"a{i}"), key, L128)))
        same.append(np.mean(a == encode(near, _ctx(sample_key=f"b{i}"), key, L128)))
        diff.append(np.mean(a == encode(stranger, _ctx(sample_key=f"c{i}"), key, L128)))
    assert abs(np.mean(same) - 0.5) < 0.01 and abs(np.mean(diff) - 0.5) < 0.01
    assert np.mean(same) <= np.mean(diff) + 0.01
    assert max(same) < 0.55


# --- hygiene -------------------------------------------------------------------------------------------


def _secrets(key: ShardKey, emb16: np.ndarray) -> list[str]:
    mat = key._material
    out = [mat.hex(), base64.b64encode(mat).decode(), MASTER.hex(), base64.b64encode(MASTER).decode(), repr(mat)[2:20]]
    out += [emb16.tobytes().hex()[:16], repr(float(emb16[0])), f"{float(emb16[1]):.4f}", str(emb16[:3])[1:-1]]
    return [s for s in out if s]


def test_no_key_material_or_plaintext_in_repr_or_str():
    key, ctx, e = _key(), _ctx(), _emb(18)
    res = decode(encode(e, ctx, key, L128), ctx, key, L128)
    assert res.ok
    fail = decode(np.zeros(4096, np.uint8), ctx, key, L128)
    texts = [repr(o) + str(o) for o in (key, ctx, L128, res, fail, L128.describe())]
    for secret in _secrets(key, res.embedding):
        for text in texts:
            assert secret not in text
    assert "embedding" not in repr(res)
    assert key.key_id in repr(key)


def test_results_and_keys_survive_pickling_for_ray():
    key, ctx = _key(), _ctx()
    res = decode(encode(_emb(19), ctx, key, L128), ctx, key, L128)
    key2, res2 = pickle.loads(pickle.dumps(key)), pickle.loads(pickle.dumps(res))
    assert key2 == key and repr(key2) == repr(key)
    assert isinstance(res2, DecodeResult) and np.array_equal(res2.embedding, res.embedding)


@pytest.mark.parametrize(
    "embedding,match",
    [
        (np.zeros(127, np.float32), r"shape \(127,\)"),
        (np.full(128, np.nan, np.float32), "finite"),
        (np.full(128, 1e5, np.float32), "float16 range"),
        (np.arange(128), "floating-point"),
    ],
)
def test_bad_embeddings_are_refused_with_a_clear_message(embedding, match):
    with pytest.raises(PayloadError, match=match):
        encode(embedding, _ctx(), _key(), L128)


def test_bad_received_input_is_refused():
    key, ctx = _key(), _ctx()
    with pytest.raises(PayloadError, match="4096 bits"):
        decode(np.zeros(4095, np.uint8), ctx, key, L128)
    with pytest.raises(PayloadError, match="0/1"):
        decode(np.full(4096, 2, np.int64), ctx, key, L128)
    with pytest.raises(PayloadError, match="face_index"):
        _ctx(face_index=-1)
