"""Inception-v3 pool3 features and the Fréchet distance, for FID.

Two weight files are accepted, told apart by their classifier size:

- ``pytorch-fid``: ``pt_inception-2015-12-05-*.pth``, the TensorFlow graph FID was defined on, ported to
  PyTorch (1008 classes). That graph differs from torchvision's Inception-v3 in its pooling branches: the
  3x3 average pools of Mixed_5b..5d, Mixed_6b..6e and Mixed_7b leave the padding out of the mean, and
  Mixed_7c pools by maximum. Only this file (``is_fid_reference``: the layout and its sha256) gives numbers
  comparable with published FIDs.
- ``torchvision``: ``inception_v3_google-*.pth`` (ImageNet, 1000 classes), run with torchvision's own blocks.
  Its FIDs are self-consistent (e.g. to compare methods within one report) but not comparable with papers.

Both expect RGB resized bilinearly to 299x299 and scaled to [-1, 1] (torchvision's ``transform_input`` maps
its ImageNet normalisation onto that same range, so feeding [-1, 1] directly is equivalent).

The network is never trained here, so the weights are project-external and the user supplies the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

FEATURE_DIM = 2048
INPUT_SIDE = 299
FORMATS = {1008: "pytorch-fid", 1000: "torchvision"}
# pytorch-fid's reference file is pt_inception-2015-12-05-6726825d.pth; torch.hub names files by the start
# of their sha256, so this tells the reference weights from another file of the same layout.
REFERENCE_SHA256_PREFIX = "6726825d"


class InceptionWeightsError(ValueError):
    """The weights file is missing, unreadable, or not one of the two accepted Inception-v3 layouts."""


# ---------------------------------------------------------------------------------------------------------
# The FID graph's pooling branches. Each block keeps torchvision's submodules (so the parameter names and
# shapes are torchvision's) and only changes the pool applied before ``branch_pool``.


def _avg_pool_without_padding(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _FidBlockA(tv.InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_without_padding(x))]


class _FidBlockC(tv.InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_without_padding(x))]


class _FidBlockE(tv.InceptionE):
    pool = staticmethod(_avg_pool_without_padding)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return [self.branch1x1(x), b3, d, self.branch_pool(self.pool(x))]


class _FidBlockEMax(_FidBlockE):
    pool = staticmethod(_max_pool)


_FID_BLOCKS = {
    "Mixed_5b": _FidBlockA, "Mixed_5c": _FidBlockA, "Mixed_5d": _FidBlockA,
    "Mixed_6b": _FidBlockC, "Mixed_6c": _FidBlockC, "Mixed_6d": _FidBlockC, "Mixed_6e": _FidBlockC,
    "Mixed_7b": _FidBlockE, "Mixed_7c": _FidBlockEMax,
}


def _network(weights_format: str, aux_logits: bool) -> tv.Inception3:
    classes = 1008 if weights_format == "pytorch-fid" else 1000
    net = tv.inception_v3(weights=None, aux_logits=aux_logits, init_weights=False, num_classes=classes)
    if weights_format == "pytorch-fid":
        for name, cls in _FID_BLOCKS.items():
            getattr(net, name).__class__ = cls  # same submodules, only the pooling branch differs
    return net


class InceptionFeatures(nn.Module):
    """RGB in [0, 1], any size (N, 3, H, W) -> pool3 features (N, 2048), float32."""

    def __init__(self, net: tv.Inception3, weights_format: str, sha256: str = "") -> None:
        super().__init__()
        self.net = net
        self.weights_format = weights_format
        self.sha256 = sha256

    @property
    def is_fid_reference(self) -> bool:
        """The exact weights published FIDs are computed with."""
        return self.weights_format == "pytorch-fid" and self.sha256.startswith(REFERENCE_SHA256_PREFIX)

    def forward(self, rgb01: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(rgb01, size=(INPUT_SIDE, INPUT_SIDE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return x.mean(dim=(2, 3))


def _state_dict_of(obj, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InceptionWeightsError(f"{path}: not a state dict of tensors; give the .pth file of the weights")
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def weights_format_of(state: dict[str, torch.Tensor], path: str = "<state dict>") -> str:
    """'pytorch-fid' or 'torchvision', from the classifier's shape; anything else is refused."""
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2 or fc.shape[1] != FEATURE_DIM or fc.shape[0] not in FORMATS:
        shape = None if fc is None else tuple(fc.shape)
        raise InceptionWeightsError(
            f"{path}: fc.weight has shape {shape}; expected (1008, 2048) (pytorch-fid's pt_inception-2015-12-05-*.pth) "
            "or (1000, 2048) (torchvision's inception_v3_google-*.pth)"
        )
    return FORMATS[fc.shape[0]]


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Build the network the file's layout calls for and load it strictly (every key, every shape)."""
    path = str(path)
    if not Path(path).is_file():
        raise InceptionWeightsError(f"{path}: no such file; --inception-weights must name a .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionWeightsError(f"{path}: cannot be read as PyTorch weights ({type(e).__name__}: {e})") from e
    state = _state_dict_of(obj, path)
    fmt = weights_format_of(state, path)
    net = _network(fmt, aux_logits=any(k.startswith("AuxLogits.") for k in state))
    expected = {k: v.shape for k, v in net.state_dict().items()}
    # Old files predate BatchNorm's step counter; it is not a weight, so it may be absent (or extra).
    counter = lambda k: k.endswith("num_batches_tracked")  # noqa: E731
    missing = sorted(k for k in expected if k not in state and not counter(k))
    extra = sorted(k for k in state if k not in expected and not counter(k))
    bad = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k]
    )
    if missing or extra or bad:
        show = lambda xs: ", ".join(xs[:8]) + (f" and {len(xs) - 8} more" if len(xs) > 8 else "")  # noqa: E731
        parts = [f"missing {show(missing)}" if missing else "", f"unexpected {show(extra)}" if extra else "",
                 f"mis-shaped {show(bad)}" if bad else ""]
        raise InceptionWeightsError(
            f"{path}: not an Inception-v3 state dict of the {fmt} layout: " + "; ".join(p for p in parts if p)
        )
    net.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return InceptionFeatures(net, fmt, sha256).eval().to(device)


# ---------------------------------------------------------------------------------------------------------
# The Fréchet distance between Gaussians fitted to two feature sets.


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D); got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2).

    tr (S1 S2)^1/2 = tr (R S2 R)^1/2 with R = S1^1/2: R S2 R is symmetric positive semi-definite and has the
    eigenvalues of S1 S2, so two symmetric eigendecompositions give it without a general matrix square root.
    Eigenvalues below zero are rounding noise of singular covariances (fewer samples than dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    r = _psd_sqrt((s1 + s1.T) / 2)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt, 0.0))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two (N, D) feature sets.

    With fewer samples than dimensions (the usual audit case) the covariances are S = X^T X for the centred,
    scaled samples X, and the non-zero eigenvalues of S1 S2 are the squared singular values of X1 X2^T: the
    trace term is the nuclear norm of an (N1, N2) matrix instead of two (D, D) eigendecompositions (which
    take tens of seconds on a loaded CPU at D = 2048).
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu1, s1 = gaussian_stats(a)
    mu2, s2 = gaussian_stats(b)
    if max(len(a), len(b)) > a.shape[1]:
        return frechet_distance(mu1, s1, mu2, s2)
    x1 = (a - mu1) / np.sqrt(len(a) - 1)
    x2 = (b - mu2) / np.sqrt(len(b) - 1)
    tr_sqrt = float(np.linalg.svd(x1 @ x2.T, compute_uv=False).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt, 0.0))
