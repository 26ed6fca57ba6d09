"""Geometry regressor: aligned face crop -> 3DMM geometry, camera and dlib's 68 landmarks in one pass.

A small CNN distilled from the landmark fit of g2face/morphable.py (training: scripts/train_geometry_net.py,
data: `g2face-pipe prepare`, model card: g2face/weights/geometry_net.md). It is the differentiable,
batched stand-in for "dlib landmarks + fit" in G2Face's geometry loss and in the utility metrics.

Input: RGB float tensors (N, 3, 128, 128), the pipeline's aligned crop at resolution 128
(pipeline/align.py's FFHQ-style template), values in ``value_range`` (default [0, 1]; pass (-1, 1) for
generator outputs). Crops of another resolution must be resized to 128 first.
Outputs (GeometryPrediction):
    geometry  (N, 53) as in g2face/morphable.py: 40 shape + 10 expression coefficients (whitened), then
              yaw, pitch, roll in degrees;
    camera    (N, 3) [scale (crop pixels per mm), tx, ty (crop pixels)], weak perspective;
    landmarks (N, 68, 2) crop pixels in dlib's order: morphable.project_landmarks(geometry, camera), so
              landmarks and geometry always agree.
The head regresses 56 numbers [geometry, log scale, tx, ty] in units whitened by the training targets'
mean and std (buffers ``target_mean`` / ``target_std``, saved with the weights).
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import morphable

INPUT_SIZE = 128
OUTPUT_DIM = morphable.GEOMETRY_DIM + morphable.CAMERA_DIM  # 56
WEIGHTS_FILE = "geometry_net.pt"
WEIGHTS_FORMAT = "g2face-geometry-net"
WEIGHTS_VERSION = 1
# sha256 of the shipped g2face/weights/geometry_net.pt (scripts/train_geometry_net.py prints it).
WEIGHTS_SHA256 = "a4a1458e6b8fb14f7d602f2a66bfd6af3640318b5e6e6d17811f2010dec2781e"
DEFAULT_WIDTHS = (16, 32, 64, 96, 160)
DEFAULT_HIDDEN = 256


class GeometryNetError(RuntimeError):
    """The weights file is missing, altered or does not match the network."""


class GeometryPrediction(NamedTuple):
    geometry: torch.Tensor  # (N, 53)
    camera: torch.Tensor  # (N, 3)
    landmarks: torch.Tensor  # (N, 68, 2)


# ---------------------------------------------------------------------------------------------
# Plain functions: the math.


def normalize_input(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Map value_range onto [0, 1], then centre: (v - 0.5) / 0.25, so typical pixels land in about [-2, 2]."""
    lo, hi = value_range
    return ((x - lo) / (hi - lo) - 0.5) / 0.25


def conv_bn_relu(x: torch.Tensor, layer: "ConvBN", stride: int) -> torch.Tensor:
    """3x3 convolution (padding 1), batch norm, ReLU."""
    return F.relu(layer.bn(F.conv2d(x, layer.conv.weight, None, stride=stride, padding=1)))


def decode_head(raw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 56) whitened head outputs -> ((N, 53) geometry, (N, 3) camera); the scale is regressed as a log."""
    assert raw.shape[1:] == (OUTPUT_DIM,), raw.shape
    out = raw * std + mean
    geometry = out[:, : morphable.GEOMETRY_DIM]
    log_scale, shift = out[:, morphable.GEOMETRY_DIM], out[:, morphable.GEOMETRY_DIM + 1 :]
    camera = torch.cat([log_scale.exp()[:, None], shift], 1)
    return geometry, camera


def encode_targets(geometry: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
    """Inverse of decode_head before whitening: (N, 53), (N, 3) -> (N, 56) [geometry, log scale, tx, ty]."""
    assert geometry.shape[1:] == (morphable.GEOMETRY_DIM,) and camera.shape[1:] == (morphable.CAMERA_DIM,)
    return torch.cat([geometry, camera[:, :1].log(), camera[:, 1:]], 1)


# ---------------------------------------------------------------------------------------------
# Modules: parameters only.


class ConvBN(nn.Module):
    """3x3 convolution without bias followed by batch norm.

    Args:
        in_channels, out_channels: channels in and out.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)


