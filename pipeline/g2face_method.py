"""``anonymizer.method: g2face``: the G2Face model as a pipeline anonymizer.

Per batch of aligned crops: the identity embedding (dlib ResNet port through the differentiable chip
warp) and the geometry (the shipped regressor) are computed on the crops, then the model anonymizes
them. The model comes only from an inference artifact: the one the job names (``anonymizer.checkpoint``)
or, when it names none, the shipped default (``g2face.checkpoint.SHIPPED_ARTIFACT``, pinned to its
sha256); hash-checked and strictly loaded, never random weights.

Payload (``anonymizer.payload``): in *reversible* mode (the default) the caller passes each face's
payload bits, the identity embedding encrypted and error-corrected by ``pipeline.payload`` (see
``pipeline.stages.AnonymizeStage``); the key never reaches this class. In *irreversible* mode, and whenever
no bits are passed, the hidden bits are uniform random bits drawn from each face's seed: they carry no
information about the person, so nothing can be recovered from them by anyone.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import align

PAYLOAD_STREAM = 0x5A17  # random stream of the irreversible-mode payload bits
PAYLOAD_MODES = ("reversible", "irreversible")


class G2FaceUnavailable(RuntimeError):
    pass


def irreversible_bits(seeds: list[int], n_bits: int) -> torch.Tensor:
    """(B, n_bits) uniform 0/1 from each face's seed: an information-free payload."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed((int(s) ^ PAYLOAD_STREAM) & (2**63 - 1))
        rows.append(torch.randint(0, 2, (n_bits,), generator=g, dtype=torch.int64))
    return torch.stack(rows).float()


def shipped_evaluation_path() -> Path:
    from g2face.checkpoint import SHIPPED_ARTIFACT

    return SHIPPED_ARTIFACT.with_suffix(".eval.json")


def quality_record(artifact_sha256: str) -> dict:
    """Which quality bars (issue 6) the model with this hash meets, from the evaluation shipped beside the
    default model; any other artifact is reported as not evaluated (run.json says so rather than guess)."""
    path = shipped_evaluation_path()
    ev = json.loads(path.read_text()) if path.is_file() else None
    if not ev or ev.get("model", {}).get("artifact_sha256") != artifact_sha256:
        return {"evaluated": False,
                "note": "no evaluation ships for this artifact: measure it with `g2face-pipe evaluate`"}
    bars = {k: b for k, b in ev.get("bars", {}).items() if isinstance(b, dict)}
    redraw = ev.get("model", {}).get("redraw") or {}
    reinforcement = ev.get("payload", {}).get("reinforcement") or {}
    return {
        "evaluated": True,
        "card": "g2face/weights/" + path.name.replace(".eval.json", ".md"),
        "evaluated_on": {k: ev.get("data", {}).get(k) for k in ("shards", "samples", "limit")},
        # the pipeline settings the figures rest on; a job with other settings gets other figures
        "evaluated_with": {
            "draws": redraw.get("draws", 1),
            "identity_push": redraw.get("identity_push", 0.0),
            "identity_push_after": redraw.get("identity_push_after"),
            # evaluations from before the field pushed plain draws after a pushed one anonymized
            "identity_push_hold": (bool(redraw.get("identity_push_hold", False))
                                   if redraw.get("identity_push", 0.0) > 0 else None),
            "payload_reinforce_steps": reinforcement.get("steps", 0),
            "payload_reinforce_max_change": reinforcement.get("max_change_grey_levels"),
            # evaluations from before the field kept every face's whole reinforcement
            "payload_reinforce_keep_detection": (bool(reinforcement.get("keep_detection", False))
                                                 if reinforcement.get("steps") else None),
            # None: an evaluation from before evaluate recorded it (the card then says what it was)
            "payload_format": ev.get("payload", {}).get("format_version"),
        },
        "bars_met": sorted(k for k, b in bars.items() if b.get("pass") is True),
        "bars_not_yet_met": sorted(k for k, b in bars.items() if b.get("pass") is False),
        "bars_not_measured": sorted(k for k, b in bars.items() if b.get("pass") is None),
    }


