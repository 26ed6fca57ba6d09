"""Identity guard: a generated face that still looks like the person it replaces is not anonymized.

G2Face changes identity through a learned generator, and no generator succeeds on every face. The guard
compares the dlib identity embedding (the PyTorch port, ``g2face.identity``) of each original aligned crop
with that of its G2Face output; a face whose distance is below ``max_distance`` (dlib's same-person
threshold is 0.6) is handled by the job's ``anonymizer.identity_guard`` policy instead of being published
(``AnonymizeStage``). Embeddings live only inside ``distances``; nothing but the verdict leaves it.
"""
from __future__ import annotations

import numpy as np
import torch

from . import align

GUARD_ACTIONS = ("fallback", "withhold", "off")


class IdentityGuard:
    """Distances between original and anonymized aligned crops in dlib's identity space.

    Args:
        resolution: aligned crop side of the job.
        max_distance: a face whose distance to its original is below this still matches it.
        action: 'fallback' (the job's fallback method replaces the face) or 'withhold' (the image is not
            published); see ``AnonymizerSpec.identity_guard``.
    """

    def __init__(self, resolution: int, max_distance: float, action: str):
        if action not in GUARD_ACTIONS[:2]:
            raise ValueError(f"identity guard action must be one of {GUARD_ACTIONS[:2]}, got {action!r}")
        self.resolution = resolution
        self.max_distance = float(max_distance)
        self.action = action
        self.net = None

    def setup(self, device: torch.device) -> None:
        from g2face.identity import load_dlib_face_resnet  # hash-checked, strict

        self.device = device
        self.net = load_dlib_face_resnet(device=device)
        self.template = align.template(self.resolution)

    @torch.no_grad()
    def distances(self, originals: torch.Tensor, anonymized: torch.Tensor) -> np.ndarray:
        """Euclidean dlib-embedding distance per face; both (B, 3, R, R) in [0, 1]."""
        from g2face.identity import aligned_to_chip

        assert originals.shape == anonymized.shape and originals.shape[1:] == (3, self.resolution, self.resolution), (
            originals.shape, anonymized.shape)
        b = originals.shape[0]
        both = torch.cat([originals, anonymized]).to(self.device, torch.float32)
        emb = self.net(aligned_to_chip(both, self.template)).float()
        return (emb[:b] - emb[b:]).norm(dim=1).cpu().numpy()

    def still_matches(self, originals: torch.Tensor, anonymized: torch.Tensor) -> np.ndarray:
        """(B,) bool: the anonymized face still matches its original."""
        return self.distances(originals, anonymized) < self.max_distance
