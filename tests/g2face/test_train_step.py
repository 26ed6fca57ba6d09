"""The training step: gradients reach every parameter, exact resume, and the hiding path learns.

Priors: the identity prior is the real dlib ResNet port. ``GeometryHead`` below, a small untrained CNN
with the shipped geometry regressor's output layout, stands in for the regressor so these tests stay
fast: it is differentiable, which is all they need from it.
"""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hiding_model import aligned_demo_faces
from PIL import Image
from torch import nn

from g2face import degrade, losses
from g2face import train_step as ts
from g2face.config import LITE_128
from g2face.identity import load_dlib_face_resnet
from g2face.model import G2Face
from g2face.stylegan2 import Discriminator
from pipeline import align

# A small config with every part of lite-128 (all code paths), at 64 px, for the fast tests.
TINY = LITE_128.replace(name="tiny-64", resolution=64, style_dim=64, channels=(32, 32, 32, 16, 16),
                        discriminator_channels=(32, 32, 32, 16, 16), style_split=(4, 4, 2), dummy_hidden_dim=64,
                        payload_bits=1024, hiding_resolutions=(8, 16, 32), extractor_width=16)


class GeometryHead(nn.Module):
    """Untrained stand-in for the geometry regressor: image -> (geometry (B, 53), camera (B, 3))."""

    def __init__(self, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.net = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 4, 4), nn.LeakyReLU(0.2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 56))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(image)
        r = self.resolution
        camera = torch.stack([r / 360 * (1 + 0.1 * out[:, 53]), r / 2 + out[:, 54], 0.55 * r + out[:, 55]], 1)
        return out[:, :53], camera


@pytest.fixture(scope="module")
def dlib_net():
    return load_dlib_face_resnet(value_range=(-1.0, 1.0))


def make_priors(dlib_net, resolution: int) -> ts.Priors:
    torch.manual_seed(123)
    return ts.Priors(identity=ts.dlib_identity(dlib_net, align.template(resolution)),
                     geometry=GeometryHead(resolution).requires_grad_(False).eval(),
                     paste_mask=torch.from_numpy(align.paste_mask(resolution).copy()))


@pytest.fixture(scope="module")
def aligned():
    """The committed portraits through the pipeline's MTCNN detection and alignment at 128 px:
    (keys, photos, image->crop transforms, crops as uint8 (12, 128, 128, 3))."""
    return aligned_demo_faces(128)


