"""MTCNN's refinement and output networks (RNet, ONet) as a differentiable detectability prior.

The pipeline finds faces with MTCNN (facenet-pytorch 2.5.3) and utility bar 5 asks that anonymized faces are
found again. Most misses are ONet (and some RNet) rejecting a face the cascade proposed, so the prior scores
the aligned face crop with both nets at the box MTCNN draws on aligned crops: training can then keep the
generated face detectable (``LossWeights.detectability``). Weights are facenet-pytorch's ``rnet.pt`` /
``onet.pt`` state dicts, read from a directory (the installed package's ``data/`` by default, or a copy made
by ``scripts/make_gpu_carry.py`` where the package is not installed), pinned by sha256 and loaded strictly.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# facenet-pytorch 2.5.3's MTCNN files: the one place they are pinned (the detector, the utility metrics and the
# pipeline's model check all verify through ``verify_weights``).
MTCNN_SHA256 = {
    "pnet.pt": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet.pt": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet.pt": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}

# Square box, as fractions of an aligned crop (pipeline.align.template): the median MTCNN box on 150 aligned
# 128 px LFW crops has centre (0.498, 0.552), width 0.527, height 0.693; the cascade squares it (side = the
# longer edge) before RNet and ONet look at it.
CROP_BOX_CENTRE = (0.5, 0.55)
CROP_BOX_SIDE = 0.69


class RNet(nn.Module):
    """MTCNN's refinement net: a 24 px crop -> face logits (2), box offsets (4). Names match facenet-pytorch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[1:] == (3, 24, 24), f"RNet takes (B, 3, 24, 24), got {tuple(x.shape)}"
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_caffe_flatten(x)))
        return self.dense5_1(x)


class ONet(nn.Module):
    """MTCNN's output net: a 48 px crop -> face logits (2), box offsets (4), 5 landmarks (10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[1:] == (3, 48, 48), f"ONet takes (B, 3, 48, 48), got {tuple(x.shape)}"
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_caffe_flatten(x)))
        return self.dense6_1(x)


def _caffe_flatten(x: Tensor) -> Tensor:
    """The converted Caffe weights expect the feature map flattened in (W, H, C) order."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


def crop_box(image: Tensor, size: int, jitter: Tensor | None = None) -> Tensor:
    """The MTCNN box of aligned crops, resampled to ``size`` px like MTCNN's area resize: bilinear at k x
    ``size`` with k >= the box's pixels per output pixel, then k x k means (no input pixel skipped).

    Args:
        image: (B, 3, R, R) aligned faces.
        jitter: (B, 3) optional (dx, dy, log-scale) of the box, in box sides; the cascade's boxes wander.
    """
    b = image.shape[0]
    centre = torch.tensor(CROP_BOX_CENTRE, device=image.device, dtype=image.dtype).expand(b, 2)
    side = torch.full((b,), CROP_BOX_SIDE, device=image.device, dtype=image.dtype)
    if jitter is not None:
        assert jitter.shape == (b, 3), f"jitter must be (B, 3), got {tuple(jitter.shape)}"
        centre = centre + jitter[:, :2].to(image.dtype) * CROP_BOX_SIDE
        side = side * jitter[:, 2].to(image.dtype).exp()
    # affine_grid works in [-1, 1] crop coordinates: scale = box side, translation = box centre
    theta = torch.zeros(b, 2, 3, device=image.device, dtype=image.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = centre * 2 - 1
    k = max(1, math.ceil(float(side.max()) * image.shape[-1] / size))
    grid = F.affine_grid(theta, (b, 3, k * size, k * size), align_corners=False)
    return F.avg_pool2d(F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False), k)


class FaceDetectability(nn.Module):
    """Frozen RNet + ONet scoring aligned face crops; ``forward`` gives MTCNN's face logit per net.

    Args:
        rnet, onet: loaded nets (``load_face_detectability``).
        value_range: the range of the images given (MTCNN itself normalises 0..255 pixels to about [-1, 1]).
    """

    def __init__(self, rnet: RNet, onet: ONet, value_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        self.rnet, self.onet = rnet, onet
        self.value_range = value_range
        self.requires_grad_(False)
        self.eval()

    def forward(self, image: Tensor, jitter: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, 3, R, R) -> (RNet, ONet) face logits, each (B,): log p(face) - log p(not a face)."""
        lo, hi = self.value_range
        pixels = (image.float() - lo) * (255.0 / (hi - lo))
        normalised = (pixels - 127.5) * 0.0078125  # facenet-pytorch's MTCNN normalisation
        logits_r = self.rnet(crop_box(normalised, 24, jitter))
        logits_o = self.onet(crop_box(normalised, 48, jitter))
        return logits_r[:, 1] - logits_r[:, 0], logits_o[:, 1] - logits_o[:, 0]


def detectability_loss(face_logits: tuple[Tensor, Tensor]) -> Tensor:
    """Mean of -log p(face) over the nets: zero for faces both nets accept with certainty."""
    return torch.stack([F.softplus(-z).mean() for z in face_logits]).mean()


class MTCNNWeightsError(ValueError):
    """MTCNN weights are missing or are not facenet-pytorch 2.5.3's files; the message names the file and the fix."""


def default_weights_dir() -> Path:
    """facenet-pytorch's ``data/`` directory, found without importing the package."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MTCNNWeightsError("facenet-pytorch is not installed: pip install facenet-pytorch==2.5.3, or pass the "
                                "directory holding MTCNN's rnet.pt and onet.pt (scripts/make_gpu_carry.py copies them)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _pinned_bytes(path: Path) -> bytes:
    """The file's bytes, after checking them against its pin (hashing the bytes that are then used)."""
    want = MTCNN_SHA256[path.name]
    if not path.is_file():
        raise MTCNNWeightsError(f"{path}: MTCNN weights not found; reinstall facenet-pytorch==2.5.3 (or copy its "
                                f"data/{path.name} there)")
    blob = path.read_bytes()
    got = hashlib.sha256(blob).hexdigest()
    if got != want:
        raise MTCNNWeightsError(f"{path}: sha256 {got} is not facenet-pytorch 2.5.3's {want} (another release or a "
                                "modified file); reinstall facenet-pytorch==2.5.3")
    return blob


def verify_weights(weights_dir: str | os.PathLike | None = None,
                   names: tuple[str, ...] = tuple(MTCNN_SHA256)) -> dict[str, str]:
    """{file name: sha256} of MTCNN's files in ``weights_dir`` (default: the installed facenet-pytorch's), each
    checked against its pin; raises ``MTCNNWeightsError`` naming the first file that is missing or different."""
    root = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    return {name: hashlib.sha256(_pinned_bytes(root / name)).hexdigest() for name in names}


def _load_pinned(path: Path) -> dict[str, Tensor]:
    return torch.load(io.BytesIO(_pinned_bytes(path)), map_location="cpu", weights_only=True)


def load_face_detectability(weights_dir: str | os.PathLike | None = None, *,
                            value_range: tuple[float, float] = (-1.0, 1.0),
                            device: torch.device | str = "cpu") -> FaceDetectability:
    """RNet and ONet from ``weights_dir`` (default: the installed facenet-pytorch's), hash-checked, strict."""
    root = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    rnet, onet = RNet(), ONet()
    rnet.load_state_dict(_load_pinned(root / "rnet.pt"), strict=True)
    onet.load_state_dict(_load_pinned(root / "onet.pt"), strict=True)
    return FaceDetectability(rnet, onet, value_range).to(device)
