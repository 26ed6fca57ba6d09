"""Password extractor (PE): image -> one logit per hidden payload bit.

1x1 stem -> two-branch blocks at full resolution -> 3x3 stride-2 head. The head's output planes,
read row-major channel by channel, are the payload bits in the order ``encoder.payload_planes`` uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _bn_act(x: Tensor, norm: nn.BatchNorm2d) -> Tensor:
    return F.leaky_relu(norm(x), 0.1)


class ExtractorBlock(nn.Module):
    """Concatenates branch A (1x1 reduce, 3x3 conv) and branch B (1x1 reduce); each conv has BN + lrelu 0.1.

    Args:
        width: input and output channels (each branch produces half).
    """

    def __init__(self, width: int):
        super().__init__()
        half = width // 2
        self.reduce_a = nn.Conv2d(width, half, 1)
        self.norm_a1 = nn.BatchNorm2d(half)
        self.conv_a = nn.Conv2d(half, half, 3, padding=1)
        self.norm_a2 = nn.BatchNorm2d(half)
        self.reduce_b = nn.Conv2d(width, half, 1)
        self.norm_b = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        a = _bn_act(self.conv_a(_bn_act(self.reduce_a(x), self.norm_a1)), self.norm_a2)
        b = _bn_act(self.reduce_b(x), self.norm_b)
        return torch.cat([a, b], 1)


class PasswordExtractor(nn.Module):
    """Reads the hidden payload back from an image.

    Args:
        resolution: input side in pixels.
        payload_bits: length of the payload grid to read (the model picks its payload's positions).
        width: trunk channels.
        blocks: number of ``ExtractorBlock``s.

    The head emits ``ceil(payload_bits / (resolution/2)^2)`` planes at half resolution; the first
    ``payload_bits`` values, flattened, are the logits.
    """

    def __init__(self, resolution: int, payload_bits: int, width: int = 128, blocks: int = 3):
        super().__init__()
        self.resolution, self.payload_bits = resolution, payload_bits
        depth = math.ceil(payload_bits / (resolution // 2) ** 2)
        self.stem = nn.Conv2d(3, width, 1)
        self.blocks = nn.Sequential(*[ExtractorBlock(width) for _ in range(blocks)])
        self.head = nn.Conv2d(width, depth, 3, stride=2, padding=1)

    def forward(self, image: Tensor) -> Tensor:
        assert image.shape[1:] == (3, self.resolution, self.resolution), image.shape
        x = F.leaky_relu(self.stem(image), 0.1)
        logits = self.head(self.blocks(x)).flatten(1)
        return logits[:, : self.payload_bits]
