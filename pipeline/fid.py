"""FID of a run's faces: original aligned crops vs. the same crops of the images as written.

The audit feeds each face it re-reads (in run order, so the set is deterministic) to a ``FidCollector`` until
``max_faces`` faces are in; features of originals are cached by input hash and transform, shared between the
run and its baselines. Only Inception features are held, in memory, never written.
"""

from __future__ import annotations

import numpy as np
import torch

from g2face.inception import InceptionFeatures, fid, load_inception

MAX_FID_FACES = 1000
BATCH = 16
SMALL_SAMPLE_NOTE = (
    "FID is biased upwards on small samples (it estimates a 2048x2048 covariance; with fewer faces than 2048 "
    "that estimate is singular) and the bias grows as the number of faces falls: compare FIDs only at equal face "
    "counts and with the same weights."
)
FORMAT_NOTE = {
    "reference": "pytorch-fid's port of the TensorFlow Inception graph FID is defined on: comparable with "
    "published FIDs at the same face count and crop.",
    "pytorch-fid": "the layout of pytorch-fid's weights, but not its reference file (the sha256 does not start "
    "with 6726825d): comparable between the rows of this report only, not with published FIDs.",
    "torchvision": "torchvision's ImageNet Inception-v3, which is not the graph FID is defined on: comparable "
    "between the rows of this report only, not with published FIDs.",
}


class FidCollector:
    """Inception features of up to ``max_faces`` (original, anonymized) crop pairs of one run."""

    def __init__(self, model: InceptionFeatures, cache: dict, max_faces: int = MAX_FID_FACES) -> None:
        self.model, self.cache, self.max_faces = model, cache, max_faces
        self.device = next(model.parameters()).device
        self.orig: list[np.ndarray] = []
        self.anon: list[np.ndarray] = []
        self._pending: list[tuple[np.ndarray, np.ndarray, tuple]] = []
        self._taken = 0

    @property
    def full(self) -> bool:
        return self._taken >= self.max_faces

    def add(self, original: np.ndarray, anonymized: np.ndarray, key: tuple) -> None:
        """One face: two (S, S, 3) uint8 RGB crops; ``key`` names the original crop for the cache."""
        if self.full:
            return
        self._taken += 1
        self._pending.append((original, anonymized, ("fid", self.model.weights_format) + tuple(key)))
        if len(self._pending) >= BATCH:
            self.flush()

    @torch.no_grad()
    def _features(self, crops: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(crops)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return self.model(x).double().cpu().numpy()

    def flush(self) -> None:
        if not self._pending:
            return
        need = [i for i, p in enumerate(self._pending) if p[2] not in self.cache]
        if need:
            for i, f in zip(need, self._features([self._pending[i][0] for i in need])):
                self.cache[self._pending[i][2]] = f
        self.orig += [self.cache[p[2]] for p in self._pending]
        self.anon += list(self._features([p[1] for p in self._pending]))
        self._pending.clear()

    def result(self, label: str) -> dict:
        self.flush()
        n = len(self.orig)
        if n < 2:
            return {"label": label, "faces": n, "value": None,
                    "reason": "fewer than 2 faces could be re-read; a covariance needs at least 2"}
        return {"label": label, "faces": n, "value": fid(np.stack(self.orig), np.stack(self.anon))}
