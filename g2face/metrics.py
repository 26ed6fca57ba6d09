"""Evaluation metrics as plain numpy functions: identity, detection, boxes, landmarks, 3DMM shape/expression, pose.

Every comparison takes row-aligned batches (row i of `a` is compared with row i of `b`) and returns one
value per row, so callers can average, take percentiles or threshold as they like. Inputs are
array-like (numpy arrays, lists, CPU tensors without grad). The detectors (MTCNN from facenet-pytorch,
dlib's HOG) take a list of images and return per image (boxes (N,4) float32 [x0,y0,x1,y1], scores (N,)
float32), best first; their packages are imported on first use.
"""
from __future__ import annotations

from functools import lru_cache

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


# --------------------------------------------------------------------------- detection


@lru_cache(maxsize=1)
def _verify_mtcnn_files() -> None:
    from g2face.mtcnn import verify_weights  # raises MTCNNWeightsError naming the file and the fix

    verify_weights()


@lru_cache(maxsize=4)
def _mtcnn(device: str, min_face_size: int, thresholds: tuple[float, float, float], factor: float):
    from facenet_pytorch import MTCNN

    _verify_mtcnn_files()
    return MTCNN(min_face_size=min_face_size, thresholds=list(thresholds), factor=factor, keep_all=True,
                 post_process=False, select_largest=False, device=torch.device(device))


def _image_list(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    out = []
    for i, im in enumerate(images):
        im = np.asarray(im)
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"image {i}: expected (H,W,3) uint8 RGB, got {im.shape} {im.dtype}")
        out.append(np.ascontiguousarray(im))
    return out


def detect_mtcnn(
    images,
    device: str = "cpu",
    min_face_size: int = 20,
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
    factor: float = 0.709,
    min_score: float = 0.0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """MTCNN (facenet-pytorch, hash-checked weights) on a list of (H,W,3) uint8 RGB images.

    Images of equal size run as one batch. Returns per image (boxes (N,4), scores (N,)), best score first;
    detections below min_score are left out. Parameters are MTCNN's (the pipeline's defaults differ:
    min_face_size 16 there).
    """
    images = _image_list(images)
    out: list = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        if min(im.shape[:2]) < min_face_size:  # MTCNN cannot scan an image smaller than its smallest face
            out[i] = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        else:
            groups.setdefault(im.shape[:2], []).append(i)
    model = _mtcnn(str(device), int(min_face_size), tuple(float(t) for t in thresholds), float(factor))
    for idx in groups.values():
        with torch.inference_mode():
            boxes, probs = model.detect([images[i] for i in idx])
        for i, b, p in zip(idx, boxes, probs):
            if b is None:
                out[i] = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
                continue
            b, p = np.asarray(b, np.float32).reshape(-1, 4), np.asarray(p, np.float32).reshape(-1)
            keep = p >= min_score
            order = np.argsort(-p[keep], kind="stable")
            out[i] = (b[keep][order], p[keep][order])
    return out


def detect_dlib_hog(images, upsample: int = 1, threshold: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """dlib's HOG frontal-face detector on a list of (H,W,3) uint8 RGB images: per image (boxes, scores).

    upsample: times each image is doubled first (1 finds faces down to ~40 px). threshold: dlib's
    adjust_threshold (scores are SVM margins, not probabilities; 0 is dlib's default cut).
    """
    from g2face import landmarks

    return [landmarks.detect_faces_scored(im, upsample, threshold) for im in _image_list(images)]


def detected(detections: list[tuple[np.ndarray, np.ndarray]], min_score: float | None = None) -> np.ndarray:
    """(N,) bool: whether each image has at least one detection (scoring >= min_score when given)."""
    return np.array([bool(len(s)) if min_score is None else bool((s >= min_score).any()) for _, s in detections])


def matched_boxes(detections: list[tuple[np.ndarray, np.ndarray]], reference) -> tuple[np.ndarray, np.ndarray]:
    """For each image, the detection overlapping reference box i most: ((N,4) boxes, (N,) IoU).

    Images without a detection get a NaN box and IoU 0, so box_center_distance on them is NaN (count them
    with `detected`). Typical use: detections on anonymized images against the boxes found on the originals.
    """
    ref = np.asarray(reference, dtype=np.float64).reshape(-1, 4)
    if len(ref) != len(detections):
        raise ValueError(f"{len(detections)} detection lists but {len(ref)} reference boxes")
    boxes = np.full((len(ref), 4), np.nan)
    ious = np.zeros(len(ref))
    for i, (b, _) in enumerate(detections):
        if len(b):
            iou = box_iou(np.asarray(b, np.float64), np.repeat(ref[i : i + 1], len(b), 0))
            j = int(np.argmax(iou))
            boxes[i], ious[i] = b[j], iou[j]
    return boxes, ious
