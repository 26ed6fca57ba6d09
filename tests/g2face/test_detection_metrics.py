"""Detection metrics: MTCNN and dlib HOG on the committed NASA portraits, and the helpers on their outputs."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import DEMO_SHARDS
from helpers import decode, no_face_image, read_tar

from g2face import landmarks, metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def portraits() -> list[np.ndarray]:
    images = [decode(files["jpg"]) for shard in DEMO_SHARDS for _, files in sorted(read_tar(shard).items())]
    assert len(images) == 12
    return images


def test_mtcnn_and_hog_find_the_same_face_in_each_portrait(portraits):
    images = portraits[:6] + [no_face_image()]
    mt = metrics.detect_mtcnn(images)
    hog = metrics.detect_dlib_hog(images)
    assert len(mt) == len(hog) == 7
    for (mb, ms), (hb, hs) in zip(mt[:6], hog[:6]):
        assert mb.shape[1:] == (4,) and mb.dtype == ms.dtype == np.float32 and len(mb) == len(ms) >= 1
        assert (np.diff(ms) <= 0).all() and ms[0] > 0.95  # best first, probabilities
        assert len(hb) >= 1 and (np.diff(hs) <= 0).all() and hs[0] > 0  # SVM margins above dlib's cut
        assert metrics.box_iou(mb[:1], hb[:1])[0] > 0.4  # the two detectors frame the face differently
        assert metrics.box_center_distance(mb[:1], hb[:1], normalize=True)[0] < 0.25
    for boxes, scores in (mt[6], hog[6]):
        assert boxes.shape == (0, 4) and scores.shape == (0,)
    np.testing.assert_array_equal(metrics.detected(mt), [True] * 6 + [False])
    np.testing.assert_array_equal(metrics.detected(hog, min_score=1e9), [False] * 7)


def test_batches_of_mixed_sizes_keep_the_order(portraits):
    small = cv2.resize(portraits[2], (portraits[2].shape[1] // 2, portraits[2].shape[0] // 2))
    tiny = np.zeros((10, 10, 3), np.uint8)  # below MTCNN's smallest face
    together = metrics.detect_mtcnn([portraits[0], small, tiny, portraits[1]])
    alone = [metrics.detect_mtcnn([im])[0] for im in (portraits[0], small, portraits[1])]
    for (b1, s1), (b2, s2) in zip([together[0], together[1], together[3]], alone):
        np.testing.assert_allclose(b1[0], b2[0], atol=1.0)
        np.testing.assert_allclose(s1[0], s2[0], atol=1e-3)
    assert together[2][0].shape == (0, 4)
    # a face at half the size is found at about half the box size
    assert 0.4 < (together[1][0][0, 2] - together[1][0][0, 0]) / (alone[0][0][0, 2] - alone[0][0][0, 0]) < 1.2


def test_hog_scores_and_threshold(portraits):
    boxes, scores = landmarks.detect_faces_scored(portraits[0])
    np.testing.assert_array_equal(boxes, landmarks.detect_faces(portraits[0]))
    strict = metrics.detect_dlib_hog([portraits[0]], threshold=float(scores[0]) + 0.01)[0]
    assert len(strict[0]) == 0  # nothing scores above its own best
    loose = metrics.detect_dlib_hog([portraits[0]], threshold=-0.5)[0]
    assert len(loose[0]) >= len(boxes)


def test_matched_boxes_and_input_checks():
    dets = [
        (np.array([[0, 0, 10, 10], [50, 50, 70, 70]], np.float32), np.array([0.9, 0.8], np.float32)),
        (np.zeros((0, 4), np.float32), np.zeros(0, np.float32)),
    ]
    boxes, ious = metrics.matched_boxes(dets, [[52, 50, 72, 70], [0, 0, 5, 5]])
    np.testing.assert_allclose(boxes[0], [50, 50, 70, 70])
    np.testing.assert_allclose(ious, [18 * 20 / (2 * 400 - 18 * 20), 0.0])
    assert np.isnan(boxes[1]).all()
    with pytest.raises(ValueError, match="2 detection lists but 1 reference"):
        metrics.matched_boxes(dets, [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"image 0: expected \(H,W,3\) uint8"):
        metrics.detect_mtcnn([np.zeros((20, 20, 3), np.float32)])
