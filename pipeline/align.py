"""Face alignment to an FFHQ-style 5-point template, and paste-back with a feathered mask.

Plain functions on numpy arrays. A transform ``M`` is a 2x3 affine matrix mapping image pixel
coordinates to aligned-crop coordinates; the crop is ``resolution`` pixels square.
"""
from __future__ import annotations

import cv2
import numpy as np

from g2face.payload_layout import FACE_AXES as _MASK_AXES  # noqa: F401 (the mask geometry, for callers)
from g2face.payload_layout import FACE_CENTER as _MASK_CENTER  # noqa: F401
from g2face.payload_layout import FACE_FEATHER as _MASK_FEATHER  # noqa: F401
from g2face.payload_layout import face_mask

# FFHQ-style template for a 512 px crop: left eye, right eye, nose tip, left and right mouth corner
# (the commonly used 5-point FFHQ layout). Scaled linearly to other resolutions.
_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)

def template(resolution: int) -> np.ndarray:
    return _TEMPLATE_512 * (resolution / 512.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src points to dst.

    src, dst: (N, 2). Returns the 2x3 matrix. Closed form (Umeyama without reflection).
    """
    assert src.shape == dst.shape and src.shape[1] == 2, (src.shape, dst.shape)
    src = src.astype(np.float64)
    dst = dst.astype(np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum()
    if var_s < 1e-12:
        raise ValueError("degenerate landmarks: all points coincide")
    # Complex-number form of a 2-D similarity: d = z * s with z = a + ib.
    a = (s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]).sum() / var_s
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / var_s
    rot = np.array([[a, -b], [b, a]])
    t = mu_d - rot @ mu_s
    return np.hstack([rot, t[:, None]])


def landmark_transform(landmarks: np.ndarray, resolution: int) -> np.ndarray:
    return similarity_transform(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), template(resolution))


def aligned_image_transform(width: int, height: int, resolution: int) -> np.ndarray:
    """Transform for an already-aligned corpus: the whole image is the crop."""
    return np.array([[resolution / width, 0.0, 0.0], [0.0, resolution / height, 0.0]])


def transform_scale(m: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def apply_transform(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return pts @ m[:, :2].T + m[:, 2]


def warp_to_crop(image: np.ndarray, m: np.ndarray, resolution: int) -> np.ndarray:
    """Aligned crop (resolution x resolution x 3, uint8). Downscaling faces are pre-smoothed against aliasing."""
    scale = transform_scale(m)
    src = image
    if scale < 0.5:
        # Shrinking by more than 2x: blur first so the bilinear sampler does not alias.
        sigma = 0.5 / scale * 0.5
        src = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT101)
    return cv2.warpAffine(
        src, m, (resolution, resolution), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101
    )


def paste_mask(resolution: int) -> np.ndarray:
    """Feathered elliptical mask in crop coordinates, float32 in [0, 1], exactly zero outside the ellipse,
    so pixels outside its warped footprint are never touched. Shared with the model, whose payload
    bits lie inside it (``g2face.payload_layout``). Read-only and cached."""
    return face_mask(resolution)


def crop_footprint(m: np.ndarray, resolution: int) -> tuple[int, int, int, int]:
    """Image-space box (x0, y0, x1, y1), exclusive end, that the crop can touch (bilinear neighbours
    included), not clipped to any image."""
    inv = cv2.invertAffineTransform(np.asarray(m, np.float64))
    corners = np.array([[0, 0], [resolution, 0], [0, resolution], [resolution, resolution]], dtype=np.float64)
    pts = apply_transform(inv, corners)
    return (int(np.floor(pts[:, 0].min())) - 1, int(np.floor(pts[:, 1].min())) - 1,
            int(np.ceil(pts[:, 0].max())) + 2, int(np.ceil(pts[:, 1].max())) + 2)


def paste_region(m: np.ndarray, resolution: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Image-space box (x0, y0, x1, y1), exclusive end, that the crop can touch; None if off-image."""
    fx0, fy0, fx1, fy1 = crop_footprint(m, resolution)
    x0, y0, x1, y1 = max(fx0, 0), max(fy0, 0), min(fx1, width), min(fy1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _region_warp(m: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Crop -> region transform: the inverse of ``m`` shifted so that ``box``'s corner is the origin."""
    inv = cv2.invertAffineTransform(m)
    inv[:, 2] -= box[:2]
    return inv


def paste_alpha(m: np.ndarray, resolution: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """The paste mask warped into the image region ``box`` (x0, y0, x1, y1): float32 (y1 - y0, x1 - x0), the
    weight ``paste_back`` gives the crop at each pixel of the region."""
    size = (box[2] - box[0], box[3] - box[1])
    return cv2.warpAffine(paste_mask(resolution), _region_warp(m, box), size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def paste_back(image: np.ndarray, crop: np.ndarray, m: np.ndarray) -> tuple[int, int, int, int] | None:
    """Blend ``crop`` back into ``image`` in place through the inverse of ``m`` and the feathered mask.

    Only pixels where the warped mask is non-zero change; returns the box that was touched.
    """
    res = crop.shape[0]
    assert crop.shape == (res, res, 3) and crop.dtype == np.uint8, crop.shape
    h, w = image.shape[:2]
    box = paste_region(m, res, w, h)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    # warp straight into the region of interest
    face = cv2.warpAffine(crop, _region_warp(m, box), (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    alpha = paste_alpha(m, res, box)
    roi = image[y0:y1, x0:x1]
    a = alpha[:, :, None]
    blended = roi.astype(np.float32) * (1.0 - a) + face.astype(np.float32) * a
    touched = alpha > 0
    roi[touched] = np.clip(np.rint(blended[touched]), 0, 255).astype(np.uint8)
    return box
