"""One G2Face training iteration in plain torch, shared by the Ray Train job and the standalone GPU script.

An iteration (official order, ``../shared/reference/g2face_facts.md`` section 2.3):

1. **Anonymisation pass**: dummy identity d = dummy(z); x_a = G(x, mapper(d, geometry(x)), P) with
   uniformly random payload bits P; losses: identity (dummy consistency, dissimilarity), diversity,
   geometry, L1 + perceptual vs x, adversarial, hiding BCE on x_a after paste-back/re-alignment/8-bit/JPEG.
   One optimiser step.
2. **Recovery pass**: x_r = G(x_a.detach(), mapper(id(x), geometry(x_a).detach()), P') with fresh
   placeholder bits P'; losses: identity recovery, geometry, L1 + perceptual vs x, adversarial, hiding on
   x_r with P' (optionally, not in the paper: the same pass with a wrong key must not restore the person,
   ``LossWeights.wrong_key``). A second step of the same optimiser.
3. **Discriminator step**: softplus losses on x (real) and x_r / x_a (fake, alternating), plus R1 every
   ``r1_interval`` steps. Then the EMA of the generator.

Identity losses see randomly perturbed copies of the generated faces (``degrade.perturb_for_identity``).
Every random draw comes from the ``TrainState``'s own CPU generator, so ``TrainState.state_dict`` /
``load_state_dict`` resume a run exactly (step, weights, EMA, optimisers, RNG).

The priors (identity and geometry networks, optional LPIPS) are frozen, differentiable callables given
by the caller; nothing here reads files, parses arguments or imports Ray.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import degrade, losses, mtcnn
from .losses import LossWeights
from .model import G2Face

IdentityFn = Callable[[Tensor], Tensor]
GeometryFn = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (official values where the official code has them).

    Args:
        lr_new: Adam learning rate of everything trained from scratch (encoder, fusion, hiding, mapper,
            dummy-identity generator, extractor): official 1e-3.
        lr_synthesis: learning rate of the (pretrained) synthesis network: official 1e-4.
        lr_discriminator: discriminator learning rate: official 1e-3.
        betas: Adam betas of both optimisers: official (0, 0.999).
        steps_per_epoch: iterations per learning-rate "epoch" (official: 70k FFHQ images / batch 32).
        warmup_epochs: linear warm-up length in epochs (the factor is (epoch + 1) / warmup_epochs).
        decay_per_epoch: exponential decay factor per epoch after the warm-up (official 0.95).
        ema_decay: per-step decay of the generator EMA (the official code keeps none; the artifact
            ships EMA weights).
        grad_clip: max global gradient norm for each optimiser step (0 disables clipping).
        autocast: run the networks under bf16 autocast on CUDA (ignored on CPU).
        weights: loss weights.
        paste: the degradations the hiding loss sees.
        identity_perturb: perturbations before the identity network (None: none).
    """

    lr_new: float = 1e-3
    lr_synthesis: float = 1e-4
    lr_discriminator: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.999)
    steps_per_epoch: int = 2187
    warmup_epochs: int = 10
    decay_per_epoch: float = 0.95
    ema_decay: float = 0.999
    grad_clip: float = 10.0
    autocast: bool = True
    weights: LossWeights = field(default_factory=LossWeights)
    paste: degrade.PasteBackConfig = field(default_factory=degrade.PasteBackConfig)
    identity_perturb: degrade.IdentityPerturbConfig | None = field(default_factory=degrade.IdentityPerturbConfig)

    def lr_factor(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        if epoch < self.warmup_epochs:
            return (epoch + 1) / self.warmup_epochs
        return self.decay_per_epoch ** (epoch - self.warmup_epochs + 1)


@dataclass
class Priors:
    """Frozen, differentiable networks the losses use (gradients flow through them into the generator).

    Args:
        identity: image (B, 3, R, R) in [-1, 1] -> identity embedding (B, identity_dim), the same
            embedding space as the model's identity input.
        geometry: image -> (geometry (B, 53), camera (B, 3) in crop pixels), the shipped 3DMM's layout.
        lpips: an ``losses.LPIPS`` loaded from user-supplied weights, or None (MS-SSIM and/or
            discriminator feature matching replace it).
        paste_mask: (R, R) paste-back mask in [0, 1] (``pipeline.align.paste_mask(R)``).
        detector: a ``mtcnn.FaceDetectability`` (RNet + ONet face logits of aligned crops), or None; needed
            only by ``LossWeights.detectability``.
    """

    identity: IdentityFn
    geometry: GeometryFn
    paste_mask: Tensor
    lpips: losses.LPIPS | None = None
    detector: nn.Module | None = None


@dataclass
class Batch:
    """One batch of aligned faces and what is known about them.

    Args:
        image: (B, 3, R, R) in [-1, 1].
        identity: (B, identity_dim) embeddings of ``image`` (computed by the identity prior if None).
        geometry, camera: (B, 53) and (B, 3) of ``image`` (from the geometry prior if None).
    """

    image: Tensor
    identity: Tensor | None = None
    geometry: Tensor | None = None
    camera: Tensor | None = None


@dataclass
class Draws:
    """Every random input of one iteration, drawn up front from the state's generator."""

    z: Tensor
    bits: Tensor
    placeholder: Tensor
    noise_anonymize: list[Tensor]
    noise_recover: list[Tensor]


def _with_defaults(saved, default):
    """``saved`` (nested plain dicts) with the keys it lacks taken from ``default``."""
    if not (isinstance(saved, dict) and isinstance(default, dict)):
        return saved
    out = {k: _with_defaults(saved[k], v) if k in saved else v for k, v in default.items()}
    out.update({k: v for k, v in saved.items() if k not in default})
    return out


class TrainState:
    """Everything a run needs to continue exactly: models, EMA, optimisers, step and RNG.

    Args:
        model: the G2Face being trained.
        discriminator: a ``stylegan2.Discriminator`` of the same resolution.
        config: optimisation settings.
        seed: seed of the state's own random generator (payload bits, noise, dummy noise, degradations).
    """

    def __init__(self, model: G2Face, discriminator: nn.Module, config: TrainConfig = TrainConfig(), seed: int = 0):
        self.model, self.discriminator, self.config = model, discriminator, config
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        groups = model.parameter_groups()
        self.opt_g = torch.optim.Adam([
            {"params": groups["new"], "lr": config.lr_new, "name": "new"},
            {"params": groups["synthesis"], "lr": config.lr_synthesis, "name": "synthesis"},
        ], betas=config.betas)
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr_discriminator, betas=config.betas)
        self.base_lrs = [config.lr_new, config.lr_synthesis]
        self.step = 0
        self.rng = torch.Generator(device="cpu")
        self.rng.manual_seed(seed)
        # Data-parallel training sets this: averages the gradients of the given parameters across workers.
        self.grad_sync: Callable[[list[Tensor]], None] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng": self.rng.get_state(),
            "config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = dataclasses.asdict(self.config)
        # A setting added after the checkpoint was written counts as its default (which keeps the old behaviour).
        saved = _with_defaults(state["config"], dataclasses.asdict(TrainConfig()))
        if saved != mine:
            diff = sorted(k for k in mine if saved.get(k) != mine[k])
            raise ValueError(f"training state was saved with a different TrainConfig (fields {diff}); "
                             "build the TrainState with the saved config to resume exactly")
        self.model.load_state_dict(state["model"], strict=True)
        self.ema.load_state_dict(state["ema"], strict=True)
        self.discriminator.load_state_dict(state["discriminator"], strict=True)
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.rng.set_state(state["rng"])
        self.step = int(state["step"])

    @torch.no_grad()
    def update_ema(self) -> None:
        d = self.config.ema_decay
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)


