"""The assembled G2Face model: training hooks and the batched inference API.

Value ranges: the inference API (``anonymize``, ``extract``, ``recover``) takes and returns faces as
float tensors in **[0, 1]** (B, 3, R, R), the pipeline's convention; returned faces are clamped to
[0, 1]. Internally, and in the training hooks (``styles``, ``generate``, ``extract_logits``), images are
in **[-1, 1]** and never clamped, as in the official code.

Determinism: every random draw of the inference API (dummy-identity noise, StyleGAN noise maps,
recovery placeholder bits) comes from a per-face CPU ``torch.Generator`` seeded from that face's seed,
so a face's output depends only on its own inputs and seed, on any device. The API always runs the
networks in eval mode (running statistics, never batch statistics) and without gradients. Outputs are
bit-identical for the same inputs on the same device and settings (on CUDA, set
``torch.backends.cudnn.deterministic = True`` and leave ``benchmark`` off for that).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import G2FaceConfig
from .encoder import FaceEncoder, IdentityAwareFusion, PasswordHiding
from .extractor import PasswordExtractor
from .mapper import DummyIdentityGenerator, LatentMapper
from .stylegan2 import SynthesisNetwork
from .payload_layout import from_grid, grid_layout, to_grid

# Independent random streams per face, so e.g. the dummy identity does not change with the noise maps.
STREAM_DUMMY, STREAM_ANONYMIZE, STREAM_RECOVER = 1, 2, 3
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def face_generator(seed: int, stream: int) -> torch.Generator:
    """CPU generator for one face and one purpose; distinct (seed, stream) pairs give unrelated streams."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_splitmix64(_splitmix64(seed) ^ stream))
    return g


def push_from_original(w_dummy: Tensor, w_original: Tensor, strength: Tensor) -> Tensor:
    """Style codes (B, n_latent, style_dim) moved past the dummy's, away from the original identity's:
    ``w_dummy + strength * (w_dummy - w_original)`` per face (``strength`` (B,), 0 leaves a code as it is).

    Not in the paper: an inference-time option for faces whose plain draws all still show the person
    (``pipeline.redraw``). It changes only which point of the mapper's own style space the generator
    renders, never pixels, so what comes out is still a face the generator draws."""
    assert w_dummy.shape == w_original.shape and strength.shape == w_dummy.shape[:1], (
        w_dummy.shape, w_original.shape, strength.shape)
    s = strength.to(w_dummy.dtype)[:, None, None]
    return w_dummy + s * (w_dummy - w_original)


def _check_seeds(seeds: Sequence[int] | Tensor, batch: int) -> list[int]:
    values = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
    if len(values) != batch:
        raise ValueError(f"need one seed per face: got {len(values)} seeds for {batch} faces")
    for s in values:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= _MASK64:
            raise ValueError(f"seeds must be integers in [0, 2**64), got {s!r}")
    return values


