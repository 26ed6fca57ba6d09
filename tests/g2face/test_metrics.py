"""Metric functions against hand-computed values and their invariances."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from g2face import landmarks, metrics, morphable


def test_identity_cosine_and_distance():
    a = np.array([[1.0, 0, 0], [1, 1, 0], [2, 0, 0]])
    b = np.array([[0.0, 3, 0], [2, 2, 0], [-1, 0, 0]])
    np.testing.assert_allclose(metrics.identity_cosine(a, b), [0, 1, -1], atol=1e-12)
    np.testing.assert_allclose(metrics.identity_distance(a, b), [np.sqrt(2), 0, 2], atol=1e-12)
    np.testing.assert_allclose(metrics.identity_distance(a, b, normalize=False), [np.sqrt(10), np.sqrt(2), 3])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 512)), rng.normal(size=(5, 512))
    cos = metrics.identity_cosine(x, y)
    np.testing.assert_allclose(metrics.identity_distance(x, y), np.sqrt(2 - 2 * cos))
    np.testing.assert_allclose(np.diag(metrics.cosine_matrix(x, y)), cos)
    np.testing.assert_allclose(metrics.identity_cosine(3 * x, y), cos)  # scale-free
    assert metrics.identity_cosine(x[0], y[0]).shape == (1,)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.identity_cosine(x, y[:3])


def test_box_iou_and_centre_distance():
    a = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 0, 5]], float)
    b = np.array([[0, 0, 2, 2], [1, 0, 3, 2], [5, 5, 6, 6], [0, 0, 0, 5]], float)
    np.testing.assert_allclose(metrics.box_iou(a, b), [1, 1 / 3, 0, 0])
    c = metrics.box_center_distance([[0, 0, 2, 2]], [[3, 4, 5, 6]])
    np.testing.assert_allclose(c, [5.0])
    np.testing.assert_allclose(metrics.box_center_distance([[0, 0, 2, 2]], [[3, 4, 5, 6]], normalize=True), [2.5])


def _face68() -> np.ndarray:
    geometry = torch.from_numpy(morphable.geometry_from_pose([[0, 0, 0], [15, -5, 3]]))
    return morphable.project_landmarks(geometry, torch.tensor([[2.0, 150, 150], [1.5, 90, 120]])).numpy()


def test_landmark_error_and_nme_68_and_5_points():
    ref = _face68()
    pred = ref + np.array([3.0, 4.0])
    np.testing.assert_allclose(metrics.landmark_error(pred, ref), [5, 5], rtol=1e-6)
    iod = np.linalg.norm(ref[:, 36] - ref[:, 45], axis=-1)
    np.testing.assert_allclose(metrics.interocular_distance(ref), iod, rtol=1e-6)
    np.testing.assert_allclose(metrics.nme(pred, ref), 5 / iod, rtol=1e-6)
    # NME does not change when the whole image is rescaled and moved
    np.testing.assert_allclose(metrics.nme(pred * 3 + 7, ref * 3 + 7), metrics.nme(pred, ref), rtol=1e-6)
    five_ref, five_pred = landmarks.five_point(ref), landmarks.five_point(pred)
    eye_centres = np.linalg.norm(five_ref[:, 0] - five_ref[:, 1], axis=-1)
    np.testing.assert_allclose(metrics.nme(five_pred, five_ref), 5 / eye_centres, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(N,68,2\) or \(N,5,2\)"):
        metrics.interocular_distance(np.zeros((1, 10, 2)))


def test_shape_and_expression_distances_separate_the_parts():
    bases = morphable.load_bases()
    a = np.zeros((1, 53))
    b = np.zeros((1, 53))
    b[0, morphable.EXPR.start] = 2.0  # expression only
    b[0, morphable.POSE] = [30, 10, 5]  # pose is ignored by both
    assert metrics.shape_distance(a, b)[0] == 0
    expect = 2.0 * np.sqrt((bases.expr_basis[:, :, 0] ** 2).sum(-1).mean())
    np.testing.assert_allclose(metrics.expression_distance(a, b), [expect], rtol=1e-6)
    c = np.zeros((2, 53))
    c[0, 0] = 1.0
    c[1, 39] = 1.0
    d = metrics.shape_distance(np.zeros((2, 53)), c)
    assert d[0] > 5 * d[1] > 0  # first PCA component moves the face more than the 40th
    np.testing.assert_allclose(metrics.shape_distance(c, np.zeros((2, 53))), d)  # symmetric
    assert metrics.expression_distance(np.zeros((2, 53)), c).max() == 0


def test_pose_difference_and_rotation_angle():
    a = np.array([[179.0, 0, 0], [10, 20, -30], [0, 0, 0], [0, 0, 0]])
    b = np.array([[-179.0, 0, 0], [10, 20, -30], [30, 0, 0], [0, 0, 10]])
    np.testing.assert_allclose(metrics.pose_difference(a, b), [[2, 0, 0], [0, 0, 0], [30, 0, 0], [0, 0, 10]], atol=1e-9)
    np.testing.assert_allclose(metrics.rotation_angle(a[1:], b[1:]), [0, 30, 10], atol=1e-5)
    # a combined difference is no larger than the sum of its parts
    ang = metrics.rotation_angle([[0, 0, 0]], [[20, 20, 0]])[0]
    assert 20 < ang < 40