# ---------------------------------------------------------------------------------------------
# Pieces of one iteration


def draw(state: TrainState, batch_size: int) -> Draws:
    """The iteration's random inputs: dummy noise, uniform payload and placeholder bits, noise maps."""
    c, g, dev = state.model.config, state.rng, state.device
    sizes = state.model.synthesis.noise_sizes

    def noise() -> list[Tensor]:
        return [torch.randn(batch_size, 1, s, s, generator=g).to(dev) for s in sizes]

    return Draws(
        z=torch.randn(batch_size, c.dummy_noise_dim, generator=g).to(dev),
        bits=torch.randint(0, 2, (batch_size, c.payload_bits), generator=g).float().to(dev),
        placeholder=torch.randint(0, 2, (batch_size, c.payload_bits), generator=g).float().to(dev),
        noise_anonymize=noise(),
        noise_recover=noise(),
    )


def _autocast(state: TrainState):
    dev = state.device
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=state.config.autocast and dev.type == "cuda")


def _full_precision(dev: torch.device):
    return torch.autocast(dev.type, enabled=False)


def _identity(state: TrainState, priors: Priors, image: Tensor) -> Tensor:
    cfg = state.config.identity_perturb
    if cfg is not None:
        with _full_precision(image.device):
            image = degrade.perturb_for_identity(image.float(), cfg, state.rng)
    return priors.identity(image)


