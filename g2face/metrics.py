"""Evaluation metrics as plain numpy functions: identity, boxes, landmarks, 3DMM shape/expression, pose.

Every function takes row-aligned batches (row i of `a` is compared with row i of `b`) and returns one
value per row, so callers can average, take percentiles or threshold as they like. Inputs are
array-like (numpy arrays, lists, CPU tensors without grad).
"""
from __future__ import annotations

import numpy as np
import torch

from g2face import morphable

# Outer eye corners in the 68-point layout (300-W's "inter-ocular" normaliser); eye centres in the
# 5-point layout of g2face.landmarks.five_point / pipeline/align.py.
EYE_INDEX_68 = (36, 45)
EYE_INDEX_5 = (0, 1)


def _pairs(a, b, last_dims: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"metric inputs differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == last_dims:  # a single item -> batch of one
        a, b = a[None], b[None]
    return a, b


# --------------------------------------------------------------------------- identity


def identity_cosine(a, b) -> np.ndarray:
    """Cosine similarity of embedding pairs: (N,D),(N,D) -> (N,) in [-1,1]."""
    a, b = _pairs(a, b, 1)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


def identity_distance(a, b, normalize: bool = True) -> np.ndarray:
    """Euclidean distance of embedding pairs, (N,) ; normalize=True first scales each to unit length
    (then distance = sqrt(2 - 2 cos)). dlib's 128-d descriptors are compared unnormalised (threshold 0.6)."""
    a, b = _pairs(a, b, 1)
    if normalize:
        a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return np.linalg.norm(a - b, axis=-1)


def cosine_matrix(a, b) -> np.ndarray:
    """All-pairs cosine similarity (N,D),(M,D) -> (N,M), for verification and re-identification."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


# --------------------------------------------------------------------------- boxes [x0, y0, x1, y1]


def box_iou(a, b) -> np.ndarray:
    """Intersection over union of box pairs (N,4),(N,4) -> (N,); 0 for disjoint or empty boxes."""
    a, b = _pairs(a, b, 1)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def box_center_distance(a, b, normalize: bool = False) -> np.ndarray:
    """Distance between box centres (N,) in pixels; normalize=True divides by sqrt(area) of the
    reference boxes `b` (so 0.1 means a shift of a tenth of the face size)."""
    a, b = _pairs(a, b, 1)
    ca = (a[:, :2] + a[:, 2:]) / 2
    cb = (b[:, :2] + b[:, 2:]) / 2
    d = np.linalg.norm(ca - cb, axis=-1)
    if normalize:
        side = np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None))
        d = d / np.maximum(side, 1e-12)
    return d


# --------------------------------------------------------------------------- landmarks


def landmark_error(pred, ref) -> np.ndarray:
    """Mean point-to-point distance in pixels: (N,P,2),(N,P,2) -> (N,). Works for 5 or 68 points."""
    pred, ref = _pairs(pred, ref, 2)
    return np.linalg.norm(pred - ref, axis=-1).mean(-1)


def interocular_distance(ref) -> np.ndarray:
    """(N,68,2) -> outer-eye-corner distance; (N,5,2) -> eye-centre distance. (N,) pixels."""
    ref = np.asarray(ref, dtype=np.float64)
    if ref.ndim == 2:
        ref = ref[None]
    if ref.shape[-2:] == (68, 2):
        i, j = EYE_INDEX_68
    elif ref.shape[-2:] == (5, 2):
        i, j = EYE_INDEX_5
    else:
        raise ValueError(f"interocular_distance needs (N,68,2) or (N,5,2) landmarks, got {ref.shape}")
    return np.linalg.norm(ref[:, i] - ref[:, j], axis=-1)


def nme(pred, ref) -> np.ndarray:
    """Normalised mean error: landmark_error / interocular_distance(ref), (N,)."""
    return landmark_error(pred, ref) / np.maximum(interocular_distance(ref), 1e-12)


# --------------------------------------------------------------------------- 3DMM geometry (53-d vectors)


def _basis_rms(delta: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """RMS over the 68 landmarks of the 3D displacement basis @ delta, in mm."""
    disp = np.einsum("pdk,nk->npd", basis.astype(np.float64), delta)
    return np.sqrt((disp**2).sum(-1).mean(-1))


def shape_distance(geom_a, geom_b, bases: morphable.Bases | None = None) -> np.ndarray:
    """Identity-shape difference of (N,53) geometry vectors: RMS 3D landmark distance in mm between the
    two neutral faces (expression and pose ignored), so components count by how much they move the face."""
    a, b = _pairs(geom_a, geom_b, 1)
    assert a.shape[-1] == morphable.GEOMETRY_DIM, a.shape
    bases = bases or morphable.load_bases()
    return _basis_rms(a[:, morphable.SHAPE] - b[:, morphable.SHAPE], bases.shape_basis)


def expression_distance(geom_a, geom_b, bases: morphable.Bases | None = None) -> np.ndarray:
    """Expression difference of (N,53) geometry vectors: RMS 3D landmark displacement in mm."""
    a, b = _pairs(geom_a, geom_b, 1)
    assert a.shape[-1] == morphable.GEOMETRY_DIM, a.shape
    bases = bases or morphable.load_bases()
    return _basis_rms(a[:, morphable.EXPR] - b[:, morphable.EXPR], bases.expr_basis)


def pose_difference(pose_a, pose_b) -> np.ndarray:
    """Absolute yaw, pitch, roll differences in degrees, wrapped to [0,180]: (N,3),(N,3) -> (N,3)."""
    a, b = _pairs(pose_a, pose_b, 1)
    return np.abs((a - b + 180.0) % 360.0 - 180.0)


def rotation_angle(pose_a, pose_b) -> np.ndarray:
    """Geodesic angle in degrees between the head rotations of (N,3) yaw/pitch/roll poses: (N,)."""
    a, b = _pairs(pose_a, pose_b, 1)
    ra = morphable.rotation_matrix(torch.as_tensor(a))
    rb = morphable.rotation_matrix(torch.as_tensor(b))
    trace = (ra.transpose(-1, -2) @ rb).diagonal(dim1=-2, dim2=-1).sum(-1).numpy()
    return np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))
