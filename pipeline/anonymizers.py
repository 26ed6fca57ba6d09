"""Face anonymizers: a common batched interface over aligned crops.

Every method takes a batch of aligned faces ``(N, 3, R, R)`` float in [0, 1] plus one seed per face
and returns a batch of the same shape. ``blur`` and ``pixelate`` are real baselines (and the fallback
for faces too small for the model); ``g2face`` plugs in from the model library.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F


class FaceAnonymizer(Protocol):
    model_id: str
    resolution: int

    def setup(self, device: torch.device) -> None: ...

    def anonymize(self, faces: torch.Tensor, seeds: list[int]) -> torch.Tensor: ...


def gaussian_blur(faces: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding; sigma in pixels."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    radius = min(radius, faces.shape[-1] - 1)  # reflect padding must be smaller than the image
    x = torch.arange(-radius, radius + 1, dtype=faces.dtype, device=faces.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = faces.shape[1]
    out = F.pad(faces, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out


def pixelate(faces: torch.Tensor, blocks: int) -> torch.Tensor:
    """Average over a blocks x blocks grid, then nearest-neighbour back to full size."""
    small = F.adaptive_avg_pool2d(faces, blocks)
    return F.interpolate(small, size=faces.shape[-2:], mode="nearest")


class BlurAnonymizer:
    """Gaussian blur of the aligned crop.

    Args:
        resolution: side of the aligned crop in pixels.
        sigma_fraction: Gaussian sigma as a fraction of the crop side.
    """

    def __init__(self, resolution: int, sigma_fraction: float):
        self.resolution = resolution
        self.sigma = sigma_fraction * resolution
        self.model_id = f"blur-v1:sigma={sigma_fraction:g}@{resolution}"

    def setup(self, device: torch.device) -> None:
        self.device = device

    def anonymize(self, faces: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        _check_batch(faces, self.resolution, seeds)
        return gaussian_blur(faces, self.sigma).clamp(0, 1)


class PixelateAnonymizer:
    """Block averaging of the aligned crop.

    Args:
        resolution: side of the aligned crop in pixels.
        blocks: blocks across the crop (the face spans a bit over half of them).
    """

    def __init__(self, resolution: int, blocks: int):
        self.resolution = resolution
        self.blocks = blocks
        self.model_id = f"pixelate-v1:blocks={blocks}@{resolution}"

    def setup(self, device: torch.device) -> None:
        self.device = device

    def anonymize(self, faces: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        _check_batch(faces, self.resolution, seeds)
        return pixelate(faces, self.blocks)


def _check_batch(faces: torch.Tensor, resolution: int, seeds: list[int]) -> None:
    assert faces.ndim == 4 and faces.shape[1:] == (3, resolution, resolution), faces.shape
    assert len(seeds) == faces.shape[0], (len(seeds), faces.shape)


class AnonymizerUnavailable(RuntimeError):
    pass


def build_anonymizer(method: str, resolution: int, blur_sigma: float, pixelate_blocks: int, checkpoint: str | None,
                     official=None):
    """Build one anonymizer from plain values (the job spec is resolved by the caller).

    official: for g2face, the ``anonymizer.official`` paths (g2face, arcface, deep3d, bfm) when the job runs the
    official weights (``anonymizer.weights: official``); None runs ``checkpoint`` with the shipped priors.
    """
    if method == "blur":
        return BlurAnonymizer(resolution, blur_sigma)
    if method == "pixelate":
        return PixelateAnonymizer(resolution, pixelate_blocks)
    if method == "g2face":
        from .g2face_method import G2FaceAnonymizer, G2FaceUnavailable

        try:
            if official is not None:
                from .official import OfficialG2FaceAnonymizer

                return OfficialG2FaceAnonymizer(official.g2face, official.arcface, official.deep3d, official.bfm,
                                                resolution)
            return G2FaceAnonymizer(checkpoint, resolution)
        except G2FaceUnavailable as e:
            raise AnonymizerUnavailable(str(e)) from None
    raise ValueError(f"unknown anonymizer.method {method!r}; use g2face, blur or pixelate")


def anonymizer_for(an, method: str | None = None):
    """The anonymizer for ``method`` (default the job's own) of a job's ``anonymizer`` section, weights included."""
    method = method or an.method
    official = an.official if method == "g2face" and getattr(an, "weights", "shipped") == "official" else None
    return build_anonymizer(method, an.resolution, an.blur_sigma, an.pixelate_blocks, an.checkpoint, official)
