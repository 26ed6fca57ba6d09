"""dlib HOG detection and 68-point landmarks on the committed NASA portraits; predictor hash check."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DEMO_SHARDS
from helpers import decode, no_face_image, read_tar

from g2face import landmarks


@pytest.fixture(scope="module")
def nasa_images() -> list[np.ndarray]:
    images = [decode(files["jpg"]) for shard in DEMO_SHARDS for _, files in sorted(read_tar(shard).items())]
    assert len(images) == 12
    return images


def test_predictor_file_is_found_and_verified():
    path = landmarks.predictor_path()
    assert path.name == "shape_predictor_68_face_landmarks.dat" and path.parent.name == "models"


def test_wrong_predictor_hash_stops(monkeypatch):
    monkeypatch.setattr(landmarks, "PREDICTOR_68_SHA256", "0" * 64)
    landmarks.predictor_path.cache_clear()
    try:
        with pytest.raises(landmarks.LandmarkModelError, match=r"shape_predictor_68_face_landmarks\.dat has sha256"):
            landmarks.predictor_path()
    finally:
        landmarks.predictor_path.cache_clear()


def test_one_face_with_anatomical_landmarks_per_portrait(nasa_images):
    for image in nasa_images:
        boxes, lms = landmarks.detect_landmarks_68(image)
        assert boxes.shape == (1, 4) and lms.shape == (1, 68, 2), boxes
        x0, y0, x1, y1 = boxes[0]
        p = lms[0]
        width = x1 - x0
        assert width > 60  # portraits: the face is a large part of the 400 px frame
        # inner points (brows, eyes, nose, mouth) lie within the box, give or take a margin
        inner = p[17:]
        assert (inner[:, 0] > x0 - 0.1 * width).all() and (inner[:, 0] < x1 + 0.1 * width).all()
        assert (inner[:, 1] > y0 - 0.2 * width).all() and (inner[:, 1] < y1 + 0.1 * width).all()
        # iBUG order: image-left eye before image-right eye, nose between, mouth and chin below
        assert p[36, 0] < p[39, 0] < p[30, 0] < p[42, 0] < p[45, 0]
        assert p[27, 1] < p[30, 1] < p[51, 1] < p[57, 1] < p[8, 1]
        iod = np.linalg.norm(p[45] - p[36])
        assert 0.3 * width < iod < 0.7 * width


def test_landmarks_for_given_boxes_match_detection(nasa_images):
    image = nasa_images[0]
    boxes, lms = landmarks.detect_landmarks_68(image)
    np.testing.assert_array_equal(landmarks.landmarks_68(image, boxes), lms)
    # a box shifted by a few pixels still lands on the same face
    shifted = landmarks.landmarks_68(image, boxes + np.array([4, 3, 4, 3], np.float32))
    assert np.linalg.norm(shifted - lms, axis=-1).mean() < 0.1 * (boxes[0, 2] - boxes[0, 0])


def test_no_face_gives_empty_arrays():
    boxes, lms = landmarks.detect_landmarks_68(no_face_image())
    assert boxes.shape == (0, 4) and lms.shape == (0, 68, 2)


def test_five_point_layout(nasa_images):
    _, lms = landmarks.detect_landmarks_68(nasa_images[1])
    five = landmarks.five_point(lms)
    assert five.shape == (1, 5, 2)
    f = five[0]
    np.testing.assert_allclose(f[0], lms[0, 36:42].mean(0), rtol=1e-6)
    assert f[0, 0] < f[2, 0] < f[1, 0]  # eyes either side of the nose
    assert f[3, 0] < f[4, 0] and f[3, 1] > f[2, 1]  # mouth corners below the nose, left before right


def test_rejects_non_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        landmarks.detect_faces(np.zeros((50, 50, 3), np.float32))
