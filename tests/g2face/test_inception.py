"""Inception-v3 features for FID: format detection, strict loading, the FID graph's pooling, the Fréchet distance.

The real weight files cannot be shipped, so the files here are synthetic: torchvision's own Inception-v3
state dicts (real key names and shapes; 1008 classes and no auxiliary head for pytorch-fid's layout), with the
batch-norm statistics calibrated on random images so activations stay of order one.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from g2face.inception import (
    FEATURE_DIM,
    REFERENCE_SHA256_PREFIX,
    InceptionFeatures,
    InceptionWeightsError,
    fid,
    frechet_distance,
    gaussian_stats,
    load_inception,
    weights_format_of,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _calibrated_state(classes: int, aux: bool) -> dict:
    torch.manual_seed(classes)
    net = torchvision.models.inception_v3(weights=None, aux_logits=aux, init_weights=False, num_classes=classes)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: running stats = this batch's stats
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 299, 299) * 2 - 1)
    return net.eval().state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inception")
    out = {}
    for name, classes, aux in (("pytorch-fid", 1008, False), ("torchvision", 1000, True)):
        state = _calibrated_state(classes, aux)
        out[name] = tmp / f"{name}.pth"
        torch.save(state, out[name])
        out[name + "-state"] = state
    return out


def _branch_pool_inputs(model, blocks, x):
    """Each block's input and what its pool branch's convolution received, from forward hooks."""
    seen, hooks = {}, []
    for name in blocks:
        block = getattr(model.net, name)
        hooks.append(block.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n + ".in", a[0])))
        hooks.append(
            block.branch_pool.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n + ".pool", a[0]))
        )
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_pytorch_fid_layout_is_detected_and_pools_as_the_fid_graph(files):
    model = load_inception(files["pytorch-fid"])
    assert model.weights_format == "pytorch-fid" and not model.is_fid_reference  # layout only, not the file
    assert InceptionFeatures(model.net, "pytorch-fid", REFERENCE_SHA256_PREFIX + "0" * 56).is_fid_reference
    assert not InceptionFeatures(model.net, "torchvision", REFERENCE_SHA256_PREFIX + "0" * 56).is_fid_reference
    x = torch.rand(2, 3, 64, 80)
    blocks = ("Mixed_5b", "Mixed_5d", "Mixed_6b", "Mixed_6e", "Mixed_7b", "Mixed_7c")
    seen = _branch_pool_inputs(model, blocks, x)
    for name in blocks:
        inp = seen[name + ".in"]
        if name == "Mixed_7c":
            want = F.max_pool2d(inp, 3, stride=1, padding=1)
        else:
            want = F.avg_pool2d(inp, 3, stride=1, padding=1, count_include_pad=False)
        assert torch.allclose(seen[name + ".pool"], want), name
        # and it is not torchvision's pooling (which counts the zero padding into the border means)
        assert not torch.allclose(seen[name + ".pool"], F.avg_pool2d(inp, 3, stride=1, padding=1)), name


def test_torchvision_layout_matches_torchvision_on_the_fid_input_scaling(files):
    model = load_inception(files["torchvision"])
    assert model.weights_format == "torchvision"
    ref = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    ref.load_state_dict(files["torchvision-state"])
    pooled = {}
    ref.avgpool.register_forward_hook(lambda m, a, out: pooled.__setitem__("x", out.flatten(1)))
    x = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        got = model(x)
        ref(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1)
    assert got.shape == (3, FEATURE_DIM) and got.dtype == torch.float32
    assert got.abs().mean() > 1e-2, "calibrated synthetic weights should give features of order one"
    torch.testing.assert_close(got, pooled["x"], rtol=1e-4, atol=1e-5)
    # the FID graph's pooling changes the features: the two layouts are not interchangeable
    fid_like = load_inception(files["pytorch-fid"])
    with torch.no_grad():
        assert not torch.allclose(fid_like(x), got, rtol=1e-2)


def test_loading_is_strict_and_names_the_file_and_keys(files, tmp_path):
    state = dict(files["pytorch-fid-state"])

    def fails(st, *words):
        path = tmp_path / "bad.pth"
        torch.save(st, path)
        with pytest.raises(InceptionWeightsError) as e:
            load_inception(path)
        for w in (str(path),) + words:
            assert w in str(e.value), (w, str(e.value))

    fails({k: v for k, v in state.items() if k != "Mixed_6c.branch1x1.conv.weight"}, "missing",
          "Mixed_6c.branch1x1.conv.weight")
    fails({**state, "Mixed_6c.extra.weight": torch.zeros(1)}, "unexpected", "Mixed_6c.extra.weight")
    fails({**state, "Mixed_5b.branch1x1.conv.weight": torch.zeros(64, 192, 3, 3)}, "mis-shaped",
          "Mixed_5b.branch1x1.conv.weight (64, 192, 3, 3) (expected (64, 192, 1, 1))")
    fails({**state, "fc.weight": torch.zeros(10, 2048)}, "fc.weight", "(1008, 2048)", "(1000, 2048)")
    with pytest.raises(InceptionWeightsError, match="no such file"):
        load_inception(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionWeightsError, match="cannot be read"):
        load_inception(tmp_path / "junk.pth")
    # Older files have no BatchNorm step counters; a DataParallel prefix is tolerated.
    old = {"module." + k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    assert load_inception(tmp_path / "old.pth").weights_format == "pytorch-fid"
    assert weights_format_of(files["torchvision-state"]) == "torchvision"


# ---------------------------------------------------------------------------------------------------------
# The Fréchet distance, against closed forms and a general eigenvalue route.


def _reference(mu1, s1, mu2, s2):
    """|dmu|^2 + tr S1 + tr S2 - 2 sum sqrt(eig(S1 S2)), with numpy's general (non-symmetric) eigensolver."""
    w = np.linalg.eigvals(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(w.real, 0, None)).sum())


def test_frechet_distance_matches_closed_forms_and_general_eigenvalues():
    rng = np.random.default_rng(0)
    d = 6
    a, b = rng.uniform(0.5, 3, d), rng.uniform(0.5, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # diagonal covariances commute: tr sqrt(S1 S2) = sum sqrt(a b)
    closed = (mu1 - mu2) @ (mu1 - mu2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # general, non-commuting covariances
    x, y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = x @ x.T + 0.1 * np.eye(d), y @ y.T + 0.1 * np.eye(d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference(mu1, s1, mu2, s2), rel=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_fid_of_feature_sets_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(1)
    f1 = rng.normal(size=(40, 128))
    f2 = rng.normal(size=(40, 128)) * 1.5 + 0.3
    mu1, s1 = gaussian_stats(f1)
    assert mu1.dtype == np.float64 and s1.shape == (128, 128)
    np.testing.assert_allclose(s1, np.cov(f1.T), rtol=1e-12)
    value = fid(f1, f2)
    assert value == pytest.approx(_reference(*gaussian_stats(f1), *gaussian_stats(f2)), rel=1e-6)
    # the covariance route agrees up to the square roots of its singular covariances' rounding noise
    assert value == pytest.approx(frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2)), rel=1e-7)
    assert value > fid(f1, f1 + 1e-3) and fid(f1, f1) == pytest.approx(0, abs=1e-6)
    # more samples than dimensions: the covariance route
    g1, g2 = rng.normal(size=(200, 16)), rng.normal(size=(150, 16)) * 0.7
    assert fid(g1, g2) == pytest.approx(_reference(*gaussian_stats(g1), *gaussian_stats(g2)), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(f1[:1])
