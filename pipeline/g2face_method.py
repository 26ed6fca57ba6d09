"""``anonymizer.method: g2face``: the G2Face model as a pipeline anonymizer.

Per batch of aligned crops: the identity embedding (dlib ResNet port through the differentiable chip
warp) and the geometry (the shipped regressor) are computed on the crops, then the model anonymizes
them. The model comes only from an inference artifact the job names (``anonymizer.checkpoint``),
hash-checked and strictly loaded: never random weights.

Payload: until key-gated recovery is wired in (issue 7), this method runs in *irreversible* mode:
the bits the model hides are uniform random bits drawn from each face's seed. They carry no
information about the person, so nothing can be recovered from them by anyone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import align

PAYLOAD_STREAM = 0x5A17  # random stream of the irreversible-mode payload bits


class G2FaceUnavailable(RuntimeError):
    pass


def irreversible_bits(seeds: list[int], n_bits: int) -> torch.Tensor:
    """(B, n_bits) uniform 0/1 from each face's seed: an information-free payload."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed((int(s) ^ PAYLOAD_STREAM) & (2**63 - 1))
        rows.append(torch.randint(0, 2, (n_bits,), generator=g, dtype=torch.int64))
    return torch.stack(rows).float()


class G2FaceAnonymizer:
    """G2Face on aligned crops.

    Args:
        checkpoint: path of a G2Face inference artifact (g2face.checkpoint.save_artifact).
        resolution: the pipeline's aligned crop side; must equal the artifact's resolution.
        expected_sha256: pin the artifact's content hash (None accepts any valid artifact).
    """

    def __init__(self, checkpoint: str | None, resolution: int, expected_sha256: str | None = None):
        if not checkpoint:
            raise G2FaceUnavailable(
                "anonymizer.method 'g2face' needs anonymizer.checkpoint: the path of a G2Face inference artifact "
                "(no trained model ships with this version); use 'blur' or 'pixelate' until one is available"
            )
        from g2face.checkpoint import load_artifact

        self.checkpoint = checkpoint
        self.resolution = resolution
        try:
            self.model = load_artifact(checkpoint, expected_sha256=expected_sha256)  # hash + strict load, fails early
        except (OSError, ValueError) as e:
            raise G2FaceUnavailable(
                f"anonymizer.checkpoint {checkpoint}: {e}; fix the path, or set anonymizer.method to 'blur' or "
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
        self.model_id = f"g2face:{cfg.name}:{self.model.artifact_sha256[:16]}:irreversible"

    def setup(self, device: torch.device) -> None:
        from g2face.geometry_net import load_geometry_net
        from g2face.identity import load_dlib_face_resnet

        self.device = device
        self.model = self.model.to(device)
        self.identity_net = load_dlib_face_resnet().to(device)
        self.geometry_net = load_geometry_net(device=device)
        self.template = align.template(self.resolution)

    @torch.no_grad()
    def priors(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity embeddings (B, 128) and geometry (B, 53) of aligned crops in [0, 1]."""
        from g2face.identity import aligned_to_chip

        identity = self.identity_net(aligned_to_chip(faces, self.template))
        x = faces if faces.shape[-1] == 128 else F.interpolate(faces, size=128, mode="bilinear", antialias=True, align_corners=False)
        geometry = self.geometry_net(x).geometry
        return identity, geometry

    def anonymize(self, faces: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        assert faces.ndim == 4 and faces.shape[1:] == (3, self.resolution, self.resolution), faces.shape
        assert len(seeds) == faces.shape[0]
        identity, geometry = self.priors(faces)
        bits = irreversible_bits(list(seeds), self.model.config.payload_bits).to(faces.device)
        return self.model.anonymize(faces, identity, geometry, bits, list(seeds))
