"""G2Face training losses: plain functions, plus the LPIPS network for users who supply its weights.

Weights and switches live in ``LossWeights`` (frozen) with the official code's defaults
(``../shared/reference/g2face_facts.md`` section 2.4):

=====================  ======  ===========================================================
term                   weight  where
=====================  ======  ===========================================================
L1                     1       anonymisation (vs the original; the code, not the paper) and recovery
perceptual             1       same; LPIPS-VGG when its weights are supplied, else MS-SSIM and/or
                               discriminator feature matching (never the identity network)
ID dummy consistency   1       1 - cos(dummy, id(anonymised))
ID dissimilarity       1       max(0, cos(id(original), id(anonymised)) - margin), margin 0
ID recovery            1       1 - cos(id(original), id(recovered))
diversity              1       pairwise dummy cosines, diagonal zeroed, negatives clamped, / B^2
geometry coefficients  1       MSE of the 3DMM geometry vector (pose in radians)
geometry landmarks     0.01    MSE of the projected 68 landmarks in 224-frame pixels
hiding                 10      BCE of the extracted bit logits (after the degradations of degrade.py)
adversarial            1       non-saturating softplus(-D(fake))
R1                     5       every 16 discriminator steps, unscaled (the official schedule)
payload visibility     10      ours, off by default (``payload_min_psnr``): the payload's own change
                               beyond a PSNR budget, both passes
=====================  ======  ===========================================================

Images are in [-1, 1]. Every loss returns a scalar (mean over the batch) unless documented otherwise.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import morphable

# ---------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class LossWeights:
    """Weights of every G2Face loss term (official defaults).

    Args:
        l1: pixel L1 between the output and the original.
        lpips: LPIPS-VGG (used only when an ``LPIPS`` module is supplied).
        ms_ssim: 1 - MS-SSIM (used when no LPIPS is supplied).
        feature_matching: L1 between discriminator features of output and original (when no LPIPS).
        anonymized_reconstruction: also apply L1 + perceptual between the anonymised face and the
            original (the official code does, "for stability"; the paper applies it at recovery only).
        identity_dummy: 1 - cos(dummy identity, identity of the anonymised face).
        identity_dissimilar: hinge on cos(original identity, anonymised identity).
        dissimilar_margin: the hinge's margin (official 0; embeddings that are not zero-centred, such as
            dlib's, may need a positive one).
        identity_recover: 1 - cos(original identity, identity of the recovered face).
        own_identity: weight of an own-identity pass (not in the paper; 0 = off, the official recipe): the
            generator given the face itself and its *own* identity, G(x, w(id(x), geo(x)), bits), must keep the
            person (1 - cos of the identities) and the pixels (the reconstruction terms), so that it anonymizes
            through its identity input rather than by degrading every face it is given.
        wrong_key: weight of a wrong-key recovery term (not in the paper; 0 = off, the official recipe): the
            recovery pass run with the anonymized face's own identity in place of the original's (what someone
            without the key feeds it, ``pipeline.resynthesis``) must not show the original, hinge
            max(0, cos(original identity, identity of that face) - wrong_key_margin). Without it a model can
            learn to recover from the anonymized face alone, and then the key adds nothing.
        wrong_key_margin: that hinge's margin: 0.82 is the cosine of two unit embeddings at dlib's
            same-person distance 0.6 (1 - 0.6^2 / 2), so faces the pipeline already counts as another person
            are left alone.
        detectability: weight of MTCNN's -log p(face) on the anonymised face (not in the paper; 0 = off):
            RNet and ONet score the crop at the box MTCNN draws on aligned faces (``g2face.mtcnn``), so the
            generator keeps producing faces the pipeline's detector finds again (utility bar 5). Needs
            ``Priors.detector``.
        diversity: penalty on similar dummy identities within a batch.
        geometry_coefficients: MSE of the geometry vectors.
        geometry_landmarks: MSE of projected landmarks in pixels of a 224 px frame.
        hiding: BCE of the payload bits read back.
        adversarial: non-saturating generator loss.
        r1: weight of the R1 penalty on real images.
        r1_interval: discriminator steps between R1 penalties.
        payload_min_psnr: visibility budget of the payload in dB: the change the payload makes to an output,
            G(x, w, bits) - G(x, w, 0) seen through the paste mask, is penalised beyond this PSNR ([-1, 1]
            scale). None (official): no budget, the hiding weight alone decides.
        payload_visibility: weight of that penalty, max(0, MSE_payload / MSE_budget - 1).
    """

    l1: float = 1.0
    lpips: float = 1.0
    ms_ssim: float = 1.0
    feature_matching: float = 0.0
    anonymized_reconstruction: bool = True
    identity_dummy: float = 1.0
    identity_dissimilar: float = 1.0
    dissimilar_margin: float = 0.0
    identity_recover: float = 1.0
    own_identity: float = 0.0
    wrong_key: float = 0.0
    wrong_key_margin: float = 0.82
    detectability: float = 0.0
    diversity: float = 1.0
    geometry_coefficients: float = 1.0
    geometry_landmarks: float = 0.01
    hiding: float = 10.0
    adversarial: float = 1.0
    r1: float = 5.0
    r1_interval: int = 16
    payload_min_psnr: float | None = None
    payload_visibility: float = 10.0

    def __post_init__(self) -> None:
        bad = [f"{k}={v}" for k, v in vars(self).items() if isinstance(v, float) and not (v >= 0 and math.isfinite(v))]
        if self.payload_min_psnr is not None and not self.payload_min_psnr > 0:
            bad.append(f"payload_min_psnr={self.payload_min_psnr}")
        if bad or self.r1_interval < 1:
            raise ValueError(f"LossWeights: weights must be finite and >= 0 and r1_interval >= 1; got "
                             f"{', '.join(bad) or f'r1_interval={self.r1_interval}'}")


# ---------------------------------------------------------------------------------------------
# Reconstruction


def l1_loss(output: Tensor, target: Tensor) -> Tensor:
    return (output - target).abs().mean()


def _gaussian_window(size: int, sigma: float, dtype, device) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).to(device=device, dtype=dtype)


def _valid_filter_matrix(taps: Tensor, size: int) -> Tensor:
    """(size, size - k + 1) banded matrix: ``signal @ M`` is the valid 1-D correlation with ``taps``."""
    k = taps.numel()
    m = torch.zeros(size, size - k + 1, dtype=taps.dtype, device=taps.device)
    for i in range(k):
        m.diagonal(-i).copy_(taps[i].expand(size - k + 1))
    return m


def _ssim_terms(x: Tensor, y: Tensor, window: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    """Per-image mean SSIM and mean contrast-structure term (valid filtering, no padding)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, w = x.shape[-2:]
    # The five local moments in one separable filtering (banded matmuls beat depthwise convs on CPU).
    maps = torch.stack([x, y, x * x, y * y, x * y])
    maps = _valid_filter_matrix(window, h).T @ (maps @ _valid_filter_matrix(window, w))
    mu_x, mu_y, xx, yy, xy = maps.unbind(0)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (lum * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003


def ms_ssim(x: Tensor, y: Tensor, data_range: float = 2.0, window_size: int = 11, sigma: float = 1.5,
            weights: tuple[float, ...] = MS_SSIM_WEIGHTS) -> Tensor:
    """Multi-scale SSIM per image (B,), in [0, 1] for similar images (1 = identical).

    Uses as many of the 5 standard scales as the image allows (the coarsest must still hold the
    window: 4 scales at 128 px, 5 from 176 px) with the standard exponents renormalised to sum 1.
    Contrast-structure terms are clamped at 0 before the power (negative correlation counts as 0).

    Args:
        x, y: (B, C, H, W) images.
        data_range: max - min of the value range (2 for [-1, 1]).
        window_size, sigma: the Gaussian window.
        weights: per-scale exponents, finest first.
    """
    assert x.shape == y.shape and x.ndim == 4, (x.shape, y.shape)
    side = min(x.shape[-2:])
    levels = max(1, min(len(weights), int(math.floor(math.log2(side / window_size))) + 1))
    if side < window_size:
        raise ValueError(f"ms_ssim needs images of at least {window_size} px, got {tuple(x.shape[-2:])}")
    w = torch.tensor(weights[:levels], dtype=torch.float64)
    w = (w / w.sum()).tolist()
    window = _gaussian_window(window_size, sigma, x.dtype, x.device)
    out = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(levels):
        ssim, cs = _ssim_terms(x, y, window, data_range)
        term = ssim if i == levels - 1 else cs
        out = out * term.clamp_min(0) ** w[i]
        if i < levels - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return out


def ms_ssim_loss(output: Tensor, target: Tensor) -> Tensor:
    return 1 - ms_ssim(output, target).mean()


def discriminator_features(discriminator: nn.Module, image: Tensor) -> list[Tensor]:
    """Activations after the stem and after each residual block of a ``stylegan2.Discriminator``."""
    feats, x = [], image
    for layer in discriminator.convs:
        x = layer(x)
        feats.append(x)
    return feats


def feature_matching_loss(discriminator: nn.Module, output: Tensor, target: Tensor) -> Tensor:
    """Mean over layers of the L1 distance between discriminator features of output and target.

    The target's features are computed without gradient; the discriminator's own parameters should
    be frozen (requires_grad False) while a generator loss uses it.
    """
    with torch.no_grad():
        ref = discriminator_features(discriminator, target)
    out = discriminator_features(discriminator, output)
    return torch.stack([(a - b).abs().mean() for a, b in zip(out, ref)]).mean()


# ---------------------------------------------------------------------------------------------
# LPIPS (VGG, v0.1), only from weights the user supplies

_VGG_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
              (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
              (26, 512, 512), (28, 512, 512))
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's indexing
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 distance between images in [-1, 1]; returns (B,) distances.

    Parameter names follow torchvision's ``vgg16().features`` (``features.{i}.weight``) and the lpips
    package's linear heads (``lin{k}.weight``, shape (1, C, 1, 1)). Build it with ``load_lpips``; a
    fresh instance has random weights and is not a perceptual metric.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        convs = {i: (cin, cout) for i, cin, cout in _VGG_CONVS}
        for i in range(_LPIPS_TAPS[-1] + 1):
            if i in convs:
                layers.append(nn.Conv2d(*convs[i], 3, padding=1))
            elif i in (4, 9, 16, 23):
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        for k, c in enumerate(_LPIPS_CHANNELS):
            self.register_parameter(f"lin{k}", nn.Parameter(torch.zeros(1, c, 1, 1)))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).reshape(1, 3, 1, 1), persistent=False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        out, x = [], (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        assert x.shape == y.shape and x.shape[1] == 3, (x.shape, y.shape)
        total = 0
        for k, (a, b) in enumerate(zip(self._taps(x), self._taps(y))):
            a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
            lin = getattr(self, f"lin{k}")
            total = total + ((a - b).square() * lin).sum(1).mean((1, 2))
        return total


class LPIPSWeightsError(ValueError):
    """An LPIPS weight file is missing, corrupted or not the expected network."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state(path: str | os.PathLike, what: str, expected_sha256: str | None) -> dict:
    from .checkpoint import CheckpointError, load_torch_file

    path = Path(path)
    if not path.is_file():
        raise LPIPSWeightsError(f"{what} file {path} does not exist")
    if expected_sha256 is not None:
        got = _sha256(path)
        if got != expected_sha256.lower():
            raise LPIPSWeightsError(f"{what} file {path} has sha256 {got}, expected {expected_sha256}: "
                                    "a different or corrupted file")
    try:
        state = load_torch_file(path, what)
    except CheckpointError as e:
        raise LPIPSWeightsError(str(e)) from e
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"{what} file {path} holds a {type(state).__name__}, not a state dict")
    return state


def _check(where: str, expected: dict[str, tuple[int, ...]], found: dict, ignored_prefixes: tuple[str, ...] = ()) -> None:
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not k.startswith(ignored_prefixes))
    misshaped = sorted(f"{k} (file {list(found[k].shape) if isinstance(found[k], Tensor) else type(found[k]).__name__},"
                       f" expected {list(v)})" for k, v in expected.items()
                       if k in found and not (isinstance(found[k], Tensor) and tuple(found[k].shape) == v))
    parts = [f"{label}: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if keys]
    if parts:
        raise LPIPSWeightsError(f"{where} does not match LPIPS-VGG: " + "; ".join(parts))


def load_lpips(vgg_path: str | os.PathLike, lin_path: str | os.PathLike, *, vgg_sha256: str | None = None,
               lin_sha256: str | None = None, device: torch.device | str = "cpu") -> LPIPS:
    """LPIPS-VGG v0.1 from the two files it needs, checked strictly, frozen and in eval mode.

    Args:
        vgg_path: torchvision's ImageNet VGG16 state dict (``vgg16-397923af.pth``): every
            ``features.{i}.weight/bias`` of the 13 convolutions must be there with its shape; the
            ``classifier.*`` keys are ignored (LPIPS does not use them); any other key is an error.
        lin_path: the lpips package's ``weights/v0.1/vgg.pth``: exactly ``lin{0..4}.model.1.weight``.
        vgg_sha256, lin_sha256: pinned SHA-256 of each file; a different file is refused.
        device: where the network lives.
    """
    vgg = _read_state(vgg_path, "VGG16 (LPIPS backbone)", vgg_sha256)
    lin = _read_state(lin_path, "LPIPS linear heads", lin_sha256)
    expected_vgg = {}
    for i, cin, cout in _VGG_CONVS:
        expected_vgg[f"features.{i}.weight"] = (cout, cin, 3, 3)
        expected_vgg[f"features.{i}.bias"] = (cout,)
    _check(f"VGG16 file {vgg_path}", expected_vgg, vgg, ignored_prefixes=("classifier.",))
    expected_lin = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(_LPIPS_CHANNELS)}
    _check(f"LPIPS linear-head file {lin_path}", expected_lin, lin)
    state = {k: vgg[k] for k in expected_vgg}
    state.update({f"lin{k}": lin[f"lin{k}.model.1.weight"] for k in range(len(_LPIPS_CHANNELS))})
    model = LPIPS()
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.eval().to(device)


# ---------------------------------------------------------------------------------------------
# Identity


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity in float32."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def identity_dummy_loss(dummy: Tensor, anonymized_identity: Tensor) -> Tensor:
    """The anonymised face should carry the dummy identity: mean 1 - cos."""
    return (1 - cosine(dummy, anonymized_identity)).mean()


def identity_dissimilar_loss(original_identity: Tensor, anonymized_identity: Tensor, margin: float = 0.0) -> Tensor:
    """The anonymised face should not carry the original identity: mean max(0, cos - margin)."""
    return F.relu(cosine(original_identity, anonymized_identity) - margin).mean()


def identity_recover_loss(original_identity: Tensor, recovered_identity: Tensor) -> Tensor:
    """The recovered face should carry the original identity again: mean 1 - cos."""
    return (1 - cosine(original_identity, recovered_identity)).mean()


def diversity_loss(dummy: Tensor) -> Tensor:
    """Dummy identities of one batch should differ: positive off-diagonal cosines summed, / B^2."""
    d = F.normalize(dummy.float(), dim=1, eps=1e-8)
    sim = d @ d.T
    sim = sim * (1 - torch.eye(sim.shape[0], device=sim.device, dtype=sim.dtype))
    return sim.clamp_min(0).sum() / sim.shape[0] ** 2


# ---------------------------------------------------------------------------------------------
# Geometry (the shipped 3DMM: 40 shape + 10 expression coefficients, yaw/pitch/roll in degrees)

LANDMARK_FRAME = 224.0  # landmark errors in pixels of this frame, so the official 0.01 keeps its meaning


def geometry_coefficient_loss(geometry: Tensor, reference: Tensor) -> Tensor:
    """MSE of 3DMM geometry vectors (B, 53), with the pose converted to radians first."""
    assert geometry.shape == reference.shape and geometry.shape[1] == morphable.GEOMETRY_DIM, (geometry.shape,
                                                                                              reference.shape)

    def radians(g: Tensor) -> Tensor:
        return torch.cat([g[:, morphable.SHAPE], g[:, morphable.EXPR], torch.deg2rad(g[:, morphable.POSE])], 1)

    return (radians(geometry.float()) - radians(reference.float())).square().mean()


def geometry_landmark_loss(geometry: Tensor, camera: Tensor, reference_geometry: Tensor, reference_camera: Tensor,
                           resolution: int) -> Tensor:
    """MSE of the 68 landmarks projected by the morphable model, in pixels of a 224 px frame.

    Args:
        geometry, camera: the output face's (B, 53) geometry and (B, 3) camera, in crop pixels.
        reference_geometry, reference_camera: the original face's.
        resolution: side of the crop the cameras refer to.
    """
    pts = morphable.project_landmarks(geometry.float(), camera.float())
    ref = morphable.project_landmarks(reference_geometry.float(), reference_camera.float())
    return ((pts - ref) * (LANDMARK_FRAME / resolution)).square().mean()


# ---------------------------------------------------------------------------------------------
# Hiding and adversarial


def hiding_loss(logits: Tensor, bits: Tensor) -> Tensor:
    """BCE-with-logits of the extracted payload, mean over batch and bits."""
    assert logits.shape == bits.shape, (logits.shape, bits.shape)
    return F.binary_cross_entropy_with_logits(logits.float(), bits.float())


def bit_error_rate(logits: Tensor, bits: Tensor) -> Tensor:
    """Fraction of bits read wrongly (a bit reads as 1 where its logit is > 0)."""
    return ((logits > 0) != (bits > 0.5)).float().mean()


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss softplus(-D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """softplus(-D(real)) + softplus(D(fake))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """Per-sample squared norm of dD/dx at real images, averaged (create_graph: it is trained through)."""
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()


def visible_mse(output: Tensor, reference: Tensor, paste_mask: Tensor) -> Tensor:
    """MSE (float32) of output - reference seen through the paste mask: what a published photo shows of it."""
    return (paste_mask.to(output.device, torch.float32) * (output.float() - reference.float())).square().mean()


def over_budget(mse: Tensor, min_psnr: float) -> Tensor:
    """max(0, MSE / MSE_budget - 1), the budget being the MSE of ``min_psnr`` dB on the [-1, 1] scale."""
    return F.relu(mse / (4.0 / 10 ** (min_psnr / 10)) - 1)


def payload_visibility_loss(output: Tensor, without_payload: Tensor, paste_mask: Tensor, min_psnr: float) -> Tensor:
    """The payload's own change (output - the same generation without payload) beyond ``min_psnr``."""
    return over_budget(visible_mse(output, without_payload, paste_mask), min_psnr)
