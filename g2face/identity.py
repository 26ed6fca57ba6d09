"""dlib's face-recognition ResNet (128-d descriptors) in PyTorch, plus the warp that feeds it.

Input convention: RGB float tensors (N, 3, 150, 150), values in ``value_range`` (default [0, 1]; pass
(-1, 1) for generator outputs). The range is mapped linearly onto dlib's 0..255 pixel scale, then each
channel becomes (pixel - mean) / 256 as in dlib's ``input_rgb_image_sized``. The 150x150 input is the
chip ``dlib.get_face_chip(img, shape, size=150, padding=0.25)`` would cut; :func:`aligned_to_chip`
produces it differentiably from the pipeline's aligned crop.

Faithful to dlib (parity checked in tests/g2face/test_identity.py):
- only stride-1 layers are padded (k // 2); the stem, the stride-2 convs and both pools are not;
- the residual add zero-pads the smaller operand at the end of each dimension (extra channels in down
  blocks, 3x3 vs 4x4 and 1x1 vs 2x2 spatially in the last levels);
- the down-block shortcut is a 2x2 stride-2 average pool, not a convolution.
Descriptors are not normalised; the usual rule is "same person" when the Euclidean distance < 0.6.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import dlib_format
from .dlib_format import CHIP_SIZE, EMBEDDING_DIM, LEVELS, MODEL_SHA256

CHIP_PADDING = 0.25
SAME_PERSON_DISTANCE = 0.6  # dlib's documented Euclidean threshold for this model

# ---------------------------------------------------------------------------------------------
# Plain functions: the math.


def to_dlib_input(x: torch.Tensor, value_range: tuple[float, float], pixel_mean: torch.Tensor) -> torch.Tensor:
    """RGB in value_range -> dlib's network input, (pixel - mean) / 256 on the 0..255 scale, in x's dtype."""
    lo, hi = value_range
    pixels = (x - lo) * (255.0 / (hi - lo))
    return (pixels - pixel_mean.to(x.dtype).view(1, 3, 1, 1)) / 256.0


def affine(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """dlib's affine_ layer (batch norm folded into a per-channel scale and shift)."""
    return x * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum has the element-wise larger shape; missing entries of either operand are 0."""
    shape = [max(sa, sb) for sa, sb in zip(a.shape, b.shape)]
    assert shape[0] == a.shape[0] == b.shape[0], (a.shape, b.shape)

    def pad(t: torch.Tensor) -> torch.Tensor:
        # F.pad lists (last dim start, end, previous dim start, end, ...); pad only at the end.
        amounts = []
        for dim in (3, 2, 1):
            amounts += [0, shape[dim] - t.shape[dim]]
        return F.pad(t, amounts) if any(amounts) else t

    return pad(a) + pad(b)


def residual_block(x: torch.Tensor, block: "ResidualBlock") -> torch.Tensor:
    """relu(conv-affine-relu-conv-affine(x) + shortcut(x)); down blocks use stride 2 and an average-pool shortcut."""
    stride, pad = (2, 0) if block.down else (1, 1)
    y = F.conv2d(x, block.conv1.weight, block.conv1.bias, stride=stride, padding=pad)
    y = F.relu(affine(y, block.affine1.gamma, block.affine1.beta))
    y = F.conv2d(y, block.conv2.weight, block.conv2.bias, stride=1, padding=1)
    y = affine(y, block.affine2.gamma, block.affine2.beta)
    shortcut = F.avg_pool2d(x, 2, 2) if block.down else x
    return F.relu(add_zero_padded(y, shortcut))


def identity_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between descriptors (..., 128); below SAME_PERSON_DISTANCE means the same person."""
    return torch.linalg.vector_norm(a - b, dim=-1)


def same_person(a: torch.Tensor, b: torch.Tensor, threshold: float = SAME_PERSON_DISTANCE) -> torch.Tensor:
    return identity_distance(a, b) < threshold


def identity_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1)


# ---------------------------------------------------------------------------------------------
# Modules: parameters only.