def as_tensor(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---- schedule and state ---------------------------------------------------------------------------


def test_learning_rate_schedule_warms_up_then_decays():
    cfg = ts.TrainConfig(steps_per_epoch=10, warmup_epochs=4, decay_per_epoch=0.5)
    assert [cfg.lr_factor(s) for s in (0, 9, 10, 39, 40, 50, 60)] == [0.25, 0.25, 0.5, 1.0, 0.5, 0.25, 0.125]


def test_draws_are_uniform_bits_and_reproducible():
    torch.manual_seed(0)
    state = ts.TrainState(G2Face(TINY), Discriminator(64, TINY.discriminator_channels), seed=7)
    d = ts.draw(state, 4)
    assert d.bits.shape == (4, 1024) and set(d.bits.unique().tolist()) == {0.0, 1.0}
    assert abs(d.bits.mean().item() - 0.5) < 0.03 and not torch.equal(d.bits, d.placeholder)
    state.rng.manual_seed(7)
    assert torch.equal(ts.draw(state, 4).bits, d.bits)


def test_resume_refuses_another_config():
    torch.manual_seed(0)
    a = ts.TrainState(G2Face(TINY), Discriminator(64, TINY.discriminator_channels))
    b = ts.TrainState(G2Face(TINY), Discriminator(64, TINY.discriminator_channels), ts.TrainConfig(lr_new=5e-4))
    with pytest.raises(ValueError, match="lr_new"):
        b.load_state_dict(a.state_dict())


# ---- one step and exact resume ---------------------------------------------------------------------


def _tiny_state(seed_weights: int) -> ts.TrainState:
    torch.manual_seed(seed_weights)
    cfg = ts.TrainConfig(steps_per_epoch=1, warmup_epochs=2, weights=losses.LossWeights(r1_interval=2),
                         paste=degrade.PasteBackConfig(photo_scale=(1.0, 1.5), jpeg_probability=0.5))
    return ts.TrainState(G2Face(TINY), Discriminator(64, TINY.discriminator_channels), cfg, seed=11)


def test_train_step_runs_and_resumes_exactly(dlib_net, aligned):
    priors = make_priors(dlib_net, 64)
    faces = F.avg_pool2d(as_tensor(aligned[3][:2]), 2)
    batch = ts.Batch(faces)
    state = _tiny_state(0)
    first = ts.train_step(state, batch, priors)
    assert first["step"] == 1 and "discriminator/r1" in first  # R1 (double backward) on step 0
    assert all(math.isfinite(v) for v in first.values())
    assert 0.4 < first["anonymize/hiding_ber"] < 0.6  # untrained: chance
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    second = ts.train_step(state, batch, priors)
    assert "discriminator/r1" not in second and second["lr_factor"] == 1.0

    resumed = _tiny_state(99)  # different initial weights: everything must come from the saved state
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    # a checkpoint from before a setting existed resumes with that setting at its default
    del saved["config"]["weights"]["payload_min_psnr"], saved["config"]["grad_clip"]
    resumed.load_state_dict(saved)
    assert resumed.step == 1
    again = ts.train_step(resumed, batch, priors)
    assert again == second
    saved["config"]["weights"]["payload_min_psnr"] = 30.0  # but a setting that differs is refused by name
    with pytest.raises(ValueError, match=r"different TrainConfig \(fields \['weights'\]\)"):
        _tiny_state(99).load_state_dict(saved)
    for a, b in ((state.model, resumed.model), (state.ema, resumed.ema), (state.discriminator, resumed.discriminator)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name


def test_own_identity_pass_adds_its_terms_only_when_weighted(dlib_net, aligned):
    """LossWeights.own_identity: off by default (the official recipe, same draws); on, the recovery step also
    asks G(x, w(id(x), geo(x)), bits) to keep the person and the pixels, and its terms move the total."""
    priors = make_priors(dlib_net, 64)
    batch = ts.Batch(F.avg_pool2d(as_tensor(aligned[3][:2]), 2))
    off = ts.train_step(_tiny_state(0), batch, priors)
    assert not any("own_" in k for k in off)
    state = _tiny_state(0)
    state.config = dataclasses.replace(state.config, weights=dataclasses.replace(state.config.weights, own_identity=2.0))
    on = ts.train_step(state, batch, priors)
    assert {"recover/own_identity_recover", "recover/own_l1"} <= set(on)
    assert 0 < on["recover/own_identity_recover"] < 2 and on["recover/own_l1"] > 0
    assert on["anonymize/total"] == off["anonymize/total"]  # the anonymisation step is untouched
    own = 2.0 * (on["recover/own_identity_recover"] + on["recover/own_l1"] + on.get("recover/own_ms_ssim", 0.0))
    assert on["recover/total"] == pytest.approx(off["recover/total"] + own, rel=1e-4)


def test_wrong_key_term_is_added_only_when_weighted_and_trains_the_recovery_with_a_wrong_identity(dlib_net, aligned):
    """LossWeights.wrong_key: off by default (the official recipe); on, the recovery step adds the hinge on
    cos(original, recovered with the anonymized face's own identity), which a direct computation reproduces,
    and its gradient reaches the generator's style path."""
    priors = make_priors(dlib_net, 64)
    batch = ts.Batch(F.avg_pool2d(as_tensor(aligned[3][:2]), 2))
    off = ts.train_step(_tiny_state(0), batch, priors)
    assert "recover/wrong_key" not in off
    state = _tiny_state(0)
    weights = dataclasses.replace(state.config.weights, wrong_key=3.0, wrong_key_margin=0.0)  # the hinge bites
    state.config = dataclasses.replace(state.config, weights=weights)
    on = ts.train_step(state, batch, priors)
    assert on["anonymize/total"] == off["anonymize/total"]  # the anonymisation step is untouched
    assert 0 < on["recover/wrong_key"] <= 2
    assert on["recover/total"] == pytest.approx(off["recover/total"] + 3.0 * on["recover/wrong_key"], rel=1e-4)

    state = _tiny_state(0)
    state.config = dataclasses.replace(state.config, weights=weights)
    x = batch.image
    id_o = priors.identity(x)
    geo_o, _ = priors.geometry(x)
    anon = ts.PassResult(None, {}, x.clone(), geo_o, None, None)  # the original as 'anonymized': a direct check
    term = ts.wrong_key_term(state, priors, id_o, anon, ts.draw(state, x.shape[0]))
    term.backward()
    grads = [p.grad for p in state.model.mapper.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_payload_visibility_budget_measures_and_shrinks_the_payloads_own_change(dlib_net, aligned):
    """With weights.payload_min_psnr the anonymisation pass adds max(0, MSE/budget - 1) of
    G(x, w, bits) - G(x, w, 0) inside the paste mask (checked against a direct computation), and a step on
    that term alone makes the payload's change smaller."""
    import dataclasses

    priors = make_priors(dlib_net, 64)
    x = F.avg_pool2d(as_tensor(aligned[3][:2]), 2)
    state = _tiny_state(0)
    state.config = dataclasses.replace(state.config, weights=dataclasses.replace(
        state.config.weights, payload_min_psnr=40.0))
    with torch.no_grad():  # give the untrained hiding path (zero gains) a visible payload
        for p in state.model.hiding.parameters():
            p.add_(0.5 * torch.randn_like(p))
    mask = torch.from_numpy(align.paste_mask(64).copy())

    def change(draws, id_o, geo_o):
        m = state.model
        with torch.no_grad():
            w = m.styles(m.dummy(draws.z), geo_o)
            diff = m.generate(x, w, draws.bits, draws.noise_anonymize) - m.generate(
                x, w, torch.zeros_like(draws.bits), draws.noise_anonymize)
        return (mask * diff).square().mean().item()

    x_, id_o, geo_o, cam_o = ts.reference_priors(state, priors, ts.Batch(x))
    draws = ts.draw(state, 2)
    before = change(draws, id_o, geo_o)
    anon = ts.anonymization_pass(state, priors, x_, id_o, geo_o, cam_o, draws)
    expected = max(0.0, before / (4.0 / 10 ** 4.0) - 1)
    assert before > 0 and anon.terms["payload_visibility"].item() == pytest.approx(expected, rel=1e-3)
    opt = torch.optim.Adam(state.model.parameters(), lr=1e-2)
    anon.terms["payload_visibility"].backward()
    opt.step()
    assert change(draws, id_o, geo_o) < before
    # off by default: the official objective has no such term
    assert "payload_visibility" not in ts.anonymization_pass(_tiny_state(0), priors, x_, id_o, geo_o, cam_o,
                                                            draws).terms


# ---- gradients of the full lite-128 objective --------------------------------------------------------


def _total_loss(state: ts.TrainState, priors: ts.Priors, batch: ts.Batch) -> torch.Tensor:
    x, id_o, geo_o, cam_o = ts.reference_priors(state, priors, batch)
    draws = ts.draw(state, x.shape[0])
    anon = ts.anonymization_pass(state, priors, x, id_o, geo_o, cam_o, draws)
    rec = ts.recovery_pass(state, priors, x, id_o, geo_o, cam_o, anon, draws)
    d_total, _ = ts.discriminator_pass(state, x, rec.image, with_r1=True)
    return anon.total + rec.total + d_total


@pytest.mark.slow
def test_every_lite_parameter_gets_a_gradient_and_moves(dlib_net, aligned):
    priors = make_priors(dlib_net, 128)
    torch.manual_seed(0)
    model = G2Face(LITE_128)
    state = ts.TrainState(model, Discriminator(128, LITE_128.discriminator_channels),
                          ts.TrainConfig(weights=losses.LossWeights(feature_matching=1.0)), seed=3)
    batch = ts.Batch(as_tensor(aligned[3][:2]))
    params = dict(model.named_parameters()) | {f"D.{n}": p for n, p in state.discriminator.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    assert all(torch.all(p == 0) for n, p in model.named_parameters() if n.endswith(".gain"))

    _total_loss(state, priors, batch).backward()
    no_grad = [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"no finite gradient: {no_grad}"
    state.opt_g.step()
    state.opt_d.step()
    assert all(torch.any(p != 0) for n, p in model.named_parameters() if n.endswith(".gain"))
    # Everything moved except the hiding projections behind the zero gains (their gradient is exactly 0).
    unchanged = {n for n, p in params.items() if torch.equal(p.detach(), before[n])}
    behind_gains = {n for n in params if n.startswith("hiding.") and not n.endswith(".gain")}
    assert unchanged == behind_gains, sorted(unchanged ^ behind_gains)

    # With the gains off zero, the hiding projections get gradients too: now every parameter does.
    state.opt_g.zero_grad(set_to_none=True)
    state.opt_d.zero_grad(set_to_none=True)
    _total_loss(state, priors, batch).backward()
    zero = [n for n, p in params.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not zero, f"zero gradient after one step: {zero}"


# ---- identity perturbations keep the person ---------------------------------------------------------


def test_identity_perturbations_keep_the_dlib_identity(dlib_net, aligned):
    faces = as_tensor(aligned[3])
    identity = ts.dlib_identity(dlib_net, align.template(128))
    with torch.no_grad():
        clean = identity(faces)
        seen = identity(degrade.perturb_for_identity(faces, degrade.IdentityPerturbConfig(jpeg_probability=1.0),
                                                     torch.Generator().manual_seed(0)))
    dist = torch.linalg.vector_norm(clean - seen, dim=1)
    assert dist.max() < 0.6, dist  # still the same person by dlib's own threshold


# ---- hiding learns --------------------------------------------------------------------------------

# lite-128's resolution, hiding resolutions and face layout with narrower features and one extractor
# plane of payload (1,620 bits, all inside the paste region; lite-128 carries 3,240 on two planes,
# which takes far longer to learn), so the test trains in about a minute on two cores.
HIDING = LITE_128.replace(name="lite-128-narrow", channels=(32, 32, 32, 16, 16, 16),
                          discriminator_channels=(32, 32, 32, 16, 16, 16), extractor_width=32,
                          payload_bits=1620)


def pipeline_readback(photos, transforms, crops: np.ndarray, fmt: str = "PNG", quality: int = 90) -> np.ndarray:
    """What the pipeline publishes and reads back: paste each crop into its photo, encode, decode,
    re-align with the stored transform (pipeline.align and pipeline.imaging, as the run does)."""
    from pipeline.imaging import encode_image

    out = []
    for photo, m, crop in zip(photos, transforms, crops):
        pasted = photo.copy()
        align.paste_back(pasted, crop, m)
        data = encode_image(pasted, None, "RGB", fmt, quality)
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        out.append(align.warp_to_crop(decoded, m, crop.shape[0]))
    return np.stack(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.detach() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.slow
def test_hiding_learns_to_survive_paste_back_and_png(aligned):
    """The hiding objective alone on the 12 aligned portraits, image path fixed (each output is the real
    face plus the generator's payload residual; the injections, the fusion and synthesis that carry
    them and the extractor train): after paste-back into the photos, PNG and re-alignment with the
    pipeline's own code, the bit error rate falls from chance to below 5% (every payload bit of the
    ``face`` layout lies inside the paste region). Fresh random payloads at evaluation, so nothing can
    be memorised."""
    _, photos, transforms, crops = aligned
    faces = as_tensor(crops)
    mask = torch.from_numpy(align.paste_mask(128).copy())
    torch.manual_seed(0)
    model = G2Face(HIDING).requires_grad_(False)
    params = ts.hiding_parameters(model)
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w_plus = model.styles(torch.randn(12, HIDING.identity_dim, generator=g),
                              torch.randn(12, HIDING.geometry_dim, generator=g))

    def evaluate() -> tuple[float, float]:
        model.eval()
        bits = torch.randint(0, 2, (12, HIDING.payload_bits), generator=torch.Generator().manual_seed(99)).float()
        with torch.no_grad():
            image = faces + ts.payload_residual(model, faces, w_plus, bits)
            published = to_uint8(image)
            reread = as_tensor(pipeline_readback(photos, transforms, published))
            wrong = (model.extract_logits(reread) > 0) != (bits > 0.5)
            visible = (mask * (as_tensor(published) - faces)).square().mean()
        model.train()
        return wrong.float().mean().item(), 10 * math.log10(4 / max(visible.item(), 1e-12))

    start, _ = evaluate()
    assert 0.4 < start < 0.6

    steps, batch = 250, 2
    optimizer = torch.optim.Adam(params, lr=3e-3, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    paste = degrade.PasteBackConfig(photo_scale=(1.0, 3.0), max_angle_deg=10.0, jpeg_probability=0.0)
    for _ in range(steps):
        idx = torch.randperm(12, generator=g)[:batch]
        bits = torch.randint(0, 2, (batch, HIDING.payload_bits), generator=g).float()
        loss, _, _ = ts.hiding_warmup_loss(model, faces[idx], w_plus[idx], bits, mask, paste, g, min_psnr=30.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    ber, psnr = evaluate()
    print(f"\nhiding after {steps} steps: BER after paste-back + PNG {ber:.4f} on {HIDING.payload_bits} bits "
          f"(from {start:.3f}); visible change {psnr:.1f} dB PSNR")
    assert ber < 0.05
    assert psnr > 29  # the distortion budget (30 dB) holds, give or take the 8-bit rounding


def test_detectability_term_only_when_weighted_and_needs_the_detector(dlib_net, aligned):
    """LossWeights.detectability: off by default (same draws, same totals); on, the anonymisation pass adds
    MTCNN's -log p(face) of its output, weighted into the total; without Priors.detector it says what to load."""
    from g2face.mtcnn import load_face_detectability

    priors = make_priors(dlib_net, 64)
    batch = ts.Batch(F.avg_pool2d(as_tensor(aligned[3][:2]), 2))
    off = ts.train_step(_tiny_state(0), batch, priors)
    assert "anonymize/detectability" not in off
    state = _tiny_state(0)
    state.config = dataclasses.replace(state.config, weights=dataclasses.replace(state.config.weights,
                                                                                 detectability=3.0))
    with pytest.raises(ValueError, match="Priors.detector"):
        ts.train_step(state, batch, priors)
    state = _tiny_state(0)
    state.config = dataclasses.replace(state.config, weights=dataclasses.replace(state.config.weights,
                                                                                 detectability=3.0))
    on = ts.train_step(state, batch, dataclasses.replace(priors, detector=load_face_detectability()))
    assert on["anonymize/detectability"] > 0
    assert on["anonymize/total"] == pytest.approx(off["anonymize/total"] + 3.0 * on["anonymize/detectability"],
                                                  rel=1e-4)
