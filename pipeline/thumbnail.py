"""The face thumbnail a payload carries (kind 1 in version 4, kind 2 in version 5): the original face's low
frequencies, for the key holder.

Why: G2Face's recover pass re-synthesises the face from the anonymized one and the identity embedding the
payload carries, and gets the person's colouring and lighting only roughly right (shipped lite-128 on val:
PSNR 20.4 dB against the original crops). A coarse thumbnail of the original face region, encrypted with the
embedding, lets the key holder replace the recovered face's low frequencies with the original's: on 96 val
faces of the shipped model, PSNR 20.4 -> 26.3 dB and faces matching their original 0.59 -> 0.78, for 79
bytes of the 405 that lite-128 carries (scratch measurement; ``g2face-pipe evaluate`` gives the full figure).
Without the key the thumbnail is ciphertext like the rest of the payload.

Kind 2 (version 5, ``THUMBNAIL_KIND2``): a finer luma thumbnail, 143 bytes. The shipped model's recover pass
barely uses the identity embedding (on 153 val faces, quantizing it to 3 bits per value changed no figure),
so version 5 carries the embedding at 4 bits and spends the 64 bytes saved on luma: a 20 x 20 grid coded
by its DCT, the bits given to the coefficients that vary most across faces (``schemas/thumbnail_kind2.json``).
Scratch measurement, 306 val faces of the shipped model (aligned crops): faces matching their original after
recovery 0.846 (kind 1) -> 0.938 (kind 2), face-region PSNR 22.8 -> 23.7 dB.

Kind 1 format (schemas/payload.md, section 2a; ``THUMBNAIL_KIND``), on the aligned crop at the model's resolution R:

- region: the bounding box of the paste-back mask (``align.paste_mask(R) > 0``), rows [y0, y1), columns [x0, x1);
- colour: full-range BT.601 YCbCr (the JPEG one) of the crop's RGB in [0, 1];
- Y averaged over a 10 x 10 grid of the region, Cb and Cr over 4 x 4 (``torch.nn.functional.adaptive_avg_pool2d``
  bins), in float64;
- Y quantized to 5 bits, q = round(31 Y) clipped to [0, 31]; Cb and Cr to 4 bits around neutral,
  q = round(30 (C - 0.5)) + 8 clipped to [0, 15], so that grey (C = 0.5) is a level (q = 8); rounding
  ties to even; decoded as Y = q / 31 and C = 0.5 + (q - 8) / 30;
- packed most significant bit first: the 100 Y values row by row, then the 16 Cb, then the 16 Cr values
  (628 bits), then 4 zero bits: ``THUMBNAIL_BYTES`` = 79 bytes.

Kind 2 format (schemas/payload.md, section 2b): region and colour as kind 1; chroma exactly as kind 1 (Cb, Cr
on 4 x 4 grids, 4 bits, the same levels). Luma: the region's Y averaged over a 20 x 20 grid, transformed by the
orthonormal 2-D DCT-II (C = D Y D^T, D[k, n] = s_k cos(pi (2n + 1) k / 40), s_0 = sqrt(1/20), s_k = sqrt(2/20));
each coefficient (u, v) with b = bits[u][v] > 0 bits in the table is coded as the index
q = floor((C - mean) / step + 2^b / 2) clipped to [0, 2^b - 1] (table's mean and step), b bits most
significant first, coefficients in row-major (u, v) order (1,016 bits), then the 32 chroma values as kind 1
(128 bits): 1,144 bits, 143 bytes, no padding. Decoded: C = mean + (q + 1/2 - 2^b / 2) step (mean where
b = 0), Y = D^T C D clipped to [0, 1].

Applying it (``apply_thumbnails``): inside the region, each YCbCr plane of the recovered crop keeps its own
detail and takes the original's low frequencies: plane - up(pool(plane)) + up(thumbnail plane), where pool is
the same grid average (kind 2: 20 x 20 for Y) and up is bicubic resizing to the region's size (align_corners=False); back to RGB and
clipped to [0, 1]. The crop is then pasted back through the mask as before, so only the face region changes.
"""
from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

from . import align
from .payload import THUMBNAIL_FORMS as _PAYLOAD_THUMBNAIL_FORMS