class Affine(nn.Module):
    """Per-channel scale and shift. Args: channels: number of channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))


class ResidualBlock(nn.Module):
    """One dlib residual block.

    Args:
        in_channels: channels of the block input.
        channels: filters of both 3x3 convolutions.
        down: first conv has stride 2 (unpadded) and the shortcut is a 2x2 average pool.
    """

    def __init__(self, in_channels: int, channels: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(in_channels, channels, 3)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3)
        self.affine2 = Affine(channels)


class DlibFaceResNet(nn.Module):
    """dlib_face_recognition_resnet_model_v1 as a batched, differentiable module: (N,3,150,150) -> (N,128).

    Args:
        value_range: (low, high) of the RGB input values, mapped onto dlib's 0..255 pixel scale.
    """

    def __init__(self, value_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        self.value_range = (float(value_range[0]), float(value_range[1]))
        assert self.value_range[1] > self.value_range[0], value_range
        self.register_buffer("pixel_mean", torch.zeros(3))
        self.stem_conv = nn.Conv2d(3, 32, 7)
        self.stem_affine = Affine(32)
        blocks, width = [], 32
        for channels, count, down in LEVELS:
            for i in range(count):
                blocks.append(ResidualBlock(width, channels, down and i == 0))
                width = channels
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(width, EMBEDDING_DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"DlibFaceResNet expects (N, 3, {CHIP_SIZE}, {CHIP_SIZE}) RGB chips, got {tuple(x.shape)}")
        x = to_dlib_input(x, self.value_range, self.pixel_mean)
        x = F.conv2d(x, self.stem_conv.weight, self.stem_conv.bias, stride=2)  # unpadded: 150 -> 72
        x = F.relu(affine(x, self.stem_affine.gamma, self.stem_affine.beta))
        x = F.max_pool2d(x, 3, 2)  # unpadded: 72 -> 35
        for block in self.blocks:
            x = residual_block(x, block)
        assert x.shape[1:] == (256, 2, 2), x.shape
        return self.fc(x.mean(dim=(2, 3)))


def dlib_state_dict(net: dlib_format.DlibNetwork) -> dict[str, torch.Tensor]:
    """Parameters of the parsed file under DlibFaceResNet's names (the file's layer order is the forward order)."""
    convs, affines = net.by_kind("con"), net.by_kind("affine")
    assert len(convs) == len(affines) == 1 + 2 * sum(n for _, n, _ in LEVELS), (len(convs), len(affines))
    # (conv, affine) module names in forward order: the stem, then two per residual block.
    names = [("stem_conv", "stem_affine")]
    names += [(f"blocks.{b}.conv{j}", f"blocks.{b}.affine{j}") for b in range(len(convs) // 2) for j in (1, 2)]
    sd = {"pixel_mean": torch.tensor(net.channel_means, dtype=torch.float32)}
    for (conv_name, aff_name), conv, aff in zip(names, convs, affines):
        sd[f"{conv_name}.weight"] = torch.from_numpy(conv.params["weight"].copy())
        sd[f"{conv_name}.bias"] = torch.from_numpy(conv.params["bias"].copy())
        sd[f"{aff_name}.gamma"] = torch.from_numpy(aff.params["gamma"].copy())
        sd[f"{aff_name}.beta"] = torch.from_numpy(aff.params["beta"].copy())
    (fc,) = net.by_kind("fc")
    sd["fc.weight"] = torch.from_numpy(np.ascontiguousarray(fc.params["weight_in_out"].T))
    return sd


COMPACT_FORMAT = "g2face-dlib-resnet-fp16"


def _weights_digest(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode() + b"\0" + str(sd[k].dtype).encode() + str(tuple(sd[k].shape)).encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def save_compact_dlib_weights(out: str | Path, path: str | Path | None = None,
                              expected_sha256: str | None = MODEL_SHA256) -> str:
    """Write the .dat's parameters in fp16 (10.7 MB instead of 21.4): what a GPU lease carries, where every
    MiB of the transfer limit is training data. Returns the weights' digest (stored in the file too)."""
    net = dlib_format.read_dlib_network(path, expected_sha256)
    sd = {k: v if k == "pixel_mean" else v.half() for k, v in dlib_state_dict(net).items()}
    digest = _weights_digest(sd)
    torch.save({"format": COMPACT_FORMAT, "source_sha256": expected_sha256, "weights_sha256": digest,
                "state_dict": sd}, out)
    return digest


