"""Face encoder, identity-aware feature fusion (IFF) and password-hiding injection.

The encoder turns the input face into one feature map per synthesis resolution. At every resolution
the fusion blends the generator's features with the encoder's through a learned mask that is per
channel and per pixel: ``F = M * F_gen + (1 - M) * F_enc``. Where the payload is hidden, two projections
of the payload bits enter there: one as extra mask input, one added after the blend, each scaled by a
per-channel gain that starts at zero (so an untrained hiding path leaves the image untouched).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .stylegan2 import FusedLeakyReLU

# ---------------------------------------------------------------------------------------------
# Plain functions


def norm_act(x: Tensor, activate: bool) -> Tensor:
    """Instance norm without affine parameters, then (optionally) leaky ReLU 0.2."""
    x = F.instance_norm(x, eps=1e-5)
    return F.leaky_relu(x, 0.2) if activate else x


def blend(mask: Tensor, generated: Tensor, encoded: Tensor, added: Tensor | None = None) -> Tensor:
    """IFF blend: mask selects generated features, 1 - mask the encoder's; ``added`` comes on top."""
    assert mask.shape == generated.shape == encoded.shape, (mask.shape, generated.shape, encoded.shape)
    out = mask * generated + (1 - mask) * encoded
    return out if added is None else out + added


def payload_planes(bits: Tensor, size: int) -> Tensor:
    """Lay flat payload bits (B, N) out as (B, ceil(N / size^2), size, size), row-major, zero-padded.

    Flat bit t lands at channel t // size^2, row (t // size) % size, column t % size, the official layout.
    """
    b, n = bits.shape
    depth = math.ceil(n / size**2)
    if depth * size**2 != n:
        bits = F.pad(bits, (0, depth * size**2 - n))
    return bits.reshape(b, depth, size, size)


# ---------------------------------------------------------------------------------------------
# Face encoder


