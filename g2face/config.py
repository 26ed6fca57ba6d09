"""G2Face model configuration: every size comes from here, never from code.

``G2FaceConfig`` is a frozen dataclass. ``PRESETS`` holds ``paper-256`` (exactly the shapes of the
official G2Face checkpoint) and ``lite-128`` (a small model for short GPU runs and CPU inference).
``to_dict`` / ``from_dict`` give the plain-JSON form stored inside model artifacts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .payload_layout import REGIONS, grid_layout

_RESOLUTIONS = (64, 128, 256)
_DUMMY_NORMS = ("batchnorm", "layernorm")


@dataclass(frozen=True)
class G2FaceConfig:
    """Sizes and switches of one G2Face model.

    Args:
        name: a label (a preset name or your own); stored in artifacts, not used by the maths.
        resolution: side of the aligned face crop in pixels (64, 128 or 256).
        style_dim: width of a StyleGAN2 style vector (one row of w+).
        channels: feature channels at 4, 8, 16, ..., ``resolution`` px. The synthesis network and the
            face encoder share them, because the fusion blends the two feature maps of each resolution.
        identity_dim: size of an identity embedding (512 for ArcFace, 128 for the dlib-based prior).
        geometry_dim: size of the geometry coefficient vector given to the mapper (147 for
            Deep3DFaceRecon id+exp+angles, 53 for the shipped 3DMM).
        dummy_noise_dim: size of the Gaussian noise the dummy-identity generator starts from.
        dummy_hidden_dim: width of the dummy-identity generator's hidden layer.
        dummy_norm: last layer of the dummy-identity generator: ``batchnorm`` (official; batch statistics
            in training, running statistics at inference) or ``layernorm`` (per sample always).
        mapper_layers: equalised linear layers in each of the mapper's three branches.
        mapper_lr_mul: learning-rate multiplier of the mapper's equalised linear layers.
        mapper_doubled_bias: reproduce the official mapper's quirk of adding each bias twice (needed to
            load the released weights; new models should leave it off).
        style_split: how many w+ rows the low, middle and high mapper branches drive (coarse to fine);
            they must add up to ``n_latent``.
        payload_bits: bits hidden in (and read back from) each anonymised face.
        hiding_resolutions: resolutions where the payload is injected into the generator's features.
        payload_region: ``full`` (official: bit t at extractor position t over the whole crop) or
            ``face`` (bits only on extractor cells inside the pipeline's paste-back ellipse, so every bit
            survives paste-back; ``payload_layout``).
        fusion_mask_norm: instance-normalise the fusion mask logits before the sigmoid (official). This
            forces every mask channel to mix both sources spatially.
        extractor_width: channels of the password extractor's trunk (branches get half each).
        extractor_blocks: two-branch blocks in the password extractor.
        discriminator_channels: discriminator channels at 4, 8, ..., ``resolution`` px.
        blur_kernel: 1-D taps of the separable FIR filter used for up- and down-sampling.
    """

    name: str
    resolution: int
    style_dim: int
    channels: tuple[int, ...]
    identity_dim: int
    geometry_dim: int
    dummy_noise_dim: int
    dummy_hidden_dim: int
    dummy_norm: str
    mapper_layers: int
    mapper_lr_mul: float
    mapper_doubled_bias: bool
    style_split: tuple[int, int, int]
    payload_bits: int
    hiding_resolutions: tuple[int, ...]
    fusion_mask_norm: bool
    extractor_width: int
    extractor_blocks: int
    discriminator_channels: tuple[int, ...]
    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)
    payload_region: str = "full"

    def __post_init__(self) -> None:
        errors = []
        if self.resolution not in _RESOLUTIONS:
            errors.append(f"resolution must be one of {_RESOLUTIONS}, got {self.resolution}")
        else:
            n_res = len(self.resolutions)
            if len(self.channels) != n_res:
                errors.append(f"channels needs {n_res} entries (4..{self.resolution} px), got {len(self.channels)}")
            if len(self.discriminator_channels) != n_res:
                errors.append(
                    f"discriminator_channels needs {n_res} entries (4..{self.resolution} px), "
                    f"got {len(self.discriminator_channels)}"
                )
            if len(self.style_split) != 3 or sum(self.style_split) != self.n_latent or min(self.style_split) < 1:
                errors.append(f"style_split must be 3 positive counts adding up to n_latent={self.n_latent}, "
                              f"got {self.style_split}")
            bad = [r for r in self.hiding_resolutions if r not in self.resolutions[1:]]
            if bad or len(set(self.hiding_resolutions)) != len(self.hiding_resolutions):
                errors.append(f"hiding_resolutions must be distinct values from {self.resolutions[1:]}, "
                              f"got {self.hiding_resolutions}")
        for field in ("style_dim", "identity_dim", "geometry_dim", "dummy_noise_dim", "dummy_hidden_dim",
                      "mapper_layers", "payload_bits", "extractor_blocks"):
            if getattr(self, field) < 1:
                errors.append(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.extractor_width < 2 or self.extractor_width % 2:
            errors.append(f"extractor_width must be an even number >= 2, got {self.extractor_width}")
        if any(c < 1 for c in self.channels + self.discriminator_channels):
            errors.append("channel counts must be >= 1")
        if self.payload_region not in REGIONS:
            errors.append(f"payload_region must be one of {REGIONS}, got {self.payload_region!r}")
        if self.dummy_norm not in _DUMMY_NORMS:
            errors.append(f"dummy_norm must be one of {_DUMMY_NORMS}, got {self.dummy_norm!r}")
        if not self.mapper_lr_mul > 0:
            errors.append(f"mapper_lr_mul must be > 0, got {self.mapper_lr_mul}")
        if errors:
            raise ValueError(f"invalid G2FaceConfig {self.name!r}: " + "; ".join(errors))

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def resolutions(self) -> tuple[int, ...]:
        """4, 8, ..., resolution."""
        return tuple(2**k for k in range(2, int(math.log2(self.resolution)) + 1))

    @property
    def n_latent(self) -> int:
        """Rows of w+: two per resolution above 4 plus conv and ToRGB at 4."""
        return 2 * int(math.log2(self.resolution)) - 2

    @property
    def mapper_input_dim(self) -> int:
        return self.identity_dim + self.geometry_dim

    def channels_at(self, resolution: int) -> int:
        return self.channels[self.resolutions.index(resolution)]

    @property
    def payload_grid_bits(self) -> int:
        """Length of the flat grid the payload is laid out on (``payload_bits`` for the full layout)."""
        return grid_layout(self.resolution, self.payload_bits, self.payload_region)[0]

    def payload_depth(self, resolution: int) -> int:
        """Channels of the payload grid when laid out as ``resolution`` x ``resolution`` planes."""
        return math.ceil(self.payload_grid_bits / resolution**2)

    # ---- plain-JSON form ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "G2FaceConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if unknown or missing:
            raise ValueError(f"G2FaceConfig dict: unknown fields {unknown}, missing fields {missing}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def replace(self, **changes) -> "G2FaceConfig":
        return dataclasses.replace(self, **changes)


PAPER_256 = G2FaceConfig(
    name="paper-256",
    resolution=256,
    style_dim=512,
    channels=(512, 512, 512, 512, 512, 256, 128),
    identity_dim=512,
    geometry_dim=147,
    dummy_noise_dim=512,
    dummy_hidden_dim=512,
    dummy_norm="batchnorm",
    mapper_layers=4,
    mapper_lr_mul=0.01,
    mapper_doubled_bias=True,
    style_split=(6, 6, 2),
    payload_bits=512 * 32,
    hiding_resolutions=(8, 16, 32, 64, 128),
    fusion_mask_norm=True,
    extractor_width=128,
    extractor_blocks=3,
    discriminator_channels=(512, 512, 512, 512, 512, 256, 128),
)

# Small enough to train in minutes on one GPU and to run on CPU: 11.1 M shipped parameters (22 MB in
# fp16; the discriminator, 4.3 M, is training-only). 3240 payload bits: two full planes of the 1,620
# extractor cells (of 64x64) inside the paste-back ellipse, i.e. 2 bits per 2x2-pixel cell. Fewer bits than
# the 4096 (three planes) of earlier versions: after the same 500 warm-up steps under a 32 dB visibility
# budget, JPEG q90 read-back BER 0.022 against 0.060 (bench/warmup.py), and with payload format 2 the
# 3240 bits tolerate 3.0% random bit errors.
LITE_128 = G2FaceConfig(
    name="lite-128",
    resolution=128,
    style_dim=256,
    channels=(256, 256, 192, 128, 64, 32),
    identity_dim=128,
    geometry_dim=53,
    dummy_noise_dim=128,
    dummy_hidden_dim=256,
    dummy_norm="layernorm",
    mapper_layers=4,
    mapper_lr_mul=0.01,
    mapper_doubled_bias=False,
    style_split=(6, 4, 2),
    payload_bits=3240,
    hiding_resolutions=(8, 16, 32, 64),
    fusion_mask_norm=True,
    extractor_width=64,
    extractor_blocks=3,
    discriminator_channels=(256, 256, 192, 128, 64, 32),
    payload_region="face",
)

PRESETS: dict[str, G2FaceConfig] = {c.name: c for c in (PAPER_256, LITE_128)}


def preset(name: str) -> G2FaceConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown G2Face preset {name!r}; choose one of {sorted(PRESETS)}") from None