def _read_compact(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != COMPACT_FORMAT:
        raise ValueError(f"{path} is not a compact dlib ResNet file (g2face.identity.save_compact_dlib_weights)")
    if expected_sha256 is not None and blob.get("source_sha256") != expected_sha256:
        raise ValueError(f"{path} was made from a .dat with sha256 {blob.get('source_sha256')}, not the expected "
                         f"{expected_sha256}; make it again from the right file")
    sd = blob["state_dict"]
    if _weights_digest(sd) != blob.get("weights_sha256"):
        raise ValueError(f"{path}: its weights do not match their stored digest (corrupted or edited file)")
    return {k: v.float() for k, v in sd.items()}


def load_dlib_face_resnet(
    path: str | Path | None = None,
    expected_sha256: str | None = MODEL_SHA256,
    value_range: tuple[float, float] = (0.0, 1.0),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DlibFaceResNet:
    """Build the network from dlib's file (hash-checked, strictly loaded), frozen and in eval mode.

    Args:
        path: the .dat file (defaults to the one in the installed face_recognition_models package), or a
            compact fp16 copy of it (``save_compact_dlib_weights``, a ``.pt`` file: made from the file with
            ``expected_sha256``, its weights checked against their digest).
        expected_sha256: pinned hash of the .dat; a different file is refused.
        value_range: input value range, see DlibFaceResNet.
        device, dtype: where and in which precision the parameters live.
    """
    if path is not None and Path(path).suffix == ".pt":
        sd = _read_compact(Path(path), expected_sha256)
    else:
        sd = dlib_state_dict(dlib_format.read_dlib_network(path, expected_sha256))
    model = DlibFaceResNet(value_range)
    model.load_state_dict(sd, strict=True)  # shape mismatches raise too
    model.requires_grad_(False)  # a frozen prior: gradients still reach the input
    return model.eval().to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Aligned crop -> dlib chip.

# dlib's mean face (get_face_chip_details, 68-point branch) for the points that correspond to the
# pipeline's 5-point template: eye centres (means of points 36-41 and 42-47), nose tip (30), mouth
# corners (48, 54). Units: fraction of the unpadded face box.
_MEAN_FACE_POINTS = {
    30: (0.490127, 0.515625),
    36: (0.121737, 0.216423), 37: (0.187122, 0.178758), 38: (0.265825, 0.179852),
    39: (0.334606, 0.231733), 40: (0.260918, 0.245099), 41: (0.182743, 0.244077),
    42: (0.645647, 0.231733), 43: (0.714428, 0.179852), 44: (0.793132, 0.178758),
    45: (0.858516, 0.216423), 46: (0.79751, 0.244077), 47: (0.719335, 0.245099),
    48: (0.254149, 0.780233), 54: (0.726104, 0.780233),
}


def chip_template_points(size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """The pipeline's 5 landmarks (eyes, nose, mouth corners) of dlib's mean face, in chip pixel centres."""
    m = _MEAN_FACE_POINTS
    pts = np.array([
        np.mean([m[i] for i in range(36, 42)], axis=0),
        np.mean([m[i] for i in range(42, 48)], axis=0),
        m[30], m[48], m[54],
    ])
    # dlib's chip pixel (u, v) samples the template frame at (u + 0.5, v + 0.5): measured by matching
    # get_face_chip outputs against warps of the template fit (best offset -0.5 px on both axes).
    return (padding + pts) / (1 + 2 * padding) * size - 0.5


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2-D similarity (rotation, uniform scale, translation) taking src (N,2) to dst (N,2); 2x3."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    assert src.shape == dst.shape and src.shape[1] == 2, (src.shape, dst.shape)
    s, d = src - src.mean(0), dst - dst.mean(0)
    # As complex numbers, d = z s with z = a + ib.
    a = (s * d).sum() / (s**2).sum()
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / (s**2).sum()
    rot = np.array([[a, -b], [b, a]])
    return np.hstack([rot, (dst.mean(0) - rot @ src.mean(0))[:, None]])


def crop_to_chip_matrix(crop_landmarks: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """2x3 similarity from aligned-crop pixels to chip pixels.

    Args:
        crop_landmarks: (5, 2) where the aligner puts left eye, right eye, nose tip, left and right mouth
            corner in the crop, in pixels (``pipeline.align.template(R)`` for the pipeline's crops).
        size, padding: the chip, as in dlib.get_face_chip.
    """
    return similarity_fit(np.asarray(crop_landmarks).reshape(5, 2), chip_template_points(size, padding))


def _pixel_to_grid_theta(chip_to_src: np.ndarray, src_size: int, size: int) -> torch.Tensor:
    """affine_grid theta (align_corners=False) for a map from output pixel centres to source pixel centres."""
    # Normalised <-> pixel: n = (2p + 1) / S - 1, so p = (n + 1) S / 2 - 1/2.
    out_from_norm = np.array([[size / 2, 0, size / 2 - 0.5], [0, size / 2, size / 2 - 0.5], [0, 0, 1]])
    norm_from_src = np.array([[2 / src_size, 0, 1 / src_size - 1], [0, 2 / src_size, 1 / src_size - 1], [0, 0, 1]])
    full = norm_from_src @ np.vstack([chip_to_src, [0, 0, 1]]) @ out_from_norm
    return torch.from_numpy(full[:2])


def _h(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def aligned_to_chip(
    crops: torch.Tensor, crop_landmarks: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING
) -> torch.Tensor:
    """Differentiable warp of aligned crops (N, C, R, R) to dlib face chips (N, C, size, size), bilinear.

    Args:
        crops: aligned faces, any value range and float dtype.
        crop_landmarks: the aligner's 5-point template in crop pixels (``pipeline.align.template(R)``).
        size, padding: the chip, as in dlib.get_face_chip (150 and 0.25 for the recognition network).

    When the chip is smaller than its footprint in the crop (large R), the crop is first average-pooled
    by an integer factor, as dlib's chip extractor samples from a down-scaled pyramid level.
    """
    assert crops.ndim == 4 and crops.shape[2] == crops.shape[3], crops.shape
    to_chip = crop_to_chip_matrix(crop_landmarks, size, padding)
    scale = float(np.sqrt(abs(np.linalg.det(to_chip[:, :2]))))  # chip pixels per crop pixel
    factor = int(1.0 / scale) if scale < 1.0 else 1
    src = crops
    if factor >= 2:
        src = F.avg_pool2d(crops, factor)
        # Pooled pixel j is centred on crop pixel j*f + (f-1)/2.
        pooled_to_crop = np.array([[factor, 0, (factor - 1) / 2], [0, factor, (factor - 1) / 2]])
        to_chip = (_h(to_chip) @ _h(pooled_to_crop))[:2]
    chip_to_src = np.linalg.inv(_h(to_chip))[:2]
    theta = _pixel_to_grid_theta(chip_to_src, src.shape[-1], size).to(device=crops.device, dtype=crops.dtype)
    n, c = crops.shape[:2]
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
