"""ArcFace backbones: insightface IResNet-50 / IResNet-100 with strict loading of user-supplied weights.

No ArcFace weights ship with this project (their licences vary); users pass a state dict or a ``.pth``
file in insightface's layout (keys like ``layer3.13.bn3.running_var``, ``fc.weight`` (512, 25088),
``features.*``). Loading is strict: every missing, unexpected or mis-shaped key is named.

Input convention: RGB float tensors (N, 3, 112, 112) in [-1, 1] ((pixel / 255 - 0.5) / 0.5), faces
aligned the insightface way. Output: the raw, un-normalised 512-d embedding (compare with cosine).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = {"iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}
WIDTHS = (64, 128, 256, 512)
INPUT_SIZE = 112
EMBEDDING_DIM = 512
BN_EPS = 1e-5


class ArcFaceWeightsError(ValueError):
    """A state dict that does not fit the requested IResNet."""


def basic_block(x: torch.Tensor, block: "IBasicBlock") -> torch.Tensor:
    """Pre-activation block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the shortcut."""
    y = block.bn1(x)
    y = block.conv1(y)
    y = block.prelu(block.bn2(y))
    y = block.bn3(block.conv2(y))
    shortcut = block.downsample(x) if block.downsample is not None else x
    assert y.shape == shortcut.shape, (y.shape, shortcut.shape)
    return y + shortcut


class IBasicBlock(nn.Module):
    """insightface's IBasicBlock.

    Args:
        in_channels: channels of the block input.
        channels: output channels of both convolutions.
        stride: stride of the second convolution (2 in the first block of each stage).
    """

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels, eps=BN_EPS)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return basic_block(x, self)


class IResNet(nn.Module):
    """IResNet backbone, (N, 3, 112, 112) in [-1, 1] -> (N, 512).

    Args:
        arch: 'iresnet50' (blocks 3/4/14/3) or 'iresnet100' (3/13/30/3).
    """

    def __init__(self, arch: str = "iresnet50"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown ArcFace arch {arch!r}; use one of {sorted(ARCHS)}")
        self.arch = arch
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=BN_EPS)
        self.prelu = nn.PReLU(64)
        width = 64
        for stage, (count, channels) in enumerate(zip(ARCHS[arch], WIDTHS), start=1):
            blocks = []
            for i in range(count):
                blocks.append(IBasicBlock(width, channels, 2 if i == 0 else 1))
                width = channels
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.bn2 = nn.BatchNorm2d(width, eps=BN_EPS)
        spatial = INPUT_SIZE // 16  # four stride-2 stages: 112 -> 7
        self.fc = nn.Linear(width * spatial * spatial, EMBEDDING_DIM)
        self.features = nn.BatchNorm1d(EMBEDDING_DIM, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"IResNet expects (N, 3, {INPUT_SIZE}, {INPUT_SIZE}) RGB in [-1, 1], got {tuple(x.shape)}; "
                "resize aligned faces to 112 first"
            )
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        assert x.shape[1:] == (512, 7, 7), x.shape
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(x))


def check_state_dict(model: nn.Module, state_dict: dict, source: str = "state dict") -> None:
    """Raise ArcFaceWeightsError naming every missing, unexpected and mis-shaped key."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    non_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    missing = sorted(set(want) - set(got) - set(non_tensors))
    extra = sorted(set(got) - set(want)) + [k for k in non_tensors if k not in want]
    misshaped = sorted(f"{k} {got[k]} (expected {want[k]})" for k in set(want) & set(got) if want[k] != got[k])
    bad_type = [k for k in non_tensors if k in want]
    problems = []
    for title, keys in (("missing", missing), ("unexpected", extra), ("mis-shaped", misshaped),
                        ("not tensors", bad_type)):
        if keys:
            shown = ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
            problems.append(f"{len(keys)} {title}: {shown}")
    if problems:
        arch = getattr(model, "arch", type(model).__name__)
        raise ArcFaceWeightsError(
            f"{source} does not fit {arch}: " + "; ".join(problems)
            + ". Pass an insightface IResNet state dict of the same depth (see arch)."
        )


def _strip_ddp_prefix(state_dict: dict) -> dict:
    # Checkpoints saved from DistributedDataParallel prefix every key with 'module.'.
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_arcface(
    weights: dict | str | Path,
    arch: str = "iresnet50",
    expected_sha256: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> IResNet:
    """Build an IResNet and load weights strictly; returns it frozen and in eval mode.

    Args:
        weights: a state dict, or the path of a ``torch.save``d state dict (loaded with weights_only).
        arch: 'iresnet50' or 'iresnet100'.
        expected_sha256: when given with a path, the file must have this sha256.
        device, dtype: where and in which precision the parameters live.
    """
    source = "state dict"
    if isinstance(weights, (str, Path)):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"ArcFace weights {path} not found")
        if expected_sha256 is not None:
            got = hashlib.sha256(path.read_bytes()).hexdigest()
            if got != expected_sha256:
                raise ArcFaceWeightsError(f"{path}: sha256 {got} is not the expected {expected_sha256}")
        source = str(path)
        weights = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(weights, dict):
        raise ArcFaceWeightsError(f"{source} holds a {type(weights).__name__}, expected a state dict")
    weights = _strip_ddp_prefix(weights)
    model = IResNet(arch)
    check_state_dict(model, weights, source)
    model.load_state_dict(weights, strict=True)
    model.requires_grad_(False)  # a frozen prior: gradients still reach the input
    return model.eval().to(device=device, dtype=dtype)


def to_arcface_input(x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Map RGB in value_range to [-1, 1] and resize to 112x112 (bilinear, antialiased when shrinking)."""
    lo, hi = value_range
    x = (x - lo) * (2.0 / (hi - lo)) - 1.0
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        shrink = x.shape[-1] > INPUT_SIZE
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=shrink)
    return x
