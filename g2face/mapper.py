"""Dummy-identity generator (noise -> identity embedding) and latent mapper (identity + geometry -> w+)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .stylegan2 import fused_leaky_relu


def pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale each row to unit root-mean-square."""
    return x * torch.rsqrt(x.square().mean(1, keepdim=True) + eps)


class DummyIdentityGenerator(nn.Module):
    """Maps Gaussian noise to a synthetic identity embedding (the "dummy ID").

    Linear -> leaky ReLU 0.2 -> Linear -> leaky ReLU 0.2 -> normalisation.

    Args:
        noise_dim: size of the input noise.
        hidden_dim: width of the hidden layer.
        identity_dim: size of the produced embedding.
        norm: ``batchnorm`` (official: batch statistics while training, running statistics in eval) or
            ``layernorm`` (per sample, so dummies never depend on their batch mates).
    """

    def __init__(self, noise_dim: int, hidden_dim: int, identity_dim: int, norm: str = "batchnorm"):
        super().__init__()
        if norm not in ("batchnorm", "layernorm"):
            raise ValueError(f"norm must be 'batchnorm' or 'layernorm', got {norm!r}")
        self.noise_dim, self.identity_dim = noise_dim, identity_dim
        self.layers = nn.Sequential(
            nn.Linear(noise_dim, hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, identity_dim),
            nn.LeakyReLU(0.2),
            nn.BatchNorm1d(identity_dim) if norm == "batchnorm" else nn.LayerNorm(identity_dim),
        )

    def forward(self, z: Tensor) -> Tensor:
        assert z.ndim == 2 and z.shape[1] == self.noise_dim, (z.shape, self.noise_dim)
        return self.layers(z)


class MapperLinear(nn.Module):
    """Equalised-lr linear layer with biased leaky ReLU.

    Args:
        in_dim, out_dim: sizes.
        lr_mul: learning-rate multiplier (weights stored divided by it, scaled back at run time).
        doubled_bias: add the bias both in the linear op and in the activation (the official mapper's
            quirk; the released weights were trained that way).
    """

    def __init__(self, in_dim: int, out_dim: int, lr_mul: float, doubled_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.scale, self.lr_mul, self.doubled_bias = lr_mul / math.sqrt(in_dim), lr_mul, doubled_bias

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.lr_mul
        out = F.linear(x, self.weight * self.scale, bias if self.doubled_bias else None)
        return fused_leaky_relu(out, bias)


class LatentMapper(nn.Module):
    """Identity embedding + geometry coefficients -> w+ through low/middle/high branches.

    The concatenation [identity, geometry] is pixel-normalised and fed to three independent MLPs; the
    low branch fills the first (coarse) w+ rows, the middle the next, the high the last (finest).

    Args:
        identity_dim: size of the identity embedding.
        geometry_dim: size of the geometry coefficient vector.
        style_dim: width of a w+ row.
        n_layers: layers per branch.
        lr_mul: learning-rate multiplier of every layer.
        doubled_bias: see ``MapperLinear``.
        style_split: w+ rows driven by the low, middle and high branch.
    """

    def __init__(self, identity_dim: int, geometry_dim: int, style_dim: int, n_layers: int, lr_mul: float,
                 doubled_bias: bool, style_split: Sequence[int]):
        super().__init__()
        self.identity_dim, self.geometry_dim, self.style_dim = identity_dim, geometry_dim, style_dim
        self.style_split = tuple(style_split)

        def branch() -> nn.ModuleList:
            dims = [identity_dim + geometry_dim] + [style_dim] * n_layers
            return nn.ModuleList([MapperLinear(a, b, lr_mul, doubled_bias) for a, b in zip(dims[:-1], dims[1:])])

        self.low, self.middle, self.high = branch(), branch(), branch()

    @property
    def n_latent(self) -> int:
        return sum(self.style_split)

    def forward(self, identity: Tensor, geometry: Tensor) -> Tensor:
        b = identity.shape[0]
        assert identity.shape == (b, self.identity_dim), (identity.shape, self.identity_dim)
        assert geometry.shape == (b, self.geometry_dim), (geometry.shape, self.geometry_dim)
        x = pixel_norm(torch.cat([identity, geometry], 1))
        rows = []
        for layers, count in zip((self.low, self.middle, self.high), self.style_split):
            h = x
            for layer in layers:
                h = layer(h)
            rows.append(h[:, None, :].expand(-1, count, -1))
        return torch.cat(rows, 1)