class G2FaceAnonymizer:
    """G2Face on aligned crops.

    Args:
        checkpoint: path of a G2Face inference artifact (g2face.checkpoint.save_artifact); None or '' runs
            the shipped default, pinned to ``SHIPPED_SHA256``.
        resolution: the pipeline's aligned crop side; must equal the artifact's resolution.
        expected_sha256: pin the artifact's content hash (None accepts any valid artifact; with the shipped
            default it must equal the pinned hash).
        payload_mode: 'reversible' or 'irreversible' (only labels model_id here; see the module docstring).
    """

    def __init__(self, checkpoint: str | None, resolution: int, expected_sha256: str | None = None,
                 payload_mode: str = "reversible"):
        from g2face.checkpoint import SHIPPED_ARTIFACT, SHIPPED_SHA256, load_artifact

        self.shipped = not checkpoint
        if self.shipped:
            if not SHIPPED_ARTIFACT.is_file():
                raise G2FaceUnavailable(
                    f"anonymizer.method 'g2face': the shipped model {SHIPPED_ARTIFACT} is missing from this "
                    "installation; reinstall g2face-pipe, or set anonymizer.checkpoint to a G2Face inference artifact"
                )
            if expected_sha256 is not None and expected_sha256 != SHIPPED_SHA256:
                raise G2FaceUnavailable(
                    f"the shipped model (sha256 {SHIPPED_SHA256}) is not the expected {expected_sha256}; pass that "
                    "model's artifact as the checkpoint"
                )
            checkpoint, expected_sha256 = str(SHIPPED_ARTIFACT), SHIPPED_SHA256

        self.checkpoint = checkpoint
        self.resolution = resolution
        try:
            self.model = load_artifact(checkpoint, expected_sha256=expected_sha256)  # hash + strict load, fails early
        except (OSError, ValueError) as e:
            raise G2FaceUnavailable(
                (f"the shipped model {checkpoint}: {e}; reinstall g2face-pipe" if self.shipped else
                 f"anonymizer.checkpoint {checkpoint}: {e}; fix the path") + ", or set anonymizer.method to 'blur' or "
                "'pixelate'"
            ) from None
        cfg = self.model.config
        if cfg.resolution != resolution:
            raise G2FaceUnavailable(
                f"{checkpoint} is a {cfg.resolution} px model but anonymizer.resolution is {resolution}; "
                f"set anonymizer.resolution: {cfg.resolution}"
            )
        if cfg.identity_dim != 128 or cfg.geometry_dim != 53:
            raise G2FaceUnavailable(
                f"{checkpoint} expects identity_dim={cfg.identity_dim}, geometry_dim={cfg.geometry_dim}; the "
                "pipeline's shipped priors give 128 (dlib) and 53 (3DMM): use a model trained on them"
            )
        self.artifact_sha256 = self.model.artifact_sha256
        self.payload_bits = cfg.payload_bits
        self.identity_dim = cfg.identity_dim  # length of the embedding a reversible payload carries
        self.set_payload_mode(payload_mode)

    def set_payload_mode(self, mode: str) -> None:
        if mode not in PAYLOAD_MODES:
            raise ValueError(f"anonymizer.payload must be one of {PAYLOAD_MODES}, got {mode!r}")
        self.payload_mode = mode
        self.model_id = f"g2face:{self.model.config.name}:{self.artifact_sha256[:16]}:{mode}"

    def setup(self, device: torch.device) -> None:
        from g2face.geometry_net import load_geometry_net
        from g2face.identity import load_dlib_face_resnet

        self.device = device
        self.model = self.model.to(device)
        self.identity_net = load_dlib_face_resnet().to(device)
        self.geometry_net = load_geometry_net(device=device)
        self.template = align.template(self.resolution)

    @torch.no_grad()
    def identity_embeddings(self, faces: torch.Tensor) -> torch.Tensor:
        """dlib identity embeddings (B, 128) of aligned crops in [0, 1]: what a reversible payload carries."""
        from g2face.identity import aligned_to_chip

        return self.identity_net(aligned_to_chip(faces, self.template))

    @torch.no_grad()
    def geometry(self, faces: torch.Tensor) -> torch.Tensor:
        """Geometry coefficients (B, 53) of aligned crops in [0, 1] from the shipped regressor."""
        x = faces if faces.shape[-1] == 128 else F.interpolate(faces, size=128, mode="bilinear", antialias=True, align_corners=False)
        return self.geometry_net(x).geometry

    def priors(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity embeddings (B, 128) and geometry (B, 53) of aligned crops in [0, 1]."""
        return self.identity_embeddings(faces), self.geometry(faces)

    def anonymize(self, faces: torch.Tensor, seeds: list[int], payload_bits: torch.Tensor | None = None,
                  identity: torch.Tensor | None = None, identity_push=None) -> torch.Tensor:
        """Anonymized crops in [0, 1]. payload_bits: (B, payload_bits) 0/1 to hide (None: seeded random bits);
        identity: the crops' embeddings when the caller already has them (saves a second pass); identity_push:
        per-face strengths (B,) of ``g2face.model.push_from_original`` (None: none, the paper's draw)."""
        assert faces.ndim == 4 and faces.shape[1:] == (3, self.resolution, self.resolution), faces.shape
        assert len(seeds) == faces.shape[0]
        if identity is None:
            identity = self.identity_embeddings(faces)
        geometry = self.geometry(faces)
        if payload_bits is None:
            payload_bits = irreversible_bits(list(seeds), self.payload_bits)
        return self.model.anonymize(faces, identity, geometry, payload_bits.to(faces.device).float(), list(seeds),
                                    identity_push=identity_push)

    def extract(self, faces: torch.Tensor) -> torch.Tensor:
        """Payload bit logits (B, payload_bits) read from (re-aligned) crops in [0, 1]."""
        return self.model.extract(faces)

    def bit_logits(self, faces: torch.Tensor) -> torch.Tensor:
        """Payload bit logits (B, payload_bits) of crops in [0, 1], differentiable with respect to the crops
        (payload reinforcement); the model stays in eval mode."""
        net = self.model.eval()
        p = next(net.parameters())
        return net.extract_logits(faces.to(p.device, p.dtype) * 2 - 1)

    def payload_margin_gradient(self, crops, bits, margin: float):
        """Payload reinforcement's oracle: (gradient of the bit-margin loss w.r.t. uint8 crops (N, R, R, 3) as
        float32 arrays, smallest signed bit margin per face (N,)); ``bits`` (N, payload_bits) 0/1."""
        from .payload_reinforce import margin_gradient

        return margin_gradient(self.bit_logits, crops, bits, margin, self.device)

    def recover(self, anonymized: torch.Tensor, identity: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Crops in [0, 1] re-synthesised with the decrypted identity; geometry from the anonymized crop."""
        return self.model.recover(anonymized, identity, self.geometry(anonymized), list(seeds))
