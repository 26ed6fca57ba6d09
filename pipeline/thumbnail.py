"""The face thumbnail a version-4 payload carries: the original face's low frequencies, for the key holder.

Why: G2Face's recover pass re-synthesises the face from the anonymized one and the identity embedding the
payload carries, and gets the person's colouring and lighting only roughly right (shipped lite-128 on val:
PSNR 20.4 dB against the original crops). A coarse thumbnail of the original face region, encrypted with the
embedding, lets the key holder replace the recovered face's low frequencies with the original's: on 96 val
faces of the shipped model, PSNR 20.4 -> 26.3 dB and faces matching their original 0.59 -> 0.78, for 79
bytes of the 405 that lite-128 carries (scratch measurement; ``g2face-pipe evaluate`` gives the full figure).
Without the key the thumbnail is ciphertext like the rest of the payload.

Format (schemas/payload.md, section 2; kind ``THUMBNAIL_KIND``), on the aligned crop at the model's resolution R:

- region: the bounding box of the paste-back mask (``align.paste_mask(R) > 0``), rows [y0, y1), columns [x0, x1);
- colour: full-range BT.601 YCbCr (the JPEG one) of the crop's RGB in [0, 1];
- Y averaged over a 10 x 10 grid of the region, Cb and Cr over 4 x 4 (``torch.nn.functional.adaptive_avg_pool2d``
  bins), in float64;
- Y quantized to 5 bits, q = round(31 Y) clipped to [0, 31]; Cb and Cr to 4 bits around neutral,
  q = round(30 (C - 0.5)) + 8 clipped to [0, 15], so that grey (C = 0.5) is a level (q = 8); rounding
  ties to even; decoded as Y = q / 31 and C = 0.5 + (q - 8) / 30;
- packed most significant bit first: the 100 Y values row by row, then the 16 Cb, then the 16 Cr values
  (628 bits), then 4 zero bits: ``THUMBNAIL_BYTES`` = 79 bytes.

Applying it (``apply_thumbnails``): inside the region, each YCbCr plane of the recovered crop keeps its own
detail and takes the original's low frequencies: plane - up(pool(plane)) + up(thumbnail plane), where pool is
the same grid average and up is bicubic resizing to the region's size (align_corners=False); back to RGB and
clipped to [0, 1]. The crop is then pasted back through the mask as before, so only the face region changes.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from . import align
from .payload import THUMBNAIL_BYTES as _PAYLOAD_THUMBNAIL_BYTES
from .payload import THUMBNAIL_KIND as _PAYLOAD_THUMBNAIL_KIND

THUMBNAIL_KIND = 1
Y_GRID, C_GRID = 10, 4
Y_BITS, C_BITS = 5, 4
C_STEP, C_NEUTRAL = 1 / 30, 8  # chroma level q stands for 0.5 + (q - 8) / 30: grey is level 8
THUMBNAIL_BITS = Y_GRID * Y_GRID * Y_BITS + 2 * C_GRID * C_GRID * C_BITS
THUMBNAIL_BYTES = -(-THUMBNAIL_BITS // 8)
assert (THUMBNAIL_KIND, THUMBNAIL_BYTES) == (_PAYLOAD_THUMBNAIL_KIND, _PAYLOAD_THUMBNAIL_BYTES)  # the format's field

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


def encode_thumbnails(crops: torch.Tensor) -> list[bytes]:
    """The thumbnail bytes of each aligned original crop, (B, 3, R, R) in [0, 1] (any float dtype, any device)."""
    assert crops.ndim == 4 and crops.shape[1] == 3 and crops.shape[2] == crops.shape[3], crops.shape
    y0, y1, x0, x1 = face_region(crops.shape[-1])
    ycc = _ycc(crops.detach().to("cpu", torch.float64)[..., y0:y1, x0:x1])
    y = F.adaptive_avg_pool2d(ycc[:, :1], Y_GRID).flatten(1)
    c = F.adaptive_avg_pool2d(ycc[:, 1:], C_GRID).flatten(1)  # Cb's 16 values, then Cr's
    qy = torch.round(y * _levels(Y_BITS)).clamp(0, _levels(Y_BITS))
    qc = (torch.round((c - 0.5) / C_STEP) + C_NEUTRAL).clamp(0, _levels(C_BITS))
    out = []
    for fy, fc in zip(qy.to(torch.int64).numpy(), qc.to(torch.int64).numpy()):
        bits = np.concatenate([((fy[:, None] >> np.arange(Y_BITS - 1, -1, -1)) & 1).ravel(),
                               ((fc[:, None] >> np.arange(C_BITS - 1, -1, -1)) & 1).ravel()]).astype(np.uint8)
        out.append(np.packbits(bits).tobytes())  # packbits pads the last byte with zero bits
    assert all(len(b) == THUMBNAIL_BYTES for b in out)
    return out


def decode_thumbnail(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Y (10, 10) and CbCr (2, 4, 4) values in [0, 1] of one thumbnail."""
    if len(data) != THUMBNAIL_BYTES:
        raise ValueError(f"a thumbnail has {THUMBNAIL_BYTES} bytes, got {len(data)}")
    bits = np.unpackbits(np.frombuffer(data, np.uint8))[:THUMBNAIL_BITS].astype(np.int64)
    n_y = Y_GRID * Y_GRID * Y_BITS
    qy = bits[:n_y].reshape(-1, Y_BITS) @ (1 << np.arange(Y_BITS - 1, -1, -1))
    qc = bits[n_y:].reshape(-1, C_BITS) @ (1 << np.arange(C_BITS - 1, -1, -1))
    y = (qy / _levels(Y_BITS)).reshape(Y_GRID, Y_GRID)
    c = (0.5 + (qc - C_NEUTRAL) * C_STEP).reshape(2, C_GRID, C_GRID)
    return y, c


def apply_thumbnails(recovered: torch.Tensor, thumbnails: list[bytes]) -> torch.Tensor:
    """Recovered crops (B, 3, R, R) in [0, 1] with the face region's low frequencies taken from the thumbnails."""
    assert recovered.ndim == 4 and recovered.shape[1] == 3 and len(thumbnails) == recovered.shape[0], \
        (recovered.shape, len(thumbnails))
    y0, y1, x0, x1 = face_region(recovered.shape[-1])
    size = (y1 - y0, x1 - x0)
    decoded = [decode_thumbnail(t) for t in thumbnails]
    dt, dev = recovered.dtype if recovered.is_floating_point() else torch.float32, recovered.device
    ty = torch.tensor(np.stack([y for y, _ in decoded]), dtype=dt, device=dev)[:, None]
    tc = torch.tensor(np.stack([c for _, c in decoded]), dtype=dt, device=dev)
    ycc = _ycc(recovered[..., y0:y1, x0:x1].to(dt))

    def swap_low(plane: torch.Tensor, grid: int, target: torch.Tensor) -> torch.Tensor:
        up = lambda t: F.interpolate(t, size=size, mode="bicubic", align_corners=False)  # noqa: E731
        return plane - up(F.adaptive_avg_pool2d(plane, grid)) + up(target)

    region = torch.cat([swap_low(ycc[:, :1], Y_GRID, ty), swap_low(ycc[:, 1:], C_GRID, tc)], dim=1)
    out = recovered.to(dt).clone()
    out[..., y0:y1, x0:x1] = _rgb(region).clamp(0, 1)
    return out