def hidden_logits(state: TrainState, priors: Priors, image: Tensor, background: Tensor) -> Tensor:
    """Payload logits read back after paste-back into ``background``, re-alignment and encoding."""
    with _full_precision(image.device):
        seen = degrade.random_paste_and_realign(image.float(), background.float(), priors.paste_mask,
                                                state.config.paste, state.rng)
    return state.model.extract_logits(seen)


def _reconstruction(state: TrainState, priors: Priors, output: Tensor, target: Tensor) -> dict[str, Tensor]:
    w = state.config.weights
    terms = {"l1": losses.l1_loss(output.float(), target.float())}
    if priors.lpips is not None:
        terms["lpips"] = priors.lpips(output, target).float().mean()
    else:
        if w.ms_ssim:
            terms["ms_ssim"] = losses.ms_ssim_loss(output.float(), target.float())
        if w.feature_matching:
            terms["feature_matching"] = losses.feature_matching_loss(state.discriminator, output, target).float()
    return terms


def _weighted(terms: dict[str, Tensor], w: LossWeights) -> Tensor:
    table = {
        "l1": w.l1, "lpips": w.lpips, "ms_ssim": w.ms_ssim, "feature_matching": w.feature_matching,
        "identity_dummy": w.identity_dummy, "identity_dissimilar": w.identity_dissimilar,
        "identity_recover": w.identity_recover, "diversity": w.diversity,
        "geometry_coefficients": w.geometry_coefficients, "geometry_landmarks": w.geometry_landmarks,
        "hiding": w.hiding, "adversarial": w.adversarial, "payload_visibility": w.payload_visibility,
        "detectability": w.detectability, "wrong_key": w.wrong_key,
    }
    return sum(table[k] * v for k, v in terms.items())


def _payload_visibility(state: TrainState, priors: Priors, output: Tensor, source: Tensor, identity: Tensor,
                        geometry: Tensor, noise) -> Tensor:
    """Visibility penalty of the payload in ``output`` = G(source, w(identity, geometry), bits): the same
    generation without payload is the reference (no gradient; one extra forward pass)."""
    model = state.model
    with torch.no_grad():
        reference = model.generate(source, model.styles(identity, geometry),
                                   torch.zeros(output.shape[0], model.config.payload_bits, device=output.device), noise)
    return losses.payload_visibility_loss(output, reference, priors.paste_mask, state.config.weights.payload_min_psnr)


# box jitter of the detectability term, in box sides (dx, dy) and log-scale: MTCNN's proposals wander
DETECTABILITY_JITTER = (0.05, 0.05, 0.1)


def _detectability(state: TrainState, priors: Priors, image: Tensor) -> Tensor:
    """MTCNN's -log p(face) of ``image`` at a jittered copy of its aligned-crop box (drawn from the state's
    generator only when the term is on, so runs without it keep their random streams)."""
    if priors.detector is None:
        raise ValueError("weights.detectability > 0 needs Priors.detector (g2face.mtcnn.load_face_detectability)")
    scale = torch.tensor(DETECTABILITY_JITTER)
    jitter = (torch.randn(image.shape[0], 3, generator=state.rng) * scale).to(image.device)
    with _full_precision(image.device):
        return mtcnn.detectability_loss(priors.detector(image.float(), jitter))


@dataclass
class PassResult:
    total: Tensor
    terms: dict[str, Tensor]
    image: Tensor
    geometry: Tensor
    camera: Tensor
    hiding_ber: Tensor


