"""Where the payload bits live in the image: the face region of the aligned crop.

The pipeline pastes only an elliptical, feathered face region of each generated crop back into the
photo (``face_mask``); everything outside it is the original photo again. A payload bit that the
extractor reads outside that region is lost on paste-back, so a model with ``payload_region="face"``
places its bits only on extractor cells (half the crop resolution) where the mask averages at least
``FACE_CELL_THRESHOLD``, filling as many extractor planes as the bits need. ``"full"`` is the official
layout: bit t at plane t // s^2, row-major, over the whole crop.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

# The paste-back ellipse in crop units (centre, semi-axes) and its soft edge: the fraction of the
# radius over which the mask ramps from 1 to 0. Exactly zero outside the ellipse.
FACE_CENTER = (0.5, 0.53)
FACE_AXES = (0.37, 0.44)
FACE_FEATHER = 0.18
FACE_CELL_THRESHOLD = 0.75  # the blend keeps >= 75% of the generated pixel on every payload cell
REGIONS = ("full", "face")


@lru_cache(maxsize=8)
def face_mask(resolution: int) -> np.ndarray:
    """The paste-back mask (resolution, resolution), float32 in [0, 1], read-only (cached)."""
    ys, xs = np.mgrid[0:resolution, 0:resolution].astype(np.float64) + 0.5
    cx, cy = FACE_CENTER[0] * resolution, FACE_CENTER[1] * resolution
    ax, ay = FACE_AXES[0] * resolution, FACE_AXES[1] * resolution
    r = np.sqrt(((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2)
    t = np.clip((1.0 - r) / FACE_FEATHER, 0.0, 1.0)
    mask = (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep
    mask.setflags(write=False)
    return mask


def face_cells(resolution: int) -> np.ndarray:
    """Row-major indices of the extractor cells (resolution/2 square) inside the face region."""
    m = face_mask(resolution)
    s = resolution // 2
    cells = m.reshape(s, 2, s, 2).mean(axis=(1, 3))
    return np.flatnonzero(cells.reshape(-1) >= FACE_CELL_THRESHOLD)


def face_capacity_per_plane(resolution: int) -> int:
    return int(face_cells(resolution).size)


def grid_layout(resolution: int, payload_bits: int, region: str) -> tuple[int, Tensor]:
    """(grid bits, positions): the payload occupies ``positions`` (payload_bits,) of a flat grid of
    ``grid bits`` = planes * (resolution/2)^2 values, planes channel-major, each plane row-major."""
    if region not in REGIONS:
        raise ValueError(f"payload_region must be one of {REGIONS}, got {region!r}")
    if region == "full":
        return payload_bits, torch.arange(payload_bits)
    side = resolution // 2
    cells = torch.from_numpy(face_cells(resolution))
    planes = math.ceil(payload_bits / cells.numel())
    positions = (torch.arange(planes)[:, None] * side * side + cells[None, :]).reshape(-1)[:payload_bits]
    return planes * side * side, positions


def to_grid(bits: Tensor, grid_bits: int, positions: Tensor) -> Tensor:
    """(B, payload_bits) -> (B, grid_bits) with the payload at ``positions`` and 0 elsewhere."""
    if bits.shape[1] == grid_bits:  # the full layout: nothing to move
        return bits
    grid = bits.new_zeros(bits.shape[0], grid_bits)
    return grid.index_copy(1, positions.to(bits.device), bits)


def from_grid(grid: Tensor, positions: Tensor) -> Tensor:
    """(B, grid_bits) -> (B, payload_bits): the values at the payload's positions."""
    if grid.shape[1] == positions.numel():
        return grid
    return grid.index_select(1, positions.to(grid.device))
