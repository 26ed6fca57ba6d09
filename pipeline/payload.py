"""The key-gated payload hidden in each anonymized face (format version 5, versions 1 to 4 still read;
spec: schemas/payload.md).

encode: identity embedding (versions 4 and 5: and the original face's thumbnail, ``pipeline.thumbnail``) ->
plaintext with a 4-byte header (version 5: int4 values with one float16 scale; versions 2 to 4: int8; version 1:
float16 values) ->
AES-256-GCM-SIV under a key
derived from the shard key (nonce from job seed, sample key and face index; associated data binds
dataset, shard, sample, face, model and layout) -> Reed-Solomon over GF(256) -> codewords interleaved
byte by byte -> the stream repeated cyclically to fill exactly ``capacity_bits`` bits -> (version 3 on)
XOR with a keyed per-face mask, so that without the key neither the RS parity nor the repetition shows.

decode: bits or bit logits -> (version 3 on) the mask undone by flipping logit signs -> copies combined by
summing logits -> hard decisions -> RS decoding
(errors only first, then erasing the least reliable symbols) -> authenticated decryption. Any failure
returns a result with ok=False and a message; a wrong plaintext is never returned.

This module knows nothing about images or models: the hiding model supplies and consumes the bits.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import math
from dataclasses import dataclass, field

import numpy as np
import reedsolo
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from .keys import ShardKey

FORMAT_VERSION = 5  # what new payloads are written in, where the model's capacity holds it (``writing_version``)
FORMAT_VERSIONS = (1, 2, 3, 4, 5)  # what can be read
MASKED_FROM_VERSION = 3  # version 3 = version 2 bits XOR a keyed per-face mask
MAX_MASK_BITS = 8 * 255 * 32  # the longest HKDF-SHA256 expansion
DTYPE_FLOAT16 = 1  # version 1: dim float16 values
DTYPE_INT8_SCALED = 2  # versions 2 to 4: float16 scale, then dim int8 values; value = int8 * scale
DTYPE_INT4_SCALED = 3  # version 5: float16 scale, then dim 4-bit values q + 8, two per byte; value = q * scale
ELEMENT_TYPE = {1: DTYPE_FLOAT16, 2: DTYPE_INT8_SCALED, 3: DTYPE_INT8_SCALED, 4: DTYPE_INT8_SCALED, 5: DTYPE_INT4_SCALED}
THUMBNAIL_FROM_VERSION = 4  # version 4 = version 3 with the face thumbnail after the embedding
# version -> (thumbnail kind, bytes) (pipeline.thumbnail): kind 1 Y 10x10 5-bit, CbCr 4x4 4-bit; kind 2 Y 20x20
# DCT-coded (1,016 bits), CbCr as kind 1
THUMBNAIL_FORMS = {4: (1, 79), 5: (2, 143)}
THUMBNAIL_KIND, THUMBNAIL_BYTES = THUMBNAIL_FORMS[4]  # version 4's thumbnail (kind 1)
HEADER_BYTES = 4  # version u8 | dtype u8 | dim u16 big-endian
TAG_BYTES = 16
NONCE_BYTES = 12
RS_MAX_N = 255
MIN_PARITY = 32  # every codeword keeps >= 32 parity symbols, so it corrects >= 16 symbol errors
GMD_SPARE = 16  # erasure decoding always leaves >= 16 parity symbols unused, to detect miscorrections
GMD_STEPS = 8  # erasure tries per failed codeword: f = max_f/8, 2 max_f/8, ..., max_f least reliable symbols
MAX_DIM = 4096

__all__ = [
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "PayloadError",
    "PayloadContext",
    "PayloadLayout",
    "DecodeResult",
    "encode",
    "decode",
    "minimum_capacity_bits",
    "quantize",
    "writing_version",
]


class PayloadError(ValueError):
    """A caller error (bad shapes, capacity too small, key for another shard); not a per-face failure."""


def _lp(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def _split(total: int, parts: int) -> list[int]:
    # as even as possible, the longer parts first
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _embedding_bytes(dim: int, version: int) -> int:
    return 2 * dim if version == 1 else 2 + (dim if version < 5 else -(-dim // 2))


def _plaintext_bytes(dim: int, version: int) -> int:
    thumbnail = 1 + THUMBNAIL_FORMS[version][1] if version >= THUMBNAIL_FROM_VERSION else 0
    return HEADER_BYTES + _embedding_bytes(dim, version) + thumbnail


def _ciphertext_bytes(dim: int, version: int) -> int:
    return _plaintext_bytes(dim, version) + TAG_BYTES


def _min_stream_bytes(dim: int, version: int) -> int:
    k = _ciphertext_bytes(dim, version)
    c0 = -(-k // (RS_MAX_N - MIN_PARITY))
    return c0 * (-(-k // c0) + MIN_PARITY)


def _check_version(version) -> None:
    if version not in FORMAT_VERSIONS:
        raise PayloadError(f"payload format_version must be one of {FORMAT_VERSIONS}, got {version!r}")


def minimum_capacity_bits(embedding_dim: int, format_version: int = FORMAT_VERSION) -> int:
    """Smallest hiding capacity that carries a payload for this embedding size (one copy, minimum parity)."""
    _check_version(format_version)
    return 8 * _min_stream_bytes(embedding_dim, format_version)


def writing_version(capacity_bits: int, embedding_dim: int) -> int:
    """The format a new run writes: the newest whose payload the model's capacity holds: version 5 (4-bit
    embedding, kind 2 thumbnail), else 4 (int8 embedding, kind 1 thumbnail), else 3 (small hiding models, e.g.
    1,620 bits for a 128-d embedding). For a 128-d embedding versions 4 and 5 have the same length."""
    for version in (5, 4):
        if capacity_bits >= minimum_capacity_bits(embedding_dim, version):
            return version
    return 3


def _int_scale(emb: np.ndarray, top: int) -> np.float16:
    """The float16 scale of versions 2 to 5: the smallest float16 >= max|x| / top that keeps every |x| / scale
    within top + 1/2 (so rounding never leaves the symmetric range [-top, top]); top is 127 (int8) or 7 (int4)."""
    peak = float(np.max(np.abs(emb.astype(np.float64)))) if emb.size else 0.0
    scale = np.float16(peak / top)
    while float(scale) * (top + 0.5) < peak:
        scale = np.nextafter(scale, np.float16(np.inf))
    return scale


def _scaled_ints(emb: np.ndarray, version: int) -> tuple[np.float16, np.ndarray]:
    """(scale, values) of an embedding: q = round(x / scale) clipped to [-top, top], top 127 for versions 2 to 4
    (int8), 7 for version 5 (int4)."""
    top = 7 if version >= 5 else 127
    emb = np.asarray(emb, dtype=np.float64)
    scale = _int_scale(emb, top)
    q = np.rint(emb / float(scale)) if scale else np.zeros(emb.shape)
    return scale, np.clip(q, -top, top).astype(np.int8)


def _pack_int4(q: np.ndarray) -> bytes:
    """Version 5's values q in [-7, 7] as nibbles q + 8, two per byte, the first in the high nibble; an odd
    count ends with a zero low nibble."""
    nib = (q.astype(np.int64) + 8).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return ((nib[0::2] << 4) | nib[1::2]).astype(np.uint8).tobytes()


def _unpack_int4(data: bytes, dim: int) -> np.ndarray:
    raw = np.frombuffer(data, np.uint8)
    nib = np.stack([raw >> 4, raw & 15], axis=1).ravel()
    if nib.size > dim and np.any(nib[dim:]):
        raise PayloadError("authenticated version 5 payload has a non-zero padding nibble")
    q = nib[:dim].astype(np.int64)
    if np.any(q == 0):
        raise PayloadError("authenticated version 5 payload has an int4 value outside [-7, 7]")
    return q - 8


def quantize(embedding, format_version: int = FORMAT_VERSION) -> np.ndarray:
    """Exactly the embedding that ``decode`` returns for ``embedding`` in this format: float16 values
    (version 1) or float32 values q * scale (versions 2 to 4: int8, error at most scale / 2: max|x| / 254;
    version 5: int4, error at most max|x| / 14; or 2^-25 for vectors so small that float16 holds no smaller
    scale)."""
    _check_version(format_version)
    emb = np.asarray(embedding, dtype=np.float64)
    if format_version == 1:
        return emb.astype(np.float16)
    scale, q = _scaled_ints(emb, format_version)
    return q.astype(np.float32) * np.float32(scale)


@dataclass(frozen=True)
class PayloadContext:
    """Where a payload belongs. All of it is bound into the ciphertext; none of it is secret.

    dataset_id: the job's ``dataset.id``; shard: shard name as written in the manifest; sample_key: the
    sample's key as published in the output shard; face_index: the face's index in the manifest's face
    order; model_id: id of the hiding model (its capacity and training fix the layout); seed: job seed.
    """

    dataset_id: str
    shard: str
    sample_key: str
    face_index: int
    model_id: str
    seed: int

    def __post_init__(self):
        for name in ("dataset_id", "shard", "sample_key", "model_id"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise PayloadError(f"PayloadContext.{name} must be a non-empty string, got {v!r}")
        if not isinstance(self.face_index, int) or not 0 <= self.face_index < 2**32:
            raise PayloadError(f"PayloadContext.face_index must be an int in [0, 2^32), got {self.face_index!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise PayloadError(f"PayloadContext.seed must be an int in [0, 2^64), got {self.seed!r}")


@dataclass(frozen=True)
class PayloadLayout:
    """How one payload fills ``capacity_bits`` bits; a pure function of (capacity, embedding dim, format).

    capacity_bits: number of bits the hiding model carries per face; embedding_dim: length of the identity
    embedding (128 for the dlib-based prior, 512 for ArcFace); format_version: what new payloads are written in
    (``writing_version``: 5, or 4 or 3 where the capacity is too small), or 4, 3, 2, 1 to read payloads
    written before (run.json's ``payload.layout.format_version`` says which).
    """

    capacity_bits: int
    embedding_dim: int
    format_version: int = FORMAT_VERSION
    ciphertext_bytes: int = field(init=False)
    copies: int = field(init=False)  # the largest odd r with capacity // (8 r) >= minimum stream length
    codewords: tuple[tuple[int, int], ...] = field(init=False)  # (n, k) per RS codeword
    stream_bytes: int = field(init=False)

    def __post_init__(self):
        c_bits, dim, version = self.capacity_bits, self.embedding_dim, self.format_version
        _check_version(version)
        if not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
            raise PayloadError(f"embedding_dim must be an int in [1, {MAX_DIM}], got {dim!r}")
        if not isinstance(c_bits, int) or c_bits < 8 * _min_stream_bytes(dim, version):
            raise PayloadError(
                f"capacity of {c_bits!r} bits is too small for a {dim}-d payload of format version {version}: it "
                f"needs at least {minimum_capacity_bits(dim, version)} bits (use a hiding model with more capacity "
                "or a shorter embedding)"
            )
        if version >= MASKED_FROM_VERSION and c_bits > MAX_MASK_BITS:
            raise PayloadError(f"capacity of {c_bits} bits exceeds the {MAX_MASK_BITS} bits that format version "
                               f"{version}'s mask covers (one HKDF-SHA256 expansion); a model carrying more needs a "
                               "payload format with a longer mask (runs use the current format; set "
                               "anonymizer.payload: irreversible to run it without recovery)")
        k_total, l_min = _ciphertext_bytes(dim, version), _min_stream_bytes(dim, version)
        r = 1
        while c_bits // (8 * (r + 2)) >= l_min:
            r += 2
        length = c_bits // (8 * r)
        n_cw = -(-length // RS_MAX_N)
        ns, ks = _split(length, n_cw), _split(k_total, n_cw)
        if any(n - k < MIN_PARITY for n, k in zip(ns, ks)):
            # one codeword more would leave too little parity each: keep full-length codewords instead and
            # let the spare bytes become extra copies (length >= minimum guarantees n_cw - 1 suffices)
            n_cw -= 1
            length = RS_MAX_N * n_cw
            ns, ks = _split(length, n_cw), _split(k_total, n_cw)
        assert all(n - k >= MIN_PARITY and n <= RS_MAX_N for n, k in zip(ns, ks)), (ns, ks)
        object.__setattr__(self, "ciphertext_bytes", k_total)
        object.__setattr__(self, "copies", r)
        object.__setattr__(self, "codewords", tuple(zip(ns, ks)))
        object.__setattr__(self, "stream_bytes", length)

    # -- derived figures (all documented in schemas/payload.md) --

    @property
    def plaintext_bytes(self) -> int:
        return _plaintext_bytes(self.embedding_dim, self.format_version)

    @property
    def min_copies(self) -> int:
        """Copies of the least-repeated stream bit (the first capacity mod 8L bits get one more)."""
        return self.capacity_bits // (8 * self.stream_bytes)

    @property
    def correctable_symbols(self) -> tuple[int, ...]:
        return tuple((n - k) // 2 for n, k in self.codewords)

    @property
    def guaranteed_bit_errors(self) -> int:
        """Any pattern of at most this many flipped bits decodes (errors-only RS on hard decisions).

        A symbol goes wrong only when some bit's copies are at least half flipped (a tie may decide
        wrongly), and a codeword fails only with more than t wrong symbols.
        """
        per_symbol = -(-self.min_copies // 2)
        return (min(self.correctable_symbols) + 1) * per_symbol - 1

    def failure_probability(self, ber: float) -> float:
        """P(decoding fails) for independent bit flips at rate ``ber``, hard majority decisions, errors-only
        RS (soft input and erasure decoding only do better)."""

        def wrong_bit(m: int) -> float:
            s = sum(math.comb(m, j) * ber**j * (1 - ber) ** (m - j) for j in range(m // 2 + 1, m + 1))
            if m % 2 == 0:  # a tie decides at random
                s += 0.5 * math.comb(m, m // 2) * (ber * (1 - ber)) ** (m // 2)
            return s

        m = self.min_copies
        extra = self.capacity_bits - 8 * self.stream_bytes * m  # bits with m + 1 copies
        frac = extra / (8 * self.stream_bytes)
        p_bit = (1 - frac) * wrong_bit(m) + frac * wrong_bit(m + 1)
        p_sym = 1 - (1 - p_bit) ** 8
        ok = 1.0
        for (n, k), t in zip(self.codewords, self.correctable_symbols):
            ok *= sum(math.comb(n, j) * p_sym**j * (1 - p_sym) ** (n - j) for j in range(t + 1))
        return 1.0 - ok

    def random_ber_limit(self, failure_probability: float = 1e-3) -> float:
        """Raw bit error rate (independent flips) at which decoding fails with the given probability."""
        lo, hi = 0.0, 0.5
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.failure_probability(mid) < failure_probability else (lo, mid)
        return lo

    def describe(self) -> dict:
        """Public figures of this layout, e.g. for run.json (no secrets)."""
        return {
            "format_version": self.format_version,
            "capacity_bits": self.capacity_bits,
            "embedding_dim": self.embedding_dim,
            "plaintext_bytes": self.plaintext_bytes,
            "ciphertext_bytes": self.ciphertext_bytes,
            "rs_codewords": [list(nk) for nk in self.codewords],
            "stream_bytes": self.stream_bytes,
            "copies_min": self.min_copies,
            "correctable_symbols_per_codeword": list(self.correctable_symbols),
            "guaranteed_bit_errors": self.guaranteed_bit_errors,
            "random_ber_limit_1e-3": round(self.random_ber_limit(1e-3), 4),
            "code_rate": round(8 * self.plaintext_bytes / self.capacity_bits, 4),
        }

    @functools.cached_property
    def _interleave(self) -> list[np.ndarray]:
        # stream byte order: symbol 0 of every codeword, then symbol 1 of every codeword, ... so that a burst
        # of damaged bits is shared out among the codewords
        order = [(j, i) for i in range(self.codewords[0][0]) for j, (n, _) in enumerate(self.codewords) if i < n]
        pos = [np.empty(n, dtype=np.int64) for n, _ in self.codewords]
        for s, (j, i) in enumerate(order):
            pos[j][i] = s
        return pos


@dataclass(frozen=True)
class DecodeResult:
    """Outcome for one face. ``embedding`` (``quantize``'s values: float32 for versions 2 to 5, float16 for version 1)
    and, from version 4, ``thumbnail`` (the original face's, ``pipeline.thumbnail``) are set only when ok; they
    never appear in repr().

    status: "ok", "uncorrectable" (too many bit errors for the RS code), "authentication_failed" (wrong key,
    modified image, or a payload that belongs to another face, sample, shard, dataset, model or seed).
    raw_ber: fraction of the capacity bits whose own hard decision was wrong. Exact (raw_ber_exact) when RS
    decoding succeeded; otherwise estimated from disagreeing copies (None with a single copy).
    corrected_symbols: symbols changed by RS decoding, total (symbol_errors: per codeword).
    """

    ok: bool
    status: str
    message: str
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)
    thumbnail: bytes | None = field(default=None, repr=False, compare=False)  # versions 4 and 5, when ok
    thumbnail_kind: int | None = None  # its kind (pipeline.thumbnail): 1 in version 4, 2 in version 5
    raw_ber: float | None = None
    raw_ber_exact: bool = False
    corrected_symbols: int | None = None
    symbol_errors: tuple[int, ...] | None = None
    correctable_symbols: tuple[int, ...] = ()
    erased_symbols: int = 0


def _aad(ctx: PayloadContext, layout: PayloadLayout) -> bytes:
    return (
        b"g2face-pipe/payload"
        + layout.format_version.to_bytes(1, "big")
        + layout.capacity_bits.to_bytes(4, "big")
        + layout.embedding_dim.to_bytes(2, "big")
        + _lp(ctx.dataset_id)
        + _lp(ctx.shard)
        + _lp(ctx.sample_key)
        + ctx.face_index.to_bytes(4, "big")
        + _lp(ctx.model_id)
    )


def _nonce(key: ShardKey, ctx: PayloadContext) -> bytes:
    msg = ctx.seed.to_bytes(8, "big") + _lp(ctx.sample_key) + ctx.face_index.to_bytes(4, "big")
    return hmac.new(key.derive(b"payload/v1/nonce"), msg, hashlib.sha256).digest()[:NONCE_BYTES]


def _check_key(key: ShardKey, ctx: PayloadContext) -> None:
    if not isinstance(key, ShardKey):
        raise PayloadError(f"key must be a pipeline.keys.ShardKey (from load_shard_key), got {type(key).__name__}")
    if (key.dataset_id, key.shard) != (ctx.dataset_id, ctx.shard):
        raise PayloadError(
            f"{key!r} opens dataset {key.dataset_id!r} shard {key.shard!r}, but the payload context is dataset "
            f"{ctx.dataset_id!r} shard {ctx.shard!r}; load the key with load_shard_key(path, dataset_id, shard)"
        )


def _mask(key: ShardKey, ctx: PayloadContext, layout: PayloadLayout) -> np.ndarray | None:
    """Version 3's per-face mask over the capacity bits (0/1 uint8), None for earlier versions. Without it
    anyone could run the public RS parity check (or compare the copies) on the bits a public extractor reads,
    and tell a face carrying a payload from one carrying random bits."""
    if layout.format_version < MASKED_FROM_VERSION:
        return None
    info = (b"g2face-pipe/payload-mask" + _lp(ctx.dataset_id) + _lp(ctx.shard) + ctx.seed.to_bytes(8, "big")
            + _lp(ctx.sample_key) + ctx.face_index.to_bytes(4, "big") + layout.capacity_bits.to_bytes(4, "big"))
    stream = HKDFExpand(hashes.SHA256(), -(-layout.capacity_bits // 8), info).derive(key.derive(b"payload/v3/mask"))
    return np.unpackbits(np.frombuffer(stream, np.uint8))[: layout.capacity_bits]


@functools.lru_cache(maxsize=None)
def _rs(nsym: int) -> reedsolo.RSCodec:
    return reedsolo.RSCodec(nsym, nsize=RS_MAX_N)


def encode(embedding, ctx: PayloadContext, key: ShardKey, layout: PayloadLayout,
           thumbnail: bytes | None = None) -> np.ndarray:
    """The payload bits of one face: uint8 array of 0/1, shape (layout.capacity_bits,).

    thumbnail: the face's thumbnail of the layout's kind (``THUMBNAIL_FORMS``, made by
    ``pipeline.thumbnail.encode_thumbnails``); required by versions 4 and 5, refused by earlier versions.
    Deterministic: the same inputs always give the same bits.
    """
    _check_key(key, ctx)
    version = layout.format_version
    if version >= THUMBNAIL_FROM_VERSION:
        kind, size = THUMBNAIL_FORMS[version]
        if not isinstance(thumbnail, (bytes, bytearray)) or len(thumbnail) != size:
            raise PayloadError(f"format version {version} carries a {size}-byte face thumbnail of kind {kind}; got "
                               f"{type(thumbnail).__name__ if thumbnail is None else len(thumbnail)} "
                               f"(pipeline.thumbnail.encode_thumbnails(crops, {kind}) makes it from the aligned "
                               "original crop)")
    elif thumbnail is not None:
        raise PayloadError(f"format version {version} carries no thumbnail")
    emb = np.asarray(embedding)
    if emb.shape != (layout.embedding_dim,):
        raise PayloadError(f"embedding has shape {emb.shape}; this layout carries ({layout.embedding_dim},)")
    if not np.issubdtype(emb.dtype, np.floating) or not np.all(np.isfinite(emb)):
        raise PayloadError("embedding must be finite floating-point values")
    with np.errstate(over="ignore"):
        half = emb.astype("<f2")
    if not np.all(np.isfinite(half)):
        raise PayloadError("embedding has values beyond the float16 range (|x| > 65504); normalise it first")
    header = bytes([version, ELEMENT_TYPE[version]]) + layout.embedding_dim.to_bytes(2, "big")
    if version == 1:
        plaintext = header + half.tobytes()
    else:
        scale, q = _scaled_ints(emb, version)
        values = _pack_int4(q) if version >= 5 else q.tobytes()
        plaintext = header + np.array([scale], dtype="<f2").tobytes() + values
        if version >= THUMBNAIL_FROM_VERSION:
            plaintext += bytes([THUMBNAIL_FORMS[version][0]]) + bytes(thumbnail)
    assert len(plaintext) == layout.plaintext_bytes
    ct = AESGCMSIV(key.derive(b"payload/v1/aead")).encrypt(_nonce(key, ctx), plaintext, _aad(ctx, layout))
    assert len(ct) == layout.ciphertext_bytes
    stream = np.empty(layout.stream_bytes, dtype=np.uint8)
    start = 0
    for (n, k), pos in zip(layout.codewords, layout._interleave):
        cw = _rs(n - k).encode(ct[start : start + k])
        assert len(cw) == n
        stream[pos] = np.frombuffer(bytes(cw), dtype=np.uint8)
        start += k
    bits = np.unpackbits(stream)  # MSB first
    bits = bits[np.arange(layout.capacity_bits) % bits.size]
    mask = _mask(key, ctx, layout)
    return bits if mask is None else bits ^ mask


def _as_logits(received, capacity: int) -> np.ndarray:
    if hasattr(received, "detach"):  # a torch tensor from the extractor
        received = received.detach().cpu().numpy()
    x = np.asarray(received)
    if x.size != capacity:
        raise PayloadError(f"received {x.size} values (shape {x.shape}); this layout has {capacity} bits")
    x = x.reshape(-1)
    if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 1):
            raise PayloadError("integer input must be bits (0/1); pass floating-point logits otherwise")
        return np.where(x.astype(bool), 1.0, -1.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise PayloadError(f"received values of dtype {x.dtype}; expected bits (bool/int) or logits (float)")
    x = x.astype(np.float64)
    return np.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6)  # a NaN logit says nothing: weight 0


def _rs_decode(received: bytes, nsym: int, reliability: np.ndarray) -> tuple[bytes | None, int]:
    """Errors-only first; then generalised-minimum-distance tries that erase the least reliable symbols."""
    rs = _rs(nsym)
    try:
        return bytes(rs.decode(bytearray(received))[1]), 0
    except (reedsolo.ReedSolomonError, ValueError, IndexError, ZeroDivisionError):
        pass
    if reliability.max() <= reliability.min():
        return None, 0  # all symbols equally (un)reliable: erasing some would only lose information
    order = np.argsort(reliability, kind="stable")
    max_f = nsym - GMD_SPARE
    for f in sorted({-(-max_f * i // GMD_STEPS) for i in range(1, GMD_STEPS + 1)}):
        erase = [int(p) for p in order[:f] if reliability[p] < reliability.max()]
        if not erase:
            continue
        try:
            return bytes(rs.decode(bytearray(received), erase_pos=erase)[1]), len(erase)
        except (reedsolo.ReedSolomonError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None, 0


def decode(received, ctx: PayloadContext, key: ShardKey, layout: PayloadLayout, *, hard: bool = False) -> DecodeResult:
    """Recover one face's embedding from its extracted bits or bit logits.

    received: capacity_bits values; bool/integer arrays are bits, floating-point arrays are logits
    (positive means 1; the larger |logit|, the surer), torch tensors are accepted. hard: decide each
    received bit on its own before combining copies (ignores soft information; for comparison).
    """
    _check_key(key, ctx)
    x = _as_logits(received, layout.capacity_bits)
    if hard:
        x = np.where(x > 0, 1.0, -1.0)
    mask = _mask(key, ctx, layout)
    if mask is not None:  # a masked 1 reads as 0: flip those logits back (errors stay where they were)
        x = np.where(mask.astype(bool), -x, x)
    n_stream_bits = 8 * layout.stream_bytes
    where = np.arange(layout.capacity_bits) % n_stream_bits
    combined = np.bincount(where, weights=x, minlength=n_stream_bits)
    stream = np.packbits(combined > 0)
    reliability = np.abs(combined).reshape(-1, 8).min(axis=1)  # a symbol is as sure as its weakest bit
    own = x > 0  # each received bit's own hard decision, for the raw BER
    t = layout.correctable_symbols

    parts, errors, erased = [], [], 0
    for j, ((n, k), pos) in enumerate(zip(layout.codewords, layout._interleave)):
        recv = stream[pos].tobytes()
        cw, n_erased = _rs_decode(recv, n - k, reliability[pos])
        if cw is None:
            ber = None
            if layout.min_copies >= 2:  # two copies of a bit disagree with probability 2p(1-p)
                d = float(np.mean(own[: n_stream_bits] != own[n_stream_bits : 2 * n_stream_bits]))
                ber = (1 - math.sqrt(max(0.0, 1 - 2 * d))) / 2
            return DecodeResult(
                ok=False,
                status="uncorrectable",
                message=(
                    f"uncorrectable: too many bit errors (RS codeword {j + 1} of {len(layout.codewords)} has more "
                    f"than {t[j]} wrong symbols); the face is too degraded or carries no payload of this layout"
                    + ("; or, the bits being masked under the key, a wrong key or a payload that belongs to another "
                       "face, sample, shard, dataset or seed" if mask is not None else "")
                ),
                raw_ber=ber,
                correctable_symbols=t,
            )
        erased += n_erased
        errors.append(int(np.count_nonzero(np.frombuffer(recv, np.uint8) != np.frombuffer(cw, np.uint8))))
        parts.append(cw[:k])
        stream[pos] = np.frombuffer(cw, dtype=np.uint8)

    corrected_bits = np.unpackbits(stream)[where]
    raw_ber = float(np.mean(corrected_bits.astype(bool) != own))
    common = dict(
        raw_ber=raw_ber,
        raw_ber_exact=True,
        corrected_symbols=sum(errors),
        symbol_errors=tuple(errors),
        correctable_symbols=t,
        erased_symbols=erased,
    )
    try:
        plaintext = AESGCMSIV(key.derive(b"payload/v1/aead")).decrypt(_nonce(key, ctx), b"".join(parts), _aad(ctx, layout))
    except InvalidTag:
        return DecodeResult(
            ok=False,
            status="authentication_failed",
            message=(
                "authentication failed: wrong key or modified image (or the payload belongs to another face, "
                "sample, shard, dataset, model or seed)"
            ),
            **common,
        )
    version = layout.format_version
    header = (version, ELEMENT_TYPE[version], layout.embedding_dim)
    got = (plaintext[0], plaintext[1], int.from_bytes(plaintext[2:4], "big"))
    if got != header or len(plaintext) != layout.plaintext_bytes:
        # authenticated yet inconsistent: only a writer of another format version could produce this
        raise PayloadError(f"authenticated payload has header {got}, expected {header}; format version mismatch")
    body = plaintext[HEADER_BYTES:]
    thumbnail = kind = None
    if version == 1:
        embedding = np.frombuffer(body, dtype="<f2").astype(np.float16)
    else:
        dim, end = layout.embedding_dim, _embedding_bytes(layout.embedding_dim, version)
        scale = np.frombuffer(body[:2], dtype="<f2")[0]
        q = _unpack_int4(body[2:end], dim) if version >= 5 else np.frombuffer(body[2:end], dtype=np.int8)
        embedding = q.astype(np.float32) * np.float32(scale)
        if version >= THUMBNAIL_FROM_VERSION:
            kind = THUMBNAIL_FORMS[version][0]
            if body[end] != kind:
                raise PayloadError(f"authenticated payload has thumbnail kind {body[end]}, expected {kind}")
            thumbnail = bytes(body[end + 1 :])
    return DecodeResult(ok=True, status="ok", message="ok", embedding=embedding, thumbnail=thumbnail,
                        thumbnail_kind=kind, **common)
