"""Alignment to the 5-point template, the feathered paste mask, warping and paste-back."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import align
from pipeline.align import (
    apply_transform,
    landmark_transform,
    paste_back,
    paste_mask,
    paste_region,
    similarity_transform,
    template,
    transform_scale,
    warp_to_crop,
)


def _similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]], dtype=np.float64)


def _face_transform(center_xy, resolution: int, scale: float, angle: float = 0.2) -> np.ndarray:
    """Image -> crop similarity that maps image point ``center_xy`` to the crop centre."""
    m = _similarity(scale, angle, 0.0, 0.0)
    m[:, 2] = resolution / 2.0 - m[:, :2] @ np.asarray(center_xy, dtype=np.float64)
    return m


def _ellipse_radius(m: np.ndarray, resolution: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Normalised ellipse radius of the paste mask at image pixels (xs, ys) (1 = ellipse edge)."""
    q = apply_transform(m, np.stack([xs, ys], axis=1)) + 0.5  # crop index -> mask's pixel-centre coordinate
    cx, cy = align._MASK_CENTER[0] * resolution, align._MASK_CENTER[1] * resolution
    ax, ay = align._MASK_AXES[0] * resolution, align._MASK_AXES[1] * resolution
    return np.sqrt(((q[:, 0] - cx) / ax) ** 2 + ((q[:, 1] - cy) / ay) ** 2)


# --- similarity_transform / landmark_transform -----------------------------------------------------


def test_similarity_transform_recovers_a_known_transform_exactly():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 300, size=(5, 2))
    truth = _similarity(1.7, 0.3, 12.5, -4.0)
    dst = apply_transform(truth, src)
    m = similarity_transform(src, dst)
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m, truth, atol=1e-9)
    np.testing.assert_allclose(apply_transform(m, src), dst, atol=1e-9)
    assert transform_scale(m) == pytest.approx(1.7, abs=1e-9)


def test_similarity_transform_is_a_proper_similarity_even_for_mirrored_points():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, size=(5, 2))
    dst = src * np.array([-1.0, 1.0])  # a reflection cannot be represented: no flip allowed
    m = similarity_transform(src, dst)
    a, b = m[0, 0], m[1, 0]
    np.testing.assert_allclose(m[:, :2], [[a, -b], [b, a]], atol=1e-12)
    assert np.linalg.det(m[:, :2]) >= 0


def test_similarity_transform_raises_on_coincident_points():
    src = np.tile([[10.0, 20.0]], (5, 1))
    dst = template(128)
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(src, dst)


def test_similarity_transform_rejects_mismatched_shapes():
    with pytest.raises(AssertionError):
        similarity_transform(np.zeros((5, 2)), np.zeros((4, 2)))


def test_template_scales_linearly_with_resolution():
    np.testing.assert_allclose(template(256) * 2, template(512))
    np.testing.assert_allclose(template(128) * 4, template(512))
    t = template(128)
    assert t.shape == (5, 2)
    assert t[0, 0] < t[1, 0]  # left eye left of right eye
    assert t[2, 1] > t[0, 1] and t[3, 1] > t[2, 1]  # nose below eyes, mouth below nose


@pytest.mark.parametrize("resolution", [64, 128, 256])
def test_landmark_transform_maps_landmarks_onto_the_template(resolution):
    truth = _similarity(0.6, -0.4, 20.0, 35.0)  # image -> crop
    inv = np.linalg.inv(np.vstack([truth, [0, 0, 1]]))[:2]
    landmarks = apply_transform(inv, template(resolution))  # where the face's points sit in the image
    m = landmark_transform(landmarks, resolution)
    np.testing.assert_allclose(apply_transform(m, landmarks), template(resolution), atol=1e-6)
    np.testing.assert_allclose(m, truth, atol=1e-9)
    # a flat list of 10 numbers is accepted as well
    np.testing.assert_allclose(landmark_transform(landmarks.ravel().tolist(), resolution), m, atol=1e-12)


# --- paste_mask ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [64, 128, 256, 512])
def test_paste_mask_is_zero_on_the_border_and_one_at_the_centre(resolution):
    mask = paste_mask(resolution)
    assert mask.shape == (resolution, resolution)
    assert mask.dtype == np.float32
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert np.all(mask[0, :] == 0) and np.all(mask[-1, :] == 0)
    assert np.all(mask[:, 0] == 0) and np.all(mask[:, -1] == 0)
    c = resolution // 2
    assert mask[c, c] == 1.0
    # exactly zero outside the ellipse, exactly one well inside it
    ys, xs = np.mgrid[0:resolution, 0:resolution]
    ident = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    r = _ellipse_radius(ident, resolution, xs.ravel().astype(float), ys.ravel().astype(float)).reshape(mask.shape)
    assert np.all(mask[r >= 1.0] == 0)
    assert np.all(mask[r <= 1.0 - align._MASK_FEATHER] == 1.0)
    ramp = (r > 1.0 - align._MASK_FEATHER + 0.01) & (r < 0.99)
    assert ramp.any() and np.all((mask[ramp] > 0) & (mask[ramp] < 1))


def test_paste_mask_cached_array_is_read_only():
    mask = paste_mask(96)
    assert mask is paste_mask(96)  # the cache hands out one shared object ...
    assert not mask.flags.writeable  # ... so it must not be writable


