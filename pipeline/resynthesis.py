"""Key-less re-synthesis attack: what anyone holding only the published data and the public model restores.

G2Face recovers a face by re-synthesising it from the anonymized crop and the original's identity
embedding, which only the key opens (``pipeline.recover``). Nothing stops someone without the key from
running the same pass with an identity of their own choosing. If the model restores the person from the
anonymized crop itself (its encoder sees that crop, and what the anonymize pass carried over from the
original stays in it), the key adds nothing: the attacker's face matches the original as often as the key
holder's. This module runs that attack with public material only, so that ``evaluate`` and the audit can
say how often it succeeds:

- the crop: re-aligned from the published image with the transform of the public manifest's landmarks;
- the seed: the face's seed from run.json's job seed and the key as published (``stages.face_seed``), so the
  recover pass draws the same noise as the key holder's;
- the identity: the published crop's own dlib embedding (``G2FaceAnonymizer.identity_embeddings``), the
  most natural guess; other guesses (another person's embedding, the mean, zeros) did as well on the shipped
  model (300 val faces of the shipped model's full evaluation, aligned 128 px crops: 52.7%, 50.7% and 53.0%
  matching, against 51.7% with the right key; a throwaway comparison, not a committed bench).

Runs whose face seeds derive from the published key (run.json ``face_seeds``), or whose keys were published as
they were (``output.keys: keep``), are attacked as the attacker would; older pseudonymized runs derived their
seeds from the original key, which the attacker does not have.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import align
from .imaging import crops_uint8
from .stages import face_seed, seed_sample_key
from .verify import crops_tensor

# The identity the attacker feeds the recover pass (see the module docstring).
ATTACKER_IDENTITY = "the published face's own dlib embedding"


@dataclass(frozen=True)
class AttackTarget:
    """One published g2face face: where it is in its image and the seed of its recover pass."""

    sample_key: str  # the sample's key as published
    face_index: int
    transform: np.ndarray  # image -> job-resolution crop (2, 3), from the public landmarks
    seed: int


def attack_targets(public_row: dict, job_seed: int, resolution: int, aligned: bool = False) -> list[AttackTarget]:
    """The g2face faces of a published manifest row, with what a key-less attacker knows of each (``aligned``:
    the job's ``input.aligned``, where the whole image is the crop)."""
    out = []
    for j, f in enumerate(public_row["faces"]):
        if f.get("method") != "g2face" or (f.get("landmarks") is None and not aligned):
            continue
        m = (align.aligned_image_transform(public_row["width"], public_row["height"], resolution) if aligned
             else align.landmark_transform(np.asarray(f["landmarks"], np.float64), resolution))
        # the seed as the run derived it from the key as published (an attacker never has the original key; a
        # sample published without a key was seeded from its row index, as here)
        seed = face_seed(job_seed, seed_sample_key(public_row["key"], None, public_row["index"]), j)
        out.append(AttackTarget(public_row["key"], j, m, seed))
    return out


@torch.no_grad()
def resynthesize(anonymizer, crops: np.ndarray, seeds: list[int], batch_size: int = 32) -> np.ndarray:
    """The attacker's faces (N, R, R, 3) uint8 from published crops (N, R, R, 3) uint8: the model's recover
    pass with each crop's own identity embedding in place of the one the key would open."""
    assert crops.ndim == 4 and crops.shape[3] == 3 and len(seeds) == len(crops), (crops.shape, len(seeds))
    device = anonymizer.device
    out = []
    for start in range(0, len(crops), batch_size):
        x = crops_tensor(crops[start : start + batch_size], device)
        guess = anonymizer.identity_embeddings(x)
        y = anonymizer.recover(x, guess, list(seeds[start : start + batch_size]))
        assert y.shape == x.shape, (y.shape, x.shape)
        out.append(crops_uint8(y))
    return np.concatenate(out) if out else np.zeros((0, *crops.shape[1:]), np.uint8)


def attacked_images(anonymizer, images: list[tuple[np.ndarray, list[AttackTarget]]], resolution: int) -> list[np.ndarray]:
    """Copies of published images (RGB, their targets) with each target face replaced by the attacker's
    re-synthesis, pasted back as ``recover`` pastes the key holder's; faces are batched across the images."""
    crops, seeds, where = [], [], []
    for i, (rgb, targets) in enumerate(images):
        for t in targets:
            crops.append(align.warp_to_crop(rgb, t.transform, resolution))
            seeds.append(t.seed)
            where.append((i, t.transform))
    out = [rgb.copy() for rgb, _ in images]
    if crops:
        for (i, m), face in zip(where, resynthesize(anonymizer, np.stack(crops), seeds)):
            align.paste_back(out[i], np.ascontiguousarray(face), m)
    return out
