"""Deep3DFaceRecon's coefficient regressor `net_recon`: a ResNet-50 trunk (no fc) and seven 1x1 heads.

Key names and shapes follow the released `epoch_20.pth` (torchvision's ResNet-50 v1.5 layout under
`backbone.`, heads under `final_layers.{0..6}`), so that file loads with `load_net_recon` and nothing
is left unmatched. Input: RGB in [0,1], (B,3,H,W), no mean/std normalisation (the network was trained
on 224 px aligned crops; G2Face feeds its 256 px frames as they are, the adaptive pool allows it).
Output: (B,257) coefficients = id 80 | exp 64 | tex 80 | angle 3 (radians) | gamma 27 | trans 3.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

HEADS = (("id", 80), ("exp", 64), ("tex", 80), ("angle", 3), ("gamma", 27), ("trans_xy", 2), ("trans_z", 1))
COEFF_DIM = sum(k for _, k in HEADS)  # 257
FEATURE_DIM = 2048
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (bottleneck width, blocks, stride)


class NetReconLoadError(RuntimeError):
    pass


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1 expanding 4x, plus shortcut.

    in_channels: channels entering the block. width: channels of the 3x3 conv (output is 4 * width).
    stride: spatial stride of the block. project: use a 1x1 conv + BN shortcut (`downsample`).
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, project: bool):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if project
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + shortcut)


class ResNet50Trunk(nn.Module):
    """ResNet-50 up to global average pooling: (B,3,H,W) -> (B,2048,1,1). No constructor arguments."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for i, (width, blocks, stride) in enumerate(STAGES, start=1):
            layer = []
            for j in range(blocks):
                layer.append(Bottleneck(channels, width, stride if j == 0 else 1, project=j == 0))
                channels = width * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        assert channels == FEATURE_DIM
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x)


class NetRecon(nn.Module):
    """Deep3DFaceRecon `net_recon`: trunk + seven 1x1 conv heads, concatenated to 257 coefficients.

    No constructor arguments: the head sizes are fixed by the released checkpoint (HEADS).
    """

    def __init__(self):
        super().__init__()
        self.backbone = ResNet50Trunk()
        self.final_layers = nn.ModuleList([nn.Conv2d(FEATURE_DIM, k, 1, bias=True) for _, k in HEADS])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B,3,H,W) RGB in [0,1] -> (B,257)."""
        assert image.ndim == 4 and image.shape[1] == 3, f"net_recon expects (B,3,H,W) RGB, got {tuple(image.shape)}"
        feat = self.backbone(image)
        assert feat.shape[1:] == (FEATURE_DIM, 1, 1), feat.shape
        return torch.cat([head(feat) for head in self.final_layers], 1).flatten(1)


def split_coefficients(coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B,257) -> {'id','exp','tex','angle','gamma','trans'}; trans joins trans_xy and trans_z (B,3)."""
    assert coeffs.ndim == 2 and coeffs.shape[1] == COEFF_DIM, coeffs.shape
    parts = dict(zip([n for n, _ in HEADS], torch.split(coeffs, [k for _, k in HEADS], dim=1)))
    parts["trans"] = torch.cat([parts.pop("trans_xy"), parts.pop("trans_z")], 1)
    return parts


def state_dict_problems(model: nn.Module, state: dict) -> list[str]:
    """Differences between a state dict and the model's: missing, unexpected and mis-shaped keys."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
    problems = [f"non-tensor value under {k!r}" for k, v in state.items() if not torch.is_tensor(v)]
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shaped = [f"{k}: expected {list(want[k])}, got {list(got[k])}" for k in want if k in got and got[k] != want[k]]

    def listed(title, items):
        more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
        return f"{len(items)} {title}: " + ", ".join(items[:10]) + more

    if missing:
        problems.append(listed("missing keys", missing))
    if extra:
        problems.append(listed("unexpected keys", extra))
    if shaped:
        problems.append(listed("mis-shaped keys", shaped))
    return problems


def load_net_recon(source, map_location: str | torch.device = "cpu") -> NetRecon:
    """Build NetRecon and load weights strictly; returns the model in eval mode.

    source: a path to Deep3DFaceRecon's checkpoint (a dict with 'net_recon'; other entries such as
        'opt_00' are ignored) or an already loaded dict of either form.
    map_location: device for torch.load.
    Any missing, unexpected or mis-shaped key raises NetReconLoadError naming the keys and the file.
    """
    where = "state dict"
    if isinstance(source, (str, Path)):
        where = str(source)
        if not Path(source).is_file():
            raise NetReconLoadError(f"{where} does not exist; pass the path of Deep3DFaceRecon's epoch_20.pth")
        source = torch.load(source, map_location=map_location, weights_only=True)
    if not isinstance(source, dict):
        raise NetReconLoadError(f"{where}: expected a dict, got {type(source).__name__}")
    state = source["net_recon"] if "net_recon" in source else source
    model = NetRecon()
    problems = state_dict_problems(model, state)
    if problems:
        raise NetReconLoadError(
            f"{where} is not a Deep3DFaceRecon net_recon checkpoint: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    return model.eval()