# --- warp_to_crop ---------------------------------------------------------------------------------------


def test_warp_to_crop_shape_dtype_and_pure_translation_is_an_exact_crop():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    m = np.array([[1.0, 0.0, -10.0], [0.0, 1.0, -20.0]])
    crop = warp_to_crop(image, m, 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, image[20:84, 10:74])


def test_warp_to_crop_downscaling_is_antialiased():
    # a 1-pixel checkerboard shrunk 4x must come out near-uniform grey, not aliased stripes
    yy, xx = np.mgrid[0:512, 0:512]
    board = (((yy + xx) % 2) * 255).astype(np.uint8)
    image = np.repeat(board[:, :, None], 3, axis=2)
    m = _face_transform((256, 256), 128, scale=0.25, angle=0.0)
    crop = warp_to_crop(image, m, 128)
    assert crop.shape == (128, 128, 3) and crop.dtype == np.uint8
    inner = crop[8:-8, 8:-8].astype(float)
    assert abs(inner.mean() - 127.5) < 3
    assert inner.std() < 4


# --- paste_back -----------------------------------------------------------------------------------------


def _textured(h, w, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_paste_back_changes_only_pixels_in_box_and_warped_mask():
    res = 64
    image = _textured(160, 200, 3)
    before = image.copy()
    crop = np.full((res, res, 3), (250, 3, 128), np.uint8)  # a colour the random image almost never has
    m = _face_transform((100, 80), res, scale=0.8, angle=0.2)
    box = paste_back(image, crop, m)
    assert box is not None
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 160

    outside = np.ones(image.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(image[outside], before[outside])  # bit-identical outside the box

    changed = np.any(image != before, axis=2)
    assert changed.sum() > 1000
    ys, xs = np.nonzero(changed)
    r = _ellipse_radius(m, res, xs.astype(float), ys.astype(float))
    # bilinear sampling of the mask reaches at most ~1.5 crop pixels past the ellipse edge
    assert r.max() < 1.0 + 1.5 / (min(align._MASK_AXES) * res)

    # where the mask is 1 (with a margin for interpolation) the crop replaces the image exactly
    ys, xs = np.mgrid[0:160, 0:200]
    r_all = _ellipse_radius(m, res, xs.ravel().astype(float), ys.ravel().astype(float)).reshape(160, 200)
    core = r_all < 1.0 - align._MASK_FEATHER - 0.05
    assert core.sum() > 500
    assert np.all(image[core] == (250, 3, 128))
    # and far outside the ellipse nothing changed, even inside the box
    far = r_all > 1.1
    np.testing.assert_array_equal(image[far], before[far])


def test_paste_back_box_matches_paste_region():
    res = 64
    image = _textured(160, 200, 4)
    m = _face_transform((100, 80), res, scale=0.8)
    assert paste_back(image, np.zeros((res, res, 3), np.uint8), m) == paste_region(m, res, 200, 160)


def test_paste_back_face_partly_outside_the_image_is_clipped_and_correct():
    res, h, w, pad = 64, 120, 150, 100
    yy, xx = np.mgrid[0:res, 0:res]
    crop = np.stack([xx * 4, yy * 4, 255 - xx * 2], axis=2).clip(0, 255).astype(np.uint8)  # position-coded
    m = _face_transform((8, 12), res, scale=0.7, angle=0.3)  # face centre near the top-left corner

    image = _textured(h, w, 5)
    before = image.copy()
    box = paste_back(image, crop, m)
    assert box is not None
    x0, y0, x1, y1 = box
    assert (x0, y0) == (0, 0)
    assert 0 < x1 <= w and 0 < y1 <= h
    outside = np.ones((h, w), bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(image[outside], before[outside])
    assert np.any(image != before)

    # reference: the same paste on a padded canvas where the whole face fits, cropped back
    canvas = np.zeros((h + 2 * pad, w + 2 * pad, 3), np.uint8)
    canvas[pad : pad + h, pad : pad + w] = before
    m_pad = m.copy()
    m_pad[:, 2] -= m[:, :2] @ np.array([pad, pad], dtype=np.float64)
    full_box = paste_back(canvas, crop, m_pad)
    assert full_box[0] < pad and full_box[1] < pad  # unclipped there: the face really sticks out
    ref = canvas[pad : pad + h, pad : pad + w]
    diff = np.abs(ref.astype(int) - image.astype(int))
    assert diff.max() <= 1  # sub-pixel rounding of the warp only


@pytest.mark.parametrize("center", [(-500.0, -500.0), (900.0, 60.0), (75.0, 700.0)])
def test_paste_back_returns_none_when_the_crop_is_entirely_off_image(center):
    res = 64
    image = _textured(120, 150, 6)
    before = image.copy()
    m = _face_transform(center, res, scale=0.8)
    assert paste_region(m, res, 150, 120) is None
    assert paste_back(image, np.full((res, res, 3), 255, np.uint8), m) is None
    np.testing.assert_array_equal(image, before)


def test_paste_back_rejects_a_non_uint8_crop():
    image = _textured(100, 100, 7)
    with pytest.raises(AssertionError):
        paste_back(image, np.zeros((64, 64, 3), np.float32), _face_transform((50, 50), 64, 1.0))