class G2Face(nn.Module):
    """G2Face: identity-aware anonymisation with a hidden, recoverable payload.

    Args:
        config: sizes of every part (see ``G2FaceConfig``; presets ``paper-256`` and ``lite-128``).

    Parts: ``dummy`` (noise -> dummy identity), ``mapper`` (identity + geometry -> w+), ``encoder``
    (face -> multi-scale features), ``fusion`` (IFF masks), ``hiding`` (payload projections),
    ``synthesis`` (StyleGAN2 synthesis net) and ``extractor`` (image -> payload bit logits). The
    discriminator is training-only and lives outside (``stylegan2.Discriminator``).
    """

    def __init__(self, config: G2FaceConfig):
        super().__init__()
        c = self.config = config
        self.dummy = DummyIdentityGenerator(c.dummy_noise_dim, c.dummy_hidden_dim, c.identity_dim, c.dummy_norm)
        self.mapper = LatentMapper(c.identity_dim, c.geometry_dim, c.style_dim, c.mapper_layers, c.mapper_lr_mul,
                                   c.mapper_doubled_bias, c.style_split)
        self.encoder = FaceEncoder(c.resolution, c.channels)
        self.fusion = IdentityAwareFusion(c.resolution, c.channels, c.hiding_resolutions, c.fusion_mask_norm)
        grid_bits, positions = grid_layout(c.resolution, c.payload_bits, c.payload_region)
        # Derived from the config, so not part of the state dict.
        self.register_buffer("payload_positions", positions, persistent=False)
        self.hiding = PasswordHiding(grid_bits, c.hiding_resolutions,
                                     [c.channels_at(r) for r in c.hiding_resolutions])
        self.synthesis = SynthesisNetwork(c.resolution, c.channels, c.style_dim, c.blur_kernel)
        self.extractor = PasswordExtractor(c.resolution, grid_bits, c.extractor_width, c.extractor_blocks)

    # ---- training hooks: images in [-1, 1], gradients flow ---------------------------------------
    def styles(self, identity: Tensor, geometry: Tensor) -> Tensor:
        """w+ (B, n_latent, style_dim) for an identity embedding and geometry coefficients."""
        return self.mapper(identity, geometry)

    def generate(self, image: Tensor, w_plus: Tensor, payload_bits: Tensor,
                 noise: Sequence[Tensor] | None = None) -> Tensor:
        """The generator G(x, w+, P): encoder features blended into the synthesis at every resolution,
        payload injected at the hiding resolutions. ``noise=None`` draws fresh noise from the global RNG."""
        features = self.encoder(image)
        assert payload_bits.shape[1:] == (self.config.payload_bits,), (payload_bits.shape, self.config.payload_bits)
        bits = to_grid(payload_bits.to(image.dtype), self.hiding.payload_bits, self.payload_positions)

        def fuse(side: int, generated: Tensor) -> Tensor:
            encoded = features[self.fusion.level(side)]
            if side in self.hiding.resolutions:
                hidden_mask, hidden_add = self.hiding(bits, side)
                return self.fusion(generated, encoded, hidden_mask, hidden_add)
            return self.fusion(generated, encoded)

        return self.synthesis(w_plus, noise, fuse)

    forward = generate

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``synthesis`` (the part initialised from a pretrained StyleGAN2; the official recipe fine-tunes
        it at a tenth of the learning rate) and ``new`` (everything else)."""
        synthesis = list(self.synthesis.parameters())
        ids = {id(p) for p in synthesis}
        return {"synthesis": synthesis, "new": [p for p in self.parameters() if id(p) not in ids]}

    def extract_logits(self, image: Tensor) -> Tensor:
        """Payload bit logits (B, payload_bits) from an image in [-1, 1]."""
        return from_grid(self.extractor(image), self.payload_positions)

    def noise_from_seeds(self, seeds: Sequence[int], stream: int, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """Deterministic StyleGAN noise maps, one list entry per StyledConv, each (B, 1, s, s)."""
        gens = [face_generator(s, stream) for s in seeds]
        return self._noise(gens, device, dtype)

    def _noise(self, gens: list[torch.Generator], device, dtype) -> list[Tensor]:
        return [torch.stack([torch.randn(1, s, s, generator=g) for g in gens]).to(device, dtype)
                for s in self.synthesis.noise_sizes]

    # ---- inference API: faces in [0, 1] ------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in modes.items():
                m.training = mode

    def _target(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.parameters())
        return p.device, p.dtype

    def _faces_in(self, faces: Tensor) -> Tensor:
        r = self.config.resolution
        if faces.ndim != 4 or faces.shape[1:] != (3, r, r) or not faces.is_floating_point():
            raise ValueError(f"faces must be a float tensor (B, 3, {r}, {r}) in [0, 1], got "
                             f"{tuple(faces.shape)} {faces.dtype}")
        device, dtype = self._target()
        return faces.to(device, dtype) * 2 - 1

    def _vectors_in(self, name: str, x: Tensor, batch: int, dim: int) -> Tensor:
        if x.shape != (batch, dim):
            raise ValueError(f"{name} must be ({batch}, {dim}), got {tuple(x.shape)}")
        device, dtype = self._target()
        return x.to(device, dtype)

    def _bits_in(self, bits: Tensor, batch: int) -> Tensor:
        bits = self._vectors_in("payload_bits", bits, batch, self.config.payload_bits)
        if not bool(((bits == 0) | (bits == 1)).all()):
            raise ValueError("payload_bits must hold only 0 and 1")
        return bits

    @staticmethod
    def _faces_out(image: Tensor, dtype: torch.dtype) -> Tensor:
        return ((image.float() + 1) / 2).clamp(0, 1).to(dtype)

    def dummy_identities(self, seeds: Sequence[int], identity: Tensor | None = None, *,
                         max_cosine: float = 0.0, attempts: int = 16) -> Tensor:
        """The dummy identity of each face (B, identity_dim), drawn from its seed.

        With ``identity`` (the original faces' embeddings), draws up to ``attempts`` candidates per
        face and keeps the first whose cosine similarity to the original is at most ``max_cosine``
        (the best candidate if none is), so a dummy never lands near the person it replaces.
        """
        seeds = _check_seeds(seeds, len(seeds))
        device, dtype = self._target()
        gens = [face_generator(s, STREAM_DUMMY) for s in seeds]
        z = torch.stack([torch.randn(attempts, self.config.dummy_noise_dim, generator=g) for g in gens])
        with self._evaluating():
            if identity is None:
                return self.dummy(z[:, 0].to(device, dtype))
            identity = self._vectors_in("identity", identity, len(seeds), self.config.identity_dim)
            cands = self.dummy(z.flatten(0, 1).to(device, dtype)).reshape(len(seeds), attempts, -1)
            cos = F.cosine_similarity(cands.float(), identity.float()[:, None], dim=-1)
            ok = cos <= max_cosine
            pick = torch.where(ok.any(1), ok.float().argmax(1), cos.argmin(1))
            return cands[torch.arange(len(seeds), device=cands.device), pick]

    def anonymize(self, faces: Tensor, identity: Tensor | None, geometry: Tensor, payload_bits: Tensor,
                  seeds: Sequence[int], *, max_identity_cosine: float = 0.0, dummy_attempts: int = 16,
                  identity_push: Tensor | Sequence[float] | None = None) -> Tensor:
        """Anonymised faces (B, 3, R, R) in [0, 1].

        Args:
            faces: aligned faces in [0, 1].
            identity: the faces' identity embeddings (B, identity_dim), used only to keep each dummy
                identity away from the original (see ``dummy_identities``); None skips that check.
            geometry: the faces' geometry coefficients (B, geometry_dim), kept in the output.
            payload_bits: (B, payload_bits) of 0/1 hidden in each output (e.g. encrypted identity + ECC).
            seeds: one integer per face; same seed and inputs give bit-identical output.
            identity_push: per-face strength (B,) of ``push_from_original`` (needs ``identity``); None or 0
                renders the dummy's own style code, as the paper does.
        """
        with self._evaluating():
            x = self._faces_in(faces)
            b = x.shape[0]
            seeds = _check_seeds(seeds, b)
            geometry = self._vectors_in("geometry", geometry, b, self.config.geometry_dim)
            bits = self._bits_in(payload_bits, b)
            dummy = self.dummy_identities(seeds, identity, max_cosine=max_identity_cosine, attempts=dummy_attempts)
            noise = self.noise_from_seeds(seeds, STREAM_ANONYMIZE, x.device, x.dtype)
            w = self.styles(dummy, geometry)
            if identity_push is not None:
                push = torch.as_tensor(identity_push, dtype=torch.float32).flatten().to(x.device)
                if push.shape != (b,) or not bool(torch.isfinite(push).all()) or bool((push < 0).any()):
                    raise ValueError(f"identity_push must be {b} finite strengths >= 0 (one per face), got "
                                     f"{push.tolist() if push.numel() <= 8 else tuple(push.shape)}")
                if bool((push > 0).any()):
                    if identity is None:
                        raise ValueError("identity_push needs the original faces' identity embeddings")
                    w = push_from_original(w, self.styles(self._vectors_in("identity", identity, b,
                                                                           self.config.identity_dim), geometry), push)
            out = self.generate(x, w, bits, noise)
            return self._faces_out(out, faces.dtype)

    def extract(self, faces: Tensor) -> Tensor:
        """Payload bit logits (B, payload_bits), float32; a bit reads as 1 where its logit is > 0."""
        with self._evaluating():
            return self.extract_logits(self._faces_in(faces)).float()

    def recover(self, anonymized: Tensor, identity: Tensor, geometry: Tensor, seeds: Sequence[int] | None = None,
                placeholder_bits: Tensor | None = None) -> Tensor:
        """Faces (B, 3, R, R) in [0, 1] re-synthesised with the original identity.

        Args:
            anonymized: anonymised faces in [0, 1].
            identity: the original identity embeddings (B, identity_dim), e.g. decoded from the payload.
            geometry: geometry coefficients of the *anonymised* faces (B, geometry_dim).
            seeds: per-face seeds for the noise maps and placeholder bits (default 0 for every face).
            placeholder_bits: the payload input the generator still needs (B, payload_bits); default
                uniform random bits from the seed, the distribution the official training used.
        """
        with self._evaluating():
            x = self._faces_in(anonymized)
            b = x.shape[0]
            seeds = _check_seeds([0] * b if seeds is None else seeds, b)
            identity = self._vectors_in("identity", identity, b, self.config.identity_dim)
            geometry = self._vectors_in("geometry", geometry, b, self.config.geometry_dim)
            gens = [face_generator(s, STREAM_RECOVER) for s in seeds]
            noise = self._noise(gens, x.device, x.dtype)
            if placeholder_bits is None:
                placeholder_bits = torch.stack(
                    [torch.randint(0, 2, (self.config.payload_bits,), generator=g) for g in gens])
            bits = self._bits_in(placeholder_bits, b)
            out = self.generate(x, self.styles(identity, geometry), bits, noise)
            return self._faces_out(out, anonymized.dtype)