def anonymization_pass(state: TrainState, priors: Priors, x: Tensor, id_o: Tensor, geo_o: Tensor, cam_o: Tensor,
                       draws: Draws) -> PassResult:
    """Forward of the anonymisation pass and its weighted loss (no backward)."""
    model, w = state.model, state.config.weights
    with _autocast(state):
        dummy = model.dummy(draws.z)
        x_a = model.generate(x, model.styles(dummy, geo_o), draws.bits, draws.noise_anonymize)
        id_a = _identity(state, priors, x_a)
        geo_a, cam_a = priors.geometry(x_a)
        logits = hidden_logits(state, priors, x_a, x)
        terms = {
            "identity_dummy": losses.identity_dummy_loss(dummy, id_a),
            "identity_dissimilar": losses.identity_dissimilar_loss(id_o, id_a, w.dissimilar_margin),
            "diversity": losses.diversity_loss(dummy),
            "geometry_coefficients": losses.geometry_coefficient_loss(geo_a, geo_o),
            "geometry_landmarks": losses.geometry_landmark_loss(geo_a, cam_a, geo_o, cam_o, x.shape[-1]),
            "adversarial": losses.generator_adversarial_loss(state.discriminator(x_a)),
            "hiding": losses.hiding_loss(logits, draws.bits),
        }
        if w.anonymized_reconstruction:
            terms.update(_reconstruction(state, priors, x_a, x))
        if w.payload_min_psnr is not None:
            terms["payload_visibility"] = _payload_visibility(state, priors, x_a, x, dummy, geo_o,
                                                              draws.noise_anonymize)
        if w.detectability > 0:
            terms["detectability"] = _detectability(state, priors, x_a)
    return PassResult(_weighted(terms, w), terms, x_a, geo_a, cam_a, losses.bit_error_rate(logits, draws.bits))


def recovery_pass(state: TrainState, priors: Priors, x: Tensor, id_o: Tensor, geo_o: Tensor, cam_o: Tensor,
                  anonymized: PassResult, draws: Draws) -> PassResult:
    """Forward of the recovery pass (teacher-forced with the true identity) and its weighted loss."""
    model, w = state.model, state.config.weights
    x_a = anonymized.image.detach()
    with _autocast(state):
        x_r = model.generate(x_a, model.styles(id_o, anonymized.geometry.detach()), draws.placeholder,
                             draws.noise_recover)
        id_r = _identity(state, priors, x_r)
        geo_r, cam_r = priors.geometry(x_r)
        logits = hidden_logits(state, priors, x_r, x_a)  # a recovered face is pasted into the anonymised photo
        terms = {
            "identity_recover": losses.identity_recover_loss(id_o, id_r),
            "geometry_coefficients": losses.geometry_coefficient_loss(geo_r, geo_o),
            "geometry_landmarks": losses.geometry_landmark_loss(geo_r, cam_r, geo_o, cam_o, x.shape[-1]),
            "adversarial": losses.generator_adversarial_loss(state.discriminator(x_r)),
            "hiding": losses.hiding_loss(logits, draws.placeholder),
            **_reconstruction(state, priors, x_r, x),
        }
        if w.payload_min_psnr is not None:
            terms["payload_visibility"] = _payload_visibility(state, priors, x_r, x_a, id_o,
                                                              anonymized.geometry.detach(), draws.noise_recover)
        if w.wrong_key > 0:
            terms["wrong_key"] = wrong_key_term(state, priors, id_o, anonymized, draws)
        total = _weighted(terms, w)
        if w.own_identity > 0:
            own = own_identity_terms(state, priors, x, id_o, geo_o, draws)
            total = total + w.own_identity * _weighted(own, dataclasses.replace(w, identity_recover=1.0))
            terms.update({f"own_{k}": v for k, v in own.items()})
    return PassResult(total, terms, x_r, geo_r, cam_r, losses.bit_error_rate(logits, draws.placeholder))


def wrong_key_term(state: TrainState, priors: Priors, id_o: Tensor, anonymized: PassResult, draws: Draws) -> Tensor:
    """``LossWeights.wrong_key``: the recovery pass given the anonymized face's own identity (the key-less
    attacker's guess, same placeholder bits and noise) must not show the original."""
    model = state.model
    x_a = anonymized.image.detach()
    guess = _identity(state, priors, x_a).detach()
    x_w = model.generate(x_a, model.styles(guess, anonymized.geometry.detach()), draws.placeholder, draws.noise_recover)
    return losses.identity_dissimilar_loss(id_o, _identity(state, priors, x_w), state.config.weights.wrong_key_margin)


