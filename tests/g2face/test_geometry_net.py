"""Geometry regressor: shapes and conventions, weights file checks, and the shipped weights on NASA portraits."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from conftest import DEMO_SHARDS

from g2face import geometry_net, metrics, morphable
from g2face.geometry_net import GeometryNet, GeometryNetError

# Measured with the shipped weights on the 12 NASA portraits prepared as below (MTCNN min_face_size 40):
# NME vs fit mean 0.018 (max 0.025), mean absolute pose error 0.79 deg; the bounds leave room for platforms.
NASA_NME_MEAN_BOUND = 0.03
NASA_NME_MAX_BOUND = 0.045
NASA_POSE_MEAN_BOUND_DEG = 2.0


def small_net(seed: int = 0, **kw) -> GeometryNet:
    torch.manual_seed(seed)
    net = GeometryNet(**kw)
    net.target_mean.copy_(geometry_net.encode_targets(torch.zeros(1, 53), torch.tensor([[0.45, 63.5, 70.0]]))[0])
    net.target_std.copy_(torch.full((56,), 0.5))
    return net.eval()


def test_outputs_shapes_and_projection_agree():
    net = small_net()
    x = torch.rand(3, 3, 128, 128)
    out = net(x)
    assert out.geometry.shape == (3, 53) and out.camera.shape == (3, 3) and out.landmarks.shape == (3, 68, 2)
    torch.testing.assert_close(out.landmarks, morphable.project_landmarks(out.geometry, out.camera))
    assert (out.camera[:, 0] > 0).all()  # the scale is regressed as a log
    # batched: each row depends on its own image only (eval-mode batch norm)
    torch.testing.assert_close(net(x[1:2]).geometry, out.geometry[1:2], atol=1e-4, rtol=1e-4)
    assert 1e5 < sum(p.numel() for p in net.parameters()) < 2.5e6


def test_value_range_and_input_checks():
    net01 = small_net()
    net11 = small_net(value_range=(-1.0, 1.0))
    net11.load_state_dict(net01.state_dict())
    x = torch.rand(2, 3, 128, 128)
    torch.testing.assert_close(net11(x * 2 - 1).geometry, net01(x).geometry, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"\(N, 3, 128, 128\).*resize"):
        net01(torch.rand(1, 3, 256, 256))


def test_gradients_reach_the_input():
    net = small_net().requires_grad_(False)
    x = torch.rand(2, 3, 128, 128, requires_grad=True)
    out = net(x)
    (out.landmarks.square().mean() + out.geometry.square().mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_encode_decode_round_trip():
    g = torch.randn(4, 53)
    c = torch.tensor([[0.4, 60.0, 70.0], [0.5, 64, 66], [0.3, 61, 71], [0.45, 63, 69]])
    mean, std = torch.randn(56), torch.rand(56) + 0.5
    raw = (geometry_net.encode_targets(g, c) - mean) / std
    g2, c2 = geometry_net.decode_head(raw, mean, std)
    torch.testing.assert_close(g2, g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2, c, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_and_refusals(tmp_path):
    net = small_net(3)
    path = tmp_path / "g.pt"
    sha = geometry_net.save_geometry_net(net, path, {"note": "test"})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = geometry_net.load_geometry_net(path, expected_sha256=sha)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = torch.rand(2, 3, 128, 128)
    torch.testing.assert_close(loaded(x).landmarks, net(x).landmarks, atol=0.05, rtol=0.01)  # fp16 storage
    assert geometry_net.weights_meta(path) == {"note": "test"}

    with pytest.raises(GeometryNetError, match=r"g\.pt have sha256 .* expected 0000"):
        geometry_net.load_geometry_net(path, expected_sha256="0" * 64)
    with pytest.raises(GeometryNetError, match="missing; train them"):
        geometry_net.load_geometry_net(tmp_path / "absent.pt")

    blob = torch.load(path, weights_only=True)
    blob["state_dict"].pop("fc2.bias")
    blob["state_dict"]["extra.weight"] = torch.zeros(1)
    buf = io.BytesIO()
    torch.save(blob, buf)
    (tmp_path / "partial.pt").write_bytes(buf.getvalue())
    with pytest.raises(GeometryNetError, match=r"missing keys \['fc2.bias'\], unexpected keys \['extra.weight'\]"):
        geometry_net.load_geometry_net(tmp_path / "partial.pt", expected_sha256=None)

    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["fc2.weight"] = torch.zeros(56, 7)
    buf = io.BytesIO()
    torch.save(blob, buf)
    (tmp_path / "shape.pt").write_bytes(buf.getvalue())
    with pytest.raises(GeometryNetError, match="size mismatch for fc2.weight"):
        geometry_net.load_geometry_net(tmp_path / "shape.pt", expected_sha256=None)

    buf = io.BytesIO()
    torch.save({"state_dict": {}}, buf)
    (tmp_path / "other.pt").write_bytes(buf.getvalue())
    with pytest.raises(GeometryNetError, match="not a g2face-geometry-net file"):
        geometry_net.load_geometry_net(tmp_path / "other.pt", expected_sha256=None)


# --------------------------------------------------------------------------- the shipped weights


def test_shipped_weights_pass_the_hash_check_and_load_strictly():
    path = geometry_net.weights_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == geometry_net.WEIGHTS_SHA256
    assert path.stat().st_size < 4_000_000
    net = geometry_net.load_geometry_net()
    assert net.widths == geometry_net.DEFAULT_WIDTHS
    assert (net.target_std != 1).any()  # the training statistics were saved with the weights
    assert (path.with_suffix(".md")).is_file()


@pytest.fixture(scope="module")
def nasa_prepared(tmp_path_factory) -> dict[str, np.ndarray]:
    from pipeline.prepare import prepare, read_prepared

    out = tmp_path_factory.mktemp("nasa")
    job = {"dataset": {"id": "nasa"}, "input": {"format": "webdataset", "paths": [str(s) for s in DEMO_SHARDS]},
           "output": {"dir": str(out)}, "detection": {"min_face_size": 40}, "prepare": {"identity": False},
           "runtime": {"progress": False, "torch_threads": 1}}
    prepare(job, echo=lambda s: None)
    items = [it for s in DEMO_SHARDS for it in read_prepared(out / "shards" / s.name)]
    assert len(items) == 12
    return {k: np.stack([it[k] for it in items]) for k in ("image", "geometry", "fit_landmarks68")}


def _predict(net, images: np.ndarray):
    with torch.inference_mode():
        return net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


def test_shipped_regressor_agrees_with_the_fit_on_nasa_portraits(nasa_prepared):
    net = geometry_net.load_geometry_net()
    out = _predict(net, nasa_prepared["image"])
    nme = metrics.nme(out.landmarks.numpy(), nasa_prepared["fit_landmarks68"])
    pose_err = metrics.pose_difference(out.geometry[:, morphable.POSE].numpy(), nasa_prepared["geometry"][:, morphable.POSE])
    assert nme.mean() < NASA_NME_MEAN_BOUND and nme.max() < NASA_NME_MAX_BOUND, nme
    assert pose_err.mean() < NASA_POSE_MEAN_BOUND_DEG, pose_err
    # The alignment alone already puts faces near the mean: the regressor must beat "the mean face for all"
    # (the training targets' mean, decoded from a zero head output) by a wide margin.
    g0, c0 = geometry_net.decode_head(torch.zeros(1, 56), net.target_mean, net.target_std)
    base_lms = morphable.project_landmarks(g0, c0).numpy().repeat(12, 0)
    base_pose = g0[:, morphable.POSE].numpy().repeat(12, 0)
    assert nme.mean() < 0.5 * metrics.nme(base_lms, nasa_prepared["fit_landmarks68"]).mean()
    assert pose_err.mean() < 0.5 * metrics.pose_difference(base_pose, nasa_prepared["geometry"][:, morphable.POSE]).mean()


def test_shipped_regressor_mirrors_pose_on_flipped_faces(nasa_prepared):
    net = geometry_net.load_geometry_net()
    images = nasa_prepared["image"]
    pose = _predict(net, images).geometry[:, morphable.POSE].numpy()
    flipped = _predict(net, np.ascontiguousarray(images[:, :, ::-1])).geometry[:, morphable.POSE].numpy()
    # a mirror image turns yaw and roll around and keeps pitch
    np.testing.assert_allclose(flipped * [-1, 1, -1], pose, atol=6.0)
