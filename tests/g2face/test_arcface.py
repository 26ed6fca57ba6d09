"""ArcFace IResNet: insightface layout, strict loading with named key problems, forward and gradients.

No ArcFace weights ship with the project, so state dicts are synthesised from the insightface key/shape
lists in fixtures/arcface_iresnet_shapes.json (copied from shared/reference).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from g2face.arcface import ArcFaceWeightsError, IResNet, load_arcface, to_arcface_input

FIXTURE = Path(__file__).parent / "fixtures" / "arcface_iresnet_shapes.json"


def reference_shapes(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(s)) for k, s in json.loads(FIXTURE.read_text())[arch]]


def synthetic_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of insightface's shapes, scaled so activations stay finite through 50-100 blocks."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in reference_shapes(arch):
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            sd[key] = 0.5 + torch.rand(shape, generator=gen)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            sd[key] = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # BN gamma, PReLU slopes
            sd[key] = 0.2 + 0.3 * torch.rand(shape, generator=gen)
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            sd[key] = torch.randn(shape, generator=gen) / fan_in**0.5
    return sd


@pytest.fixture(scope="module")
def sd50() -> dict[str, torch.Tensor]:
    return synthetic_state_dict("iresnet50")


@pytest.fixture(scope="module")
def model50(sd50):
    return load_arcface(sd50, "iresnet50")


@pytest.mark.parametrize("arch, params", [("iresnet50", 43_590_848), ("iresnet100", 65_156_160)])
def test_layout_matches_insightface(arch, params):
    model = IResNet(arch)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == reference_shapes(arch)
    assert sum(p.numel() for p in model.parameters()) == params


def test_strict_load_and_forward(sd50, model50):
    loaded = model50.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd50.items())
    assert not model50.training and not any(p.requires_grad for p in model50.parameters())
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        out = model50(x)
        single = model50(x[1:2])
    assert out.shape == (3, 512) and torch.isfinite(out).all()
    assert torch.allclose(out[1:2], single, atol=1e-4, rtol=1e-4)  # eval BN: no batch coupling
    # The loaded statistics are used: moving one running mean changes the embedding.
    sd = dict(sd50)
    sd["layer2.0.bn1.running_mean"] = sd["layer2.0.bn1.running_mean"] + 1.0
    with torch.no_grad():
        assert not torch.allclose(load_arcface(sd)(x[1:2]), single)


def test_gradients_reach_input(model50):
    x = (torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1).requires_grad_(True)
    ref = torch.randn(2, 512, generator=torch.Generator().manual_seed(3))
    loss = 1 - torch.nn.functional.cosine_similarity(model50(x), ref).mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_every_parameter_takes_part():
    model = IResNet("iresnet50").eval()
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    model(x).pow(2).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_errors_name_missing_unexpected_and_misshaped_keys(sd50):
    sd = dict(sd50)
    del sd["layer3.7.conv2.weight"]
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    sd["fc.weight"] = torch.zeros(512, 512)
    with pytest.raises(ArcFaceWeightsError) as err:
        load_arcface(sd, "iresnet50")
    msg = str(err.value)
    assert "1 missing: layer3.7.conv2.weight" in msg
    assert "1 unexpected: layer5.0.conv1.weight" in msg
    assert "fc.weight (512, 512) (expected (512, 25088))" in msg


def test_wrong_depth_is_refused(sd50):
    with pytest.raises(ArcFaceWeightsError, match=r"does not fit iresnet100: 450 missing: .*layer2\.10\."):
        load_arcface(sd50, "iresnet100")
    with pytest.raises(ValueError, match="unknown ArcFace arch"):
        IResNet("iresnet18")


def test_path_loading_hash_and_ddp_prefix(sd50, tmp_path):
    import hashlib

    path = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in sd50.items()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_arcface(path, "iresnet50", expected_sha256=digest)
    assert torch.equal(model.state_dict()["fc.weight"], sd50["fc.weight"])
    with pytest.raises(ArcFaceWeightsError, match=r"backbone\.pth: sha256 .* is not the expected 0{64}"):
        load_arcface(path, "iresnet50", expected_sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_arcface(tmp_path / "missing.pth")


def test_iresnet100_loads_and_runs():
    model = load_arcface(synthetic_state_dict("iresnet100", seed=5), "iresnet100")
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 112, 112))
    assert out.shape == (1, 512) and torch.isfinite(out).all()


def test_input_contract(model50):
    with pytest.raises(ValueError, match=r"\(N, 3, 112, 112\)"):
        model50(torch.zeros(1, 3, 128, 128))
    x = torch.rand(2, 3, 256, 256)
    y = to_arcface_input(x, value_range=(0.0, 1.0))
    assert y.shape == (2, 3, 112, 112)
    assert y.min() >= -1.0 and y.max() <= 1.0
    flat = to_arcface_input(torch.full((1, 3, 112, 112), 0.5), value_range=(0.0, 1.0))
    assert torch.allclose(flat, torch.zeros_like(flat))
