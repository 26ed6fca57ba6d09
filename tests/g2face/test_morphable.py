"""68-point 3DMM: packaged bases, pose conventions, differentiable projection, and the landmark fit."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import DEMO_SHARDS
from helpers import decode, read_tar

from g2face import landmarks, metrics, morphable


@pytest.fixture(scope="module")
def nasa_landmarks() -> np.ndarray:
    """dlib's 68 landmarks of the best face in each committed NASA portrait, (12,68,2)."""
    out = []
    for shard in DEMO_SHARDS:
        for _, files in sorted(read_tar(shard).items()):
            _, lms = landmarks.detect_landmarks_68(decode(files["jpg"]))
            assert len(lms) >= 1
            out.append(lms[0])
    assert len(out) == 12
    return np.stack(out)


def synthetic_faces(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random whitened coefficients ~ N(0,1), poses within yaw 40 / pitch 20 / roll 25 deg, cameras."""
    rng = np.random.default_rng(seed)
    geometry = np.zeros((n, morphable.GEOMETRY_DIM), np.float32)
    geometry[:, :50] = rng.normal(size=(n, 50))
    geometry[:, morphable.POSE] = rng.uniform([-40, -20, -25], [40, 20, 25], size=(n, 3))
    camera = np.stack([rng.uniform(1, 3, n), rng.uniform(100, 300, n), rng.uniform(100, 300, n)], 1).astype(np.float32)
    lms = morphable.project_landmarks(torch.from_numpy(geometry), torch.from_numpy(camera)).numpy()
    return geometry, camera, lms


# --------------------------------------------------------------------------- bases


def test_bases_have_documented_layout_and_plausible_geometry():
    b = morphable.load_bases()
    assert b.mean_shape.shape == (68, 3)
    assert b.shape_basis.shape == (68, 3, 40) and b.expr_basis.shape == (68, 3, 10)
    assert morphable.GEOMETRY_DIM == 53
    np.testing.assert_allclose(b.mean_shape.mean(0), 0, atol=1e-3)  # centred on the landmark centroid
    iod_mm = np.linalg.norm(b.mean_shape[36] - b.mean_shape[45])
    assert 75 < iod_mm < 100, iod_mm  # adult outer-eye-corner distance, so units are mm
    # model axes: x to image right, y up, z towards the camera
    assert b.mean_shape[45, 0] > b.mean_shape[36, 0]
    assert b.mean_shape[19, 1] > b.mean_shape[8, 1]  # brow above chin
    assert b.mean_shape[30, 2] > b.mean_shape[0, 2] + 50  # nose tip well in front of the jaw corner
    # PCA order: the first identity component moves the landmarks more than the last
    rms = np.sqrt((b.shape_basis**2).sum(1).mean(0))
    assert rms[0] > 5 * rms[-1]


def test_tampered_bases_are_refused(tmp_path, monkeypatch):
    bad = tmp_path / "bfm68.npz"
    shutil.copy(morphable.bases_path(), bad)
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(morphable, "bases_path", lambda: bad)
    morphable.load_bases.cache_clear()
    try:
        with pytest.raises(morphable.BasesError, match=r"bfm68\.npz has sha256 .* expected .*make_bfm68\.py"):
            morphable.load_bases()
    finally:
        morphable.load_bases.cache_clear()


# --------------------------------------------------------------------------- pose conventions


def test_rotation_round_trip_and_orthonormality():
    rng = np.random.default_rng(3)
    pose = torch.from_numpy(rng.uniform([-85, -60, -90], [85, 60, 90], size=(200, 3)))
    rot = morphable.rotation_matrix(pose)
    eye = torch.eye(3, dtype=rot.dtype).expand(200, 3, 3)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(200, dtype=rot.dtype))
    torch.testing.assert_close(morphable.pose_from_rotation(rot), pose, atol=1e-9, rtol=0)


def _project(yaw=0.0, pitch=0.0, roll=0.0) -> np.ndarray:
    geometry = torch.from_numpy(morphable.geometry_from_pose([yaw, pitch, roll]))
    return morphable.project_landmarks(geometry, torch.tensor([[2.0, 200.0, 200.0]]))[0].numpy()


def test_pose_signs_match_documentation():
    front = _project()
    nose_offset = lambda p: p[30, 0] - (p[0, 0] + p[16, 0]) / 2  # noqa: E731
    assert nose_offset(_project(yaw=20)) > nose_offset(front) + 10  # nose towards image right
    nose_drop = lambda p: p[30, 1] - (p[36, 1] + p[45, 1]) / 2  # noqa: E731
    assert nose_drop(_project(pitch=20)) > nose_drop(front) + 5  # nose tips down (image y grows down)
    eye_line = lambda p: p[45, 1] - p[36, 1]  # noqa: E731
    assert eye_line(_project(roll=10)) < eye_line(front) - 10  # anticlockwise: right eye rises
    assert front[8, 1] > front[27, 1]  # upright face: chin below the nose bridge


def test_projection_is_differentiable():
    g, c, _ = synthetic_faces(1, seed=4)
    geometry = torch.from_numpy(g).double().requires_grad_(True)
    camera = torch.from_numpy(c).double().requires_grad_(True)
    assert torch.autograd.gradcheck(morphable.project_landmarks, (geometry, camera), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- fit


def test_synthetic_round_trip_recovers_pose_within_a_degree():
    geometry, camera, lms = synthetic_faces(64, seed=0)
    # Noise-free landmarks warrant a weak prior: then pose is recovered to well under a degree.
    fit = morphable.fit_landmarks(lms, landmark_sigma=0.002)
    err = metrics.pose_difference(fit.geometry[:, morphable.POSE], geometry[:, morphable.POSE])
    assert err.max() < 1.0, err.max(0)
    assert fit.nme.max() < 0.002
    np.testing.assert_allclose(fit.camera[:, 0], camera[:, 0], rtol=0.02)
    # Default prior, plus 0.5 px landmark noise: still within a degree on average.
    noisy = lms + np.random.default_rng(1).normal(scale=0.5, size=lms.shape)
    fit = morphable.fit_landmarks(noisy)
    err = metrics.pose_difference(fit.geometry[:, morphable.POSE], geometry[:, morphable.POSE])
    assert err.mean() < 1.0 and err.max() < 3.0, (err.mean(0), err.max(0))
    assert metrics.rotation_angle(fit.geometry[:, morphable.POSE], geometry[:, morphable.POSE]).mean() < 1.5


def test_fit_outputs_are_consistent_and_frame_invariant():
    _, _, lms = synthetic_faces(8, seed=5)
    fit = morphable.fit_landmarks(lms)
    assert fit.geometry.shape == (8, 53) and fit.camera.shape == (8, 3) and fit.landmarks.shape == (8, 68, 2)
    reproj = morphable.project_landmarks(torch.from_numpy(fit.geometry), torch.from_numpy(fit.camera)).numpy()
    np.testing.assert_allclose(reproj, fit.landmarks, atol=1e-3)
    np.testing.assert_allclose(fit.nme, metrics.nme(fit.landmarks, lms), rtol=1e-4)
    # Scaling and shifting the image changes the camera only.
    moved = morphable.fit_landmarks(lms * 2.5 + np.array([40.0, -15.0]))
    np.testing.assert_allclose(moved.geometry, fit.geometry, atol=2e-3)
    np.testing.assert_allclose(moved.camera[:, 0], fit.camera[:, 0] * 2.5, rtol=1e-4)
    np.testing.assert_allclose(moved.camera[:, 1:], fit.camera[:, 1:] * 2.5 + [40.0, -15.0], atol=1e-2)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(B,68,2\)"):
        morphable.fit_landmarks(np.zeros((2, 5, 2)))
    lms = np.ones((1, 68, 2))
    lms[0, 3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        morphable.fit_landmarks(lms)


def test_fit_reprojects_dlib_landmarks_on_nasa_portraits(nasa_landmarks):
    fit = morphable.fit_landmarks(nasa_landmarks)
    assert fit.nme.mean() <= 0.04, fit.nme
    assert fit.nme.max() <= 0.05, fit.nme
    # Sanity of what was fitted: studio portraits are near-frontal and upright, and the fitted yaw
    # follows where the nose sits between the jaw ends.
    pose = fit.geometry[:, morphable.POSE]
    assert np.abs(pose).max() < 30, pose
    lm = nasa_landmarks
    nose_offset = (lm[:, 30, 0] - (lm[:, 0, 0] + lm[:, 16, 0]) / 2) / (lm[:, 16, 0] - lm[:, 0, 0])
    assert np.corrcoef(nose_offset, pose[:, 0])[0, 1] > 0.9
    # The prior keeps coefficients within a few population standard deviations.
    assert np.sqrt((fit.geometry[:, :50] ** 2).mean()) < 3.0


def test_single_face_input():
    _, _, lms = synthetic_faces(1, seed=6)
    fit = morphable.fit_landmarks(lms[0])
    assert fit.geometry.shape == (1, 53)


@pytest.mark.shared_data
def test_fit_on_celeba_val(shared_data):
    """A quick slice of what bench/geometry_fit.py measures on >= 300 faces."""
    import tarfile

    shard = sorted((shared_data / "val").glob("*.tar"))[0]
    found = []
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][::5][:60]
        for m in members:
            _, lms = landmarks.detect_landmarks_68(decode(tar.extractfile(m).read()))
            if len(lms):
                found.append(lms[0])
    assert len(found) >= 50
    fit = morphable.fit_landmarks(np.stack(found))
    assert fit.nme.mean() <= 0.04