class GeometryNet(nn.Module):
    """Plain CNN: a stride-2 stem, then per width a stride-2 and a stride-1 3x3 conv, 128 -> 4 pixels, then
    two fully connected layers on the flattened 4x4 map (position matters for landmarks, so no pooling).

    Args:
        widths: channels of the stem and of each downsampling stage; len(widths) - 1 stages after the stem
            (five widths take 128 to 4 pixels).
        hidden: units of the fully connected layer before the 56 outputs.
        value_range: (low, high) of the input values.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = DEFAULT_WIDTHS,
        hidden: int = DEFAULT_HIDDEN,
        value_range: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.hidden = int(hidden)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        assert self.value_range[1] > self.value_range[0], value_range
        assert len(self.widths) >= 2, widths
        self.feature_size = INPUT_SIZE >> len(self.widths)
        assert self.feature_size >= 1, (INPUT_SIZE, widths)
        self.stem = ConvBN(3, self.widths[0])
        self.down = nn.ModuleList(ConvBN(a, b) for a, b in zip(self.widths[:-1], self.widths[1:]))
        self.same = nn.ModuleList(ConvBN(b, b) for b in self.widths[1:])
        self.fc1 = nn.Linear(self.widths[-1] * self.feature_size**2, self.hidden)
        self.fc2 = nn.Linear(self.hidden, OUTPUT_DIM)
        # Set from the training targets by scripts/train_geometry_net.py; saved with the weights.
        self.register_buffer("target_mean", torch.zeros(OUTPUT_DIM))
        self.register_buffer("target_std", torch.ones(OUTPUT_DIM))

    def config(self) -> dict:
        return {"widths": list(self.widths), "hidden": self.hidden}

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 128, 128) images -> (N, 56) whitened outputs (what training compares to whitened targets)."""
        if x.ndim != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"GeometryNet expects (N, 3, {INPUT_SIZE}, {INPUT_SIZE}) aligned RGB crops, got {tuple(x.shape)}; "
                "resize the pipeline's aligned crop to 128 first"
            )
        x = conv_bn_relu(normalize_input(x, self.value_range), self.stem, 2)
        for down, same in zip(self.down, self.same):
            x = conv_bn_relu(conv_bn_relu(x, down, 2), same, 1)
        assert x.shape[1:] == (self.widths[-1], self.feature_size, self.feature_size), x.shape
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    def forward(self, x: torch.Tensor) -> GeometryPrediction:
        raw = self.head(x)
        geometry, camera = decode_head(raw.float(), self.target_mean.float(), self.target_std.float())
        lms = morphable.project_landmarks(geometry, camera)
        return GeometryPrediction(geometry, camera, lms)


# ---------------------------------------------------------------------------------------------
# Weights file: {"format", "version", "config", "state_dict"} saved with torch.save, fp16 tensors.


def weights_path() -> Path:
    # Next to this file (see morphable.bases_path for why not importlib.resources).
    return Path(__file__).resolve().parent / "weights" / WEIGHTS_FILE


def save_geometry_net(model: GeometryNet, path: str | Path, meta: dict | None = None) -> str:
    """Write the weights file (floating tensors stored as fp16, BN counters dropped); returns its sha256.

    meta: small JSON-able facts to keep in the file (training data, seed, metrics); never images or embeddings.
    """
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # not used in eval mode; strict loading skips it below
        sd[k] = v.detach().cpu().to(torch.float16) if v.is_floating_point() else v.detach().cpu()
    blob = {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "config": model.config(), "meta": meta or {},
            "state_dict": sd}
    buf = io.BytesIO()
    torch.save(blob, buf)
    data = buf.getvalue()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_geometry_net(
    path: str | Path | None = None,
    expected_sha256: str | None = WEIGHTS_SHA256,
    value_range: tuple[float, float] = (0.0, 1.0),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GeometryNet:
    """Build the regressor from a weights file (hash-checked, strictly loaded), frozen and in eval mode.

    Args:
        path: weights file; defaults to the shipped g2face/weights/geometry_net.pt.
        expected_sha256: pinned hash of the file (None skips the check, for files you trained yourself).
        value_range: input value range, see GeometryNet.
        device, dtype: where and in which precision the parameters live (outputs are float32 either way).
    """
    path = Path(path) if path is not None else weights_path()
    if not path.is_file():
        raise GeometryNetError(f"geometry regressor weights {path} are missing; train them with "
                               "`python scripts/train_geometry_net.py` or reinstall g2face-pipe")
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and got != expected_sha256:
        raise GeometryNetError(
            f"geometry regressor weights {path} have sha256 {got[:16]}..., expected {expected_sha256[:16]}... "
            "(a different or modified file); restore the shipped file, or pass expected_sha256=None for your own"
        )
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise GeometryNetError(f"{path} is not a readable torch file: {type(e).__name__}: {e}") from None
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise GeometryNetError(f"{path} is not a {WEIGHTS_FORMAT} file (no 'format': '{WEIGHTS_FORMAT}' entry)")
    if blob.get("version") != WEIGHTS_VERSION:
        raise GeometryNetError(f"{path} has format version {blob.get('version')}, this code reads {WEIGHTS_VERSION}")
    cfg = blob.get("config") or {}
    model = GeometryNet(tuple(cfg.get("widths", DEFAULT_WIDTHS)), int(cfg.get("hidden", DEFAULT_HIDDEN)), value_range)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    # BN batch counters are not stored; everything else must match exactly.
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd.setdefault(k, v)
    missing = sorted(set(model.state_dict()) - set(sd))
    unexpected = sorted(set(sd) - set(model.state_dict()))
    if missing or unexpected:
        raise GeometryNetError(f"{path} does not match GeometryNet{tuple(model.widths)}: missing keys {missing[:8]}, "
                               f"unexpected keys {unexpected[:8]}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise GeometryNetError(f"{path} does not match GeometryNet: {e}") from None
    model.requires_grad_(False)  # a frozen prior: gradients still reach the input
    return model.eval().to(device=device, dtype=dtype)


def weights_meta(path: str | Path | None = None) -> dict:
    """The 'meta' entry of a weights file (training facts), without building the model."""
    blob = torch.load(Path(path) if path is not None else weights_path(), map_location="cpu", weights_only=True)
    return dict(blob.get("meta") or {})


__all__ = [
    "GeometryNet", "GeometryPrediction", "GeometryNetError", "INPUT_SIZE", "OUTPUT_DIM", "load_geometry_net",
    "save_geometry_net", "weights_path", "weights_meta", "encode_targets", "decode_head", "normalize_input",
]