def own_identity_terms(state: TrainState, priors: Priors, x: Tensor, id_o: Tensor, geo_o: Tensor,
                       draws: Draws) -> dict[str, Tensor]:
    """The own-identity pass (``LossWeights.own_identity``): G(x, w(id_o, geo_o), bits) with the anonymisation
    pass's bits and noise (no new draws) must keep the person and the pixels."""
    model = state.model
    x_s = model.generate(x, model.styles(id_o, geo_o), draws.bits, draws.noise_anonymize)
    return {"identity_recover": losses.identity_recover_loss(id_o, _identity(state, priors, x_s)),
            **_reconstruction(state, priors, x_s, x)}


def discriminator_pass(state: TrainState, real: Tensor, fake: Tensor, with_r1: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """Discriminator loss on real and fake images, plus the weighted R1 penalty when ``with_r1``."""
    w = state.config.weights
    real = real.detach().requires_grad_(with_r1)
    with _autocast(state):
        real_logits = state.discriminator(real)
        fake_logits = state.discriminator(fake.detach())
        terms = {"discriminator": losses.discriminator_loss(real_logits, fake_logits)}
    total = terms["discriminator"]
    if with_r1:
        terms["r1"] = losses.r1_penalty(real_logits, real)
        total = total + w.r1 * terms["r1"]
    return total, terms


def reference_priors(state: TrainState, priors: Priors, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x, identity, geometry, camera) of the batch on the model's device; missing ones from the priors."""
    dev = state.device
    x = batch.image.to(dev, torch.float32)
    r = state.model.config.resolution
    if x.ndim != 4 or x.shape[1:] != (3, r, r):
        raise ValueError(f"batch.image must be (B, 3, {r}, {r}) in [-1, 1], got {tuple(x.shape)}")
    with torch.no_grad():
        identity = batch.identity.to(dev).float() if batch.identity is not None else priors.identity(x).float()
        if batch.geometry is None or batch.camera is None:
            geometry, camera = priors.geometry(x)
        else:
            geometry, camera = batch.geometry, batch.camera
    return x, identity, geometry.to(dev).float(), camera.to(dev).float()


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _step(optimizer: torch.optim.Optimizer, loss: Tensor, clip: float,
          grad_sync: Callable[[list[Tensor]], None] | None = None) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grad_sync is not None:
        grad_sync(params)
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    optimizer.step()
    return float(norm)


def train_step(state: TrainState, batch: Batch, priors: Priors) -> dict[str, float]:
    """One full iteration (anonymisation step, recovery step, discriminator step, EMA); returns metrics."""
    cfg = state.config
    model, disc = state.model, state.discriminator
    factor = cfg.lr_factor(state.step)
    for group, base in zip(state.opt_g.param_groups, state.base_lrs):
        group["lr"] = base * factor
    model.train()
    disc.train()
    x, id_o, geo_o, cam_o = reference_priors(state, priors, batch)
    draws = draw(state, x.shape[0])

    _set_requires_grad(disc, False)
    anon = anonymization_pass(state, priors, x, id_o, geo_o, cam_o, draws)
    norm_a = _step(state.opt_g, anon.total, cfg.grad_clip, state.grad_sync)
    rec = recovery_pass(state, priors, x, id_o, geo_o, cam_o, anon, draws)
    norm_r = _step(state.opt_g, rec.total, cfg.grad_clip, state.grad_sync)
    _set_requires_grad(disc, True)

    fake = rec.image if state.step % 2 == 0 else anon.image
    with_r1 = cfg.weights.r1 > 0 and state.step % cfg.weights.r1_interval == 0
    d_total, d_terms = discriminator_pass(state, x, fake, with_r1)
    norm_d = _step(state.opt_d, d_total, cfg.grad_clip, state.grad_sync)
    state.update_ema()
    state.step += 1

    out = {"step": state.step, "lr_factor": factor, "anonymize/total": float(anon.total.detach()),
           "recover/total": float(rec.total.detach()), "discriminator/total": float(d_total.detach()),
           "anonymize/hiding_ber": float(anon.hiding_ber), "recover/hiding_ber": float(rec.hiding_ber),
           "grad_norm/anonymize": norm_a, "grad_norm/recover": norm_r, "grad_norm/discriminator": norm_d}
    out.update({f"anonymize/{k}": float(v.detach()) for k, v in anon.terms.items()})
    out.update({f"recover/{k}": float(v.detach()) for k, v in rec.terms.items()})
    out.update({f"discriminator/{k}": float(v.detach()) for k, v in d_terms.items()})
    bad = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite training values at step {state.step}: {bad}")
    return out


# ---------------------------------------------------------------------------------------------
# Priors built from the shipped networks


def dlib_identity(network: nn.Module, crop_landmarks) -> IdentityFn:
    """Identity prior from the dlib ResNet port: aligned crop in [-1, 1] -> chip -> 128-d descriptor.

    Args:
        network: ``identity.load_dlib_face_resnet(value_range=(-1, 1))`` (frozen).
        crop_landmarks: the aligner's 5-point template in crop pixels (``pipeline.align.template(R)``).
    """
    from .identity import aligned_to_chip

    def identity(image: Tensor) -> Tensor:
        return network(aligned_to_chip(image, crop_landmarks))

    return identity


# ---------------------------------------------------------------------------------------------
# Hiding warm-up: the hiding objective alone, with the generator's image path fixed


def hiding_parameters(model: G2Face) -> list[nn.Parameter]:
    """What the hiding warm-up trains: the payload injections, the fusion masks they feed, the synthesis
    network that carries the payload to the pixels, and the extractor (not the encoder or mapper)."""
    return [*model.hiding.parameters(), *model.fusion.parameters(), *model.synthesis.parameters(),
            *model.extractor.parameters()]


def zero_noise(model: G2Face, batch_size: int, device: torch.device | str = "cpu") -> list[Tensor]:
    return [torch.zeros(batch_size, 1, s, s, device=device) for s in model.synthesis.noise_sizes]


def payload_residual(model: G2Face, faces: Tensor, w_plus: Tensor, bits: Tensor) -> Tensor:
    """What the payload changes in the generator's output: G(x, w, bits) - G(x, w, 0), noise off.

    Everything in the output that does not depend on the payload cancels, so ``faces + residual`` keeps
    the image path fixed to the real face while the generator's weights stay trainable. It is exactly 0
    while the hiding gains are 0. Both terms run as one batch (the generator has no batch coupling).
    """
    b = faces.shape[0]
    both = model.generate(torch.cat([faces, faces]), torch.cat([w_plus, w_plus]),
                          torch.cat([bits, torch.zeros_like(bits)]), zero_noise(model, 2 * b, faces.device))
    return both[:b] - both[b:]


def hiding_warmup_loss(model: G2Face, faces: Tensor, w_plus: Tensor, bits: Tensor, paste_mask: Tensor,
                       paste: degrade.PasteBackConfig, generator: torch.Generator, *, hiding_weight: float = 10.0,
                       min_psnr: float = 30.0, distortion_weight: float = 10.0) -> tuple[Tensor, Tensor, Tensor]:
    """The hiding objective alone on real faces: returns (loss, bit logits, image = faces + payload residual).

    loss = hiding_weight * BCE(extract(paste/re-align/encode(image)), bits)
           + distortion_weight * max(0, MSE_visible / MSE_budget - 1),
    where MSE_visible is the change seen through the paste mask (what the published photo shows) and
    the budget is the MSE of ``min_psnr`` dB on the [-1, 1] scale. Usable as a warm-up stage before
    full training (the hiding path otherwise starts from zero gains and a random extractor) and as the
    test that hiding can learn.
    """
    image = faces + payload_residual(model, faces, w_plus, bits)
    with _full_precision(image.device):
        seen = degrade.random_paste_and_realign(image.float(), faces.float(), paste_mask, paste, generator)
    logits = model.extract_logits(seen)
    visible = losses.visible_mse(image, faces, paste_mask)
    loss = hiding_weight * losses.hiding_loss(logits, bits) + distortion_weight * losses.over_budget(visible, min_psnr)
    return loss, logits, image
