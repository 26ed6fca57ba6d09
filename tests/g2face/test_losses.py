"""Loss functions: known values, MS-SSIM sanity, the strict LPIPS loader, R1 double backward."""
from __future__ import annotations

import dataclasses
import hashlib
import math

import cv2
import numpy as np
import pytest
import torch
from conftest import DEMO_SHARDS
from helpers import decode, read_tar

from g2face import losses, morphable
from g2face.stylegan2 import Discriminator


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """The 12 committed portraits, centre squares resized to 128, in [-1, 1]."""
    out = []
    for shard in DEMO_SHARDS:
        for _, files in sorted(read_tar(shard).items()):
            img = decode(files["jpg"])
            s = min(img.shape[:2])
            y0, x0 = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
            img = cv2.resize(img[y0:y0 + s, x0:x0 + s], (128, 128), interpolation=cv2.INTER_AREA)
            out.append(torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def test_weights_have_the_official_defaults_and_are_frozen():
    w = losses.LossWeights()
    assert (w.l1, w.lpips, w.identity_dummy, w.identity_dissimilar, w.identity_recover, w.diversity) == (1, 1, 1, 1, 1, 1)
    assert (w.geometry_coefficients, w.geometry_landmarks, w.hiding, w.adversarial) == (1, 0.01, 10, 1)
    assert (w.r1, w.r1_interval, w.dissimilar_margin) == (5, 16, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.hiding = 1.0
    with pytest.raises(ValueError, match="hiding=-1.0"):
        losses.LossWeights(hiding=-1.0)


# ---- reconstruction -------------------------------------------------------------------------------


def test_ms_ssim_is_one_for_identical_images_and_falls_with_noise(faces):
    x = faces[:4]
    torch.testing.assert_close(losses.ms_ssim(x, x), torch.ones(4))
    g = torch.Generator().manual_seed(0)
    scores = [losses.ms_ssim(x, x + s * torch.randn(x.shape, generator=g)).mean() for s in (0.02, 0.1, 0.3)]
    assert 1 > scores[0] > scores[1] > scores[2] > 0, scores
    torch.testing.assert_close(losses.ms_ssim(x, faces[4:8]), losses.ms_ssim(faces[4:8], x))
    # different people score far below a lightly blurred copy of the same photo
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert losses.ms_ssim(x, blurred).min() > 0.9
    assert losses.ms_ssim(x, faces[4:8]).max() < 0.5


def test_ms_ssim_of_flat_images_is_the_luminance_term():
    """Constant images have no contrast or structure: MS-SSIM = l(a, b) ** (last scale's exponent)."""
    a, b = 0.3, 0.1
    x, y = torch.full((1, 3, 128, 128), a), torch.full((1, 3, 128, 128), b)
    c1 = (0.01 * 2) ** 2
    weights = losses.MS_SSIM_WEIGHTS[:4]  # 128 px allows 4 scales with an 11 px window
    expected = ((2 * a * b + c1) / (a * a + b * b + c1)) ** (weights[-1] / sum(weights))
    assert losses.ms_ssim(x, y).item() == pytest.approx(expected, rel=1e-4)


def test_ms_ssim_loss_has_gradients(faces):
    x = faces[:2].clone().requires_grad_(True)
    loss = losses.ms_ssim_loss(x, faces[2:4])
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_feature_matching_uses_the_discriminator_but_trains_only_the_generator(faces):
    torch.manual_seed(0)
    disc = Discriminator(128, (32, 32, 32, 16, 16, 8)).requires_grad_(False)
    assert losses.feature_matching_loss(disc, faces[:2], faces[:2]).item() == 0
    x = faces[:2].clone().requires_grad_(True)
    loss = losses.feature_matching_loss(disc, x, faces[2:4])
    loss.backward()
    assert loss > 0 and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    assert len(losses.discriminator_features(disc, faces[:1])) == 6  # stem + 5 residual blocks


# ---- LPIPS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg_features() -> dict:
    """torchvision's VGG16 convolution weights (random init) under their checkpoint names."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return {f"features.{k}": v for k, v in torchvision.models.vgg16(weights=None).features.state_dict().items()}


def _lpips_files(tmp_path, vgg_features, vgg_changes=None, lin_changes=None):
    # A small stand-in for the classifier keys of the real file (ignored by the loader).
    vgg = dict(vgg_features) | {"classifier.6.weight": torch.zeros(1000, 4), "classifier.6.bias": torch.zeros(1000)}
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    for d, changes in ((vgg, vgg_changes), (lin, lin_changes)):
        for k, v in (changes or {}).items():
            if v is None:
                d.pop(k)
            else:
                d[k] = v
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    return tmp_path / "vgg16.pth", tmp_path / "vgg.pth", vgg


def test_lpips_loads_torchvision_vgg_and_lin_heads(tmp_path, faces, vgg_features):
    torchvision = pytest.importorskip("torchvision")
    vgg_path, lin_path, vgg_state = _lpips_files(tmp_path, vgg_features)
    model = losses.load_lpips(vgg_path, lin_path)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    small = torch.nn.functional.avg_pool2d(faces[:4], 2)  # 64 px keeps VGG16 quick on CPU
    x, other = small[:2], small[2:]
    torch.testing.assert_close(model(x, x), torch.zeros(2))
    d = model(x, other)
    assert torch.all(d > 0)
    torch.testing.assert_close(d, model(other, x))
    # Our feature stack is torchvision's: same activation at relu5_3.
    ref = torchvision.models.vgg16(weights=None)
    ref.features.load_state_dict({k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")})
    scaled = (x - model.shift) / model.scale
    torch.testing.assert_close(model._taps(x)[-1], ref.features[:30](scaled), rtol=1e-4, atol=1e-4)
    # pinned hashes are checked
    digest = hashlib.sha256(lin_path.read_bytes()).hexdigest()
    losses.load_lpips(vgg_path, lin_path, lin_sha256=digest)
    with pytest.raises(losses.LPIPSWeightsError, match="sha256"):
        losses.load_lpips(vgg_path, lin_path, lin_sha256="0" * 64)


@pytest.mark.parametrize("vgg_changes, lin_changes, message", [
    ({"features.28.bias": None}, None, "missing keys: features.28.bias"),
    ({"features.5.weight": torch.zeros(128, 64, 5, 5)}, None, "mis-shaped keys: features.5.weight"),
    ({"extra.weight": torch.zeros(1)}, None, "unexpected keys: extra.weight"),
    (None, {"lin2.model.1.weight": torch.zeros(1, 128, 1, 1)}, "lin2.model.1.weight .file \\[1, 128, 1, 1\\]"),
    (None, {"lin4.model.1.weight": None}, "LPIPS linear-head file .* missing keys: lin4.model.1.weight"),
])
def test_lpips_loader_names_bad_keys(tmp_path, vgg_features, vgg_changes, lin_changes, message):
    vgg_path, lin_path, _ = _lpips_files(tmp_path, vgg_features, vgg_changes, lin_changes)
    with pytest.raises(losses.LPIPSWeightsError, match=message):
        losses.load_lpips(vgg_path, lin_path)


def test_lpips_loader_refuses_missing_files(tmp_path):
    with pytest.raises(losses.LPIPSWeightsError, match="does not exist"):
        losses.load_lpips(tmp_path / "nope.pth", tmp_path / "vgg.pth")


# ---- identity and diversity -----------------------------------------------------------------------


def test_identity_losses_on_known_vectors():
    e = torch.eye(4)
    assert losses.identity_dummy_loss(e, 3 * e).item() == pytest.approx(0, abs=1e-6)
    assert losses.identity_dummy_loss(e, e.roll(1, 0)).item() == pytest.approx(1)
    assert losses.identity_recover_loss(e, -e).item() == pytest.approx(2)
    # the hinge: orthogonal or opposite identities cost nothing, identical ones cost 1
    assert losses.identity_dissimilar_loss(e, e.roll(1, 0)).item() == 0
    assert losses.identity_dissimilar_loss(e, -e).item() == 0
    assert losses.identity_dissimilar_loss(e, e).item() == pytest.approx(1)
    mixed = (e + e.roll(1, 0)) / 2  # cos 1/sqrt(2) to the original
    assert losses.identity_dissimilar_loss(e, mixed, margin=0.5).item() == pytest.approx(1 / math.sqrt(2) - 0.5)


def test_diversity_counts_positive_off_diagonal_similarity():
    assert losses.diversity_loss(torch.ones(4, 8)).item() == pytest.approx(12 / 16)
    assert losses.diversity_loss(torch.eye(4)).item() == 0
    assert losses.diversity_loss(torch.stack([torch.ones(3), -torch.ones(3)])).item() == 0  # negatives clamped


# ---- geometry -------------------------------------------------------------------------------------


def test_geometry_losses_on_known_offsets():
    g = torch.Generator().manual_seed(0)
    geo = torch.randn(3, morphable.GEOMETRY_DIM, generator=g)
    cam = torch.tensor([[1.2, 64.0, 70.0]]).repeat(3, 1)
    assert losses.geometry_coefficient_loss(geo, geo).item() == 0
    turned = geo.clone()
    turned[:, morphable.POSE.start] += 1.0  # one degree of yaw
    assert losses.geometry_coefficient_loss(turned, geo).item() == pytest.approx(math.radians(1) ** 2 / 53, rel=1e-4)
    moved = cam.clone()
    moved[:, 1] += 2.0  # every landmark 2 crop pixels right = 3.5 px in the 224 frame at R = 128
    loss = losses.geometry_landmark_loss(geo, moved, geo, cam, resolution=128)
    assert loss.item() == pytest.approx((2 * 224 / 128) ** 2 / 2, rel=1e-4)
    geo.requires_grad_(True)
    losses.geometry_landmark_loss(geo, cam, turned, cam, 128).backward()
    assert geo.grad[:, morphable.POSE].abs().sum() > 0 and geo.grad[:, morphable.SHAPE].abs().sum() > 0


# ---- hiding and adversarial ------------------------------------------------------------------------


def test_hiding_bce_and_bit_error_rate():
    bits = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    logits = torch.tensor([[-3.0, 2.0, -1.0, 0.0]])  # third wrong; a logit of exactly 0 reads as 0
    assert losses.bit_error_rate(logits, bits).item() == 0.25
    expected = np.mean([math.log1p(math.exp(-3)), math.log1p(math.exp(-2)), math.log1p(math.exp(1)), math.log(2)])
    assert losses.hiding_loss(logits, bits).item() == pytest.approx(expected, rel=1e-6)


def test_adversarial_losses():
    z = torch.zeros(4, 1)
    assert losses.generator_adversarial_loss(z).item() == pytest.approx(math.log(2))
    assert losses.discriminator_loss(z, z).item() == pytest.approx(2 * math.log(2))
    assert losses.discriminator_loss(torch.full((4, 1), 20.0), torch.full((4, 1), -20.0)).item() < 1e-8


def test_r1_is_the_squared_input_gradient_and_double_backward_runs(faces):
    # a linear critic D(x) = <w, x> has R1 = |w|^2 exactly
    w = torch.randn(3, 8, 8)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert losses.r1_penalty((x * w).sum((1, 2, 3)), x).item() == pytest.approx(w.square().sum().item(), rel=1e-5)
    # the real StyleGAN2 discriminator: the penalty trains its parameters (double backward)
    torch.manual_seed(0)
    disc = Discriminator(128, (32, 32, 32, 16, 16, 8))
    real = faces[:2].clone().requires_grad_(True)
    r1 = losses.r1_penalty(disc(real), real)
    r1.backward()
    # After the minibatch-stddev layer the critic is piecewise linear, so dD/dx does not depend on the
    # biases there (a.e.); every other parameter gets a finite, non-zero gradient.
    after_stddev = {"final_conv.1.bias", "final_linear.0.bias", "final_linear.1.bias"}
    grads = {n: p.grad for n, p in disc.named_parameters() if n not in after_stddev}
    assert r1 > 0 and disc.final_linear[1].bias.grad is None
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