class EncoderLevel(nn.Module):
    """Residual encoder block: (main + skip) / sqrt 2, instance-normalised convs with biases.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        downsample: halve the resolution with 4x4 stride-2 convs (else 3x3 stride-1 convs).
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool = True):
        super().__init__()
        k, s = (4, 2) if downsample else (3, 1)
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, k, s, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, k, s, 1)

    def forward(self, x: Tensor) -> Tensor:
        main = norm_act(self.conv2(norm_act(self.conv1(x), True)), True)
        return (main + norm_act(self.skip(x), False)) / math.sqrt(2.0)


class FaceEncoder(nn.Module):
    """Multi-scale face encoder: one feature map per synthesis resolution.

    Args:
        resolution: input side in pixels.
        channels: channels at 4, 8, ..., resolution px (the synthesis network's, so features blend).

    ``forward`` returns a list, full resolution first: level i has side ``resolution / 2**i``.
    """

    def __init__(self, resolution: int, channels: Sequence[int]):
        super().__init__()
        self.resolution, self.channels = resolution, tuple(channels)
        widths = self.channels[::-1]  # full resolution first
        self.levels = nn.ModuleList([EncoderLevel(3, widths[0], downsample=False)])
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            self.levels.append(EncoderLevel(c_in, c_out))

    def forward(self, image: Tensor) -> list[Tensor]:
        assert image.shape[1:] == (3, self.resolution, self.resolution), image.shape
        features, x = [], image
        for level in self.levels:
            x = level(x)
            features.append(x)
        assert features[-1].shape[-1] == 4, features[-1].shape
        return features


# ---------------------------------------------------------------------------------------------
# Identity-aware feature fusion


class FusionMask(nn.Module):
    """Per-channel, per-pixel blend mask: 1x1 conv over [generated, encoded, hidden] -> sigmoid.

    Args:
        channels: channels of the two feature maps being blended (and of the mask).
        hidden_channels: channels of the payload projection fed in too (0 where nothing is hidden).
        normalize: instance-normalise the logits first (official; every channel then mixes spatially).
    """

    def __init__(self, channels: int, hidden_channels: int = 0, normalize: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(2 * channels + hidden_channels, channels, 1)
        self.normalize = normalize

    def forward(self, generated: Tensor, encoded: Tensor, hidden: Tensor | None = None) -> Tensor:
        parts = [generated, encoded] if hidden is None else [generated, encoded, hidden]
        logits = self.conv(torch.cat(parts, 1))
        if self.normalize:
            logits = F.instance_norm(logits, eps=1e-5)
        return torch.sigmoid(logits)


class IdentityAwareFusion(nn.Module):
    """The IFF masks of all resolutions.

    Args:
        resolution: image side in pixels.
        channels: channels at 4, 8, ..., resolution px.
        hiding_resolutions: resolutions whose mask also sees a payload projection.
        normalize: see ``FusionMask``.

    ``masks[i]`` serves encoder level i (side ``resolution / 2**i``), as in the official checkpoint.
    """

    def __init__(self, resolution: int, channels: Sequence[int], hiding_resolutions: Sequence[int],
                 normalize: bool = True):
        super().__init__()
        self.resolution = resolution
        sides = [4 * 2**k for k in range(len(channels))][::-1]  # full resolution first
        self.masks = nn.ModuleList([
            FusionMask(c, c if side in hiding_resolutions else 0, normalize)
            for side, c in zip(sides, tuple(channels)[::-1])
        ])

    def level(self, side: int) -> int:
        return int(math.log2(self.resolution // side))

    def forward(self, generated: Tensor, encoded: Tensor, hidden_mask: Tensor | None = None,
                hidden_add: Tensor | None = None) -> Tensor:
        mask = self.masks[self.level(generated.shape[-1])](generated, encoded, hidden_mask)
        return blend(mask, generated, encoded, hidden_add)


# ---------------------------------------------------------------------------------------------
# Password hiding


class HidingProjection(nn.Module):
    """Payload planes -> feature-sized term: 1x1 conv, biased leaky ReLU, per-channel gain (init 0).

    Args:
        payload_depth: channels of the payload planes at this resolution.
        channels: channels of the features the term joins.
    """

    def __init__(self, payload_depth: int, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(payload_depth, channels, 1)
        self.activate = FusedLeakyReLU(channels)
        self.gain = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, planes: Tensor) -> Tensor:
        return self.gain * self.activate(self.conv(planes))


class PasswordHiding(nn.Module):
    """Two payload projections per hiding resolution: one into the fusion mask, one added to the blend.

    Args:
        payload_bits: length of the payload grid per face (``payload_layout.grid_layout``: the payload
            bits at their positions, zeros elsewhere).
        hiding_resolutions: the resolutions where the payload is injected.
        channels_at: feature channels at each of those resolutions (same order).
    """

    def __init__(self, payload_bits: int, hiding_resolutions: Sequence[int], channels_at: Sequence[int]):
        super().__init__()
        self.payload_bits = payload_bits
        self.resolutions = tuple(sorted(hiding_resolutions))
        order = sorted(range(len(hiding_resolutions)), key=lambda i: hiding_resolutions[i])
        widths = [channels_at[i] for i in order]
        depths = [math.ceil(payload_bits / r**2) for r in self.resolutions]
        self.to_mask = nn.ModuleList([HidingProjection(d, c) for d, c in zip(depths, widths)])
        self.to_features = nn.ModuleList([HidingProjection(d, c) for d, c in zip(depths, widths)])

    def forward(self, bits: Tensor, side: int) -> tuple[Tensor, Tensor]:
        """Returns (mask input, additive term) for features of this side; bits: (B, payload_bits) in {0, 1}."""
        assert bits.shape[1:] == (self.payload_bits,), (bits.shape, self.payload_bits)
        k = self.resolutions.index(side)
        planes = payload_planes(bits, side)
        return self.to_mask[k](planes), self.to_features[k](planes)