THUMBNAIL_KIND, THUMBNAIL_KIND2 = 1, 2
Y_GRID, C_GRID = 10, 4
Y_BITS, C_BITS = 5, 4
C_STEP, C_NEUTRAL = 1 / 30, 8  # chroma level q stands for 0.5 + (q - 8) / 30: grey is level 8
THUMBNAIL_BITS = Y_GRID * Y_GRID * Y_BITS + 2 * C_GRID * C_GRID * C_BITS
THUMBNAIL_BYTES = -(-THUMBNAIL_BITS // 8)
Y2_GRID, Y2_BITS = 20, 1016  # kind 2's luma grid and the bits its coefficients get in all
THUMBNAIL_KIND2_BYTES = (Y2_BITS + 2 * C_GRID * C_GRID * C_BITS) // 8
BYTES = {THUMBNAIL_KIND: THUMBNAIL_BYTES, THUMBNAIL_KIND2: THUMBNAIL_KIND2_BYTES}
assert set(_PAYLOAD_THUMBNAIL_FORMS.values()) == set(BYTES.items())  # the payload format's fields

KIND2_TABLES = resources.files("schemas") / "thumbnail_kind2.json"  # packaged with the schemas (pyproject)
# sha256 of the file: the tables are part of payload format 5, so a changed file must stop encoding and decoding
KIND2_TABLES_SHA256 = "da92a35d4c0ccba36ddb9a5c33d4acd14aeaa5b89498701c317708d8f99390c8"

_TO_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_OFFSET = (0.0, 0.5, 0.5)


@functools.lru_cache(maxsize=8)
def face_region(resolution: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the bounding box of the paste-back mask of an R x R crop."""
    ys, xs = np.nonzero(align.paste_mask(resolution) > 0)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _ycc(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> full-range BT.601 YCbCr in [0, 1]."""
    m = torch.tensor(_TO_YCC, dtype=rgb.dtype, device=rgb.device)
    return torch.einsum("ij,bjhw->bihw", m, rgb) + torch.tensor(_OFFSET, dtype=rgb.dtype, device=rgb.device)[:, None, None]


def _rgb(ycc: torch.Tensor) -> torch.Tensor:
    m = torch.linalg.inv(torch.tensor(_TO_YCC, dtype=torch.float64)).to(ycc.dtype).to(ycc.device)
    return torch.einsum("ij,bjhw->bihw", m, ycc - torch.tensor(_OFFSET, dtype=ycc.dtype, device=ycc.device)[:, None, None])


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix D (n, n), float64: coefficients = D @ grid @ D.T."""
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d


@functools.lru_cache(maxsize=1)
def kind2_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bits int (20, 20), mean, step float64 (20, 20)) from ``schemas/thumbnail_kind2.json``, hash-checked."""
    raw = KIND2_TABLES.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    if sha != KIND2_TABLES_SHA256:
        raise RuntimeError(f"{KIND2_TABLES} has sha256 {sha}, not {KIND2_TABLES_SHA256}: the tables are part of payload "
                           "format 5 and must not change; reinstall g2face-pipe")
    doc = json.loads(raw)  # numbers parse as binary64
    bits = np.array(doc["bits"], np.int64)
    mean, step = np.array(doc["mean"], np.float64), np.array(doc["step"], np.float64)
    if (doc.get("kind"), doc.get("grid"), doc.get("luma_bits")) != (THUMBNAIL_KIND2, Y2_GRID, Y2_BITS) or not (
            bits.shape == mean.shape == step.shape == (Y2_GRID, Y2_GRID) and int(bits.sum()) == Y2_BITS
            and bits.min() >= 0 and bits.max() <= 8 and np.all(step[bits > 0] > 0)):
        raise RuntimeError(f"{KIND2_TABLES} does not hold kind 2 tables ({Y2_GRID} x {Y2_GRID}, {Y2_BITS} bits)")
    return bits, mean, step


def _check_kind(kind: int) -> None:
    if kind not in BYTES:
        raise ValueError(f"thumbnail kind must be one of {sorted(BYTES)}, got {kind!r}")


def _grids(crops: torch.Tensor, y_grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Region Y averaged over y_grid x y_grid (B, g, g) and CbCr over 4 x 4 (B, 2, 4, 4), float64."""
    assert crops.ndim == 4 and crops.shape[1] == 3 and crops.shape[2] == crops.shape[3], crops.shape
    y0, y1, x0, x1 = face_region(crops.shape[-1])
    ycc = _ycc(crops.detach().to("cpu", torch.float64)[..., y0:y1, x0:x1])
    return (F.adaptive_avg_pool2d(ycc[:, :1], y_grid)[:, 0].numpy(),
            F.adaptive_avg_pool2d(ycc[:, 1:], C_GRID).numpy())


def _msb_bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Each value written in its width of bits, most significant first, concatenated (0/1 uint8)."""
    return np.concatenate([(int(v) >> np.arange(w - 1, -1, -1)) & 1 for v, w in zip(values, widths)]
                          + [np.zeros(0, np.int64)]).astype(np.uint8)


def _read_msb(bits: np.ndarray, widths: np.ndarray) -> np.ndarray:
    ends = np.cumsum(widths)
    return np.array([int(bits[e - w : e] @ (1 << np.arange(w - 1, -1, -1))) if w else 0 for e, w in zip(ends, widths)],
                    np.int64)


def encode_thumbnails(crops: torch.Tensor, kind: int) -> list[bytes]:
    """The kind-``kind`` thumbnail bytes of each aligned original crop, (B, 3, R, R) in [0, 1] (any float dtype,
    any device)."""
    _check_kind(kind)
    y, c = _grids(crops, Y_GRID if kind == THUMBNAIL_KIND else Y2_GRID)
    qc = np.clip(np.round((c.reshape(len(c), -1) - 0.5) / C_STEP) + C_NEUTRAL, 0, _levels(C_BITS)).astype(np.int64)
    c_widths = np.full(qc.shape[1], C_BITS)
    out = []
    if kind == THUMBNAIL_KIND:
        qy = np.clip(np.round(y.reshape(len(y), -1) * _levels(Y_BITS)), 0, _levels(Y_BITS)).astype(np.int64)
        y_widths = np.full(qy.shape[1], Y_BITS)
    else:
        bits, mean, step = kind2_tables()
        d = dct_matrix(Y2_GRID)
        coef = d @ y @ d.T  # (B, 20, 20)
        levels = 2.0 ** bits
        safe = np.where(bits > 0, step, 1.0)
        q = np.clip(np.floor((coef - mean) / safe + levels / 2), 0, levels - 1).astype(np.int64)
        coded = bits.ravel() > 0
        qy, y_widths = q.reshape(len(q), -1)[:, coded], bits.ravel()[coded]
    for fy, fc in zip(qy, qc):
        stream = np.concatenate([_msb_bits(fy, y_widths), _msb_bits(fc, c_widths)])
        out.append(np.packbits(stream).tobytes())  # packbits pads the last byte with zero bits (kind 1)
    assert all(len(b) == BYTES[kind] for b in out)
    return out


def decode_thumbnail(data: bytes, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """Y (10, 10) for kind 1, (20, 20) for kind 2, and CbCr (2, 4, 4) values in [0, 1] of one thumbnail."""
    _check_kind(kind)
    if len(data) != BYTES[kind]:
        raise ValueError(f"a kind {kind} thumbnail has {BYTES[kind]} bytes, got {len(data)}")
    stream = np.unpackbits(np.frombuffer(data, np.uint8)).astype(np.int64)
    if kind == THUMBNAIL_KIND:
        n_y = Y_GRID * Y_GRID * Y_BITS
        y = (_read_msb(stream[:n_y], np.full(Y_GRID * Y_GRID, Y_BITS)) / _levels(Y_BITS)).reshape(Y_GRID, Y_GRID)
    else:
        bits, mean, step = kind2_tables()
        n_y = Y2_BITS
        coded = bits.ravel() > 0
        q = np.zeros(Y2_GRID * Y2_GRID, np.int64)
        q[coded] = _read_msb(stream[:n_y], bits.ravel()[coded])
        q = q.reshape(Y2_GRID, Y2_GRID)
        coef = np.where(bits > 0, mean + (q + 0.5 - 2.0 ** bits / 2) * step, mean)
        d = dct_matrix(Y2_GRID)
        y = np.clip(d.T @ coef @ d, 0.0, 1.0)
    qc = _read_msb(stream[n_y : n_y + 2 * C_GRID * C_GRID * C_BITS], np.full(2 * C_GRID * C_GRID, C_BITS))
    c = (0.5 + (qc - C_NEUTRAL) * C_STEP).reshape(2, C_GRID, C_GRID)
    return y, c


def apply_thumbnails(recovered: torch.Tensor, thumbnails: list[bytes], kind: int) -> torch.Tensor:
    """Recovered crops (B, 3, R, R) in [0, 1] with the face region's low frequencies taken from their
    kind-``kind`` thumbnails."""
    assert recovered.ndim == 4 and recovered.shape[1] == 3 and len(thumbnails) == recovered.shape[0], \
        (recovered.shape, len(thumbnails))
    y0, y1, x0, x1 = face_region(recovered.shape[-1])
    size = (y1 - y0, x1 - x0)
    decoded = [decode_thumbnail(t, kind) for t in thumbnails]
    dt, dev = recovered.dtype if recovered.is_floating_point() else torch.float32, recovered.device
    ty = torch.tensor(np.stack([y for y, _ in decoded]), dtype=dt, device=dev)[:, None]
    tc = torch.tensor(np.stack([c for _, c in decoded]), dtype=dt, device=dev)
    ycc = _ycc(recovered[..., y0:y1, x0:x1].to(dt))

    def swap_low(plane: torch.Tensor, grid: int, target: torch.Tensor) -> torch.Tensor:
        up = lambda t: F.interpolate(t, size=size, mode="bicubic", align_corners=False)  # noqa: E731
        return plane - up(F.adaptive_avg_pool2d(plane, grid)) + up(target)

    region = torch.cat([swap_low(ycc[:, :1], ty.shape[-1], ty), swap_low(ycc[:, 1:], C_GRID, tc)], dim=1)
    out = recovered.to(dt).clone()
    out[..., y0:y1, x0:x1] = _rgb(region).clamp(0, 1)
    return out
