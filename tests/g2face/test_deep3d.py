"""Deep3DFaceRecon net_recon: exact key layout, strict loading with named errors, head order."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from g2face import deep3d

FIXTURE = Path(__file__).parent / "fixtures" / "deep3d_net_recon_shapes.json"


def reference_shapes() -> dict[str, list[int]]:
    return json.loads(FIXTURE.read_text())["net_recon"]


def synthetic_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with every reference key and shape, random values (positive BN variances)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reference_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(".weight") and len(shape) == 1:  # BN gamma near 1 keeps activations finite
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=g)
    return state


def test_module_keys_and_shapes_match_reference():
    model_shapes = {k: list(v.shape) for k, v in deep3d.NetRecon().state_dict().items()}
    assert model_shapes == reference_shapes()
    assert deep3d.COEFF_DIM == 257


def test_loads_synthetic_checkpoint_file_strictly(tmp_path):
    state = synthetic_state()
    path = tmp_path / "epoch_20.pth"
    torch.save({"net_recon": state, "opt_00": {"unused": 1}}, path)
    model = deep3d.load_net_recon(path)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_forward_concatenates_heads_in_reference_order():
    model = deep3d.load_net_recon(synthetic_state()).double()  # float64: random weights give large activations
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        coeffs = model(image)
        feat = model.backbone(image).flatten(1)
    assert coeffs.shape == (2, 257) and torch.isfinite(coeffs).all()
    start = 0
    for i, (name, size) in enumerate(deep3d.HEADS):
        head = model.final_layers[i]
        expect = feat @ head.weight.flatten(1).T + head.bias
        torch.testing.assert_close(coeffs[:, start : start + size], expect, rtol=1e-9, atol=1e-9)
        start += size
    parts = deep3d.split_coefficients(coeffs)
    assert {k: v.shape[1] for k, v in parts.items()} == {"id": 80, "exp": 64, "tex": 80, "angle": 3, "gamma": 27, "trans": 3}
    torch.testing.assert_close(parts["trans"], coeffs[:, 254:257])


def test_accepts_256px_frames():
    with torch.no_grad():
        out = deep3d.NetRecon().eval()(torch.rand(1, 3, 256, 256))
    assert out.shape == (1, 257)


def test_missing_key_is_named(tmp_path):
    state = synthetic_state()
    del state["backbone.layer3.2.bn2.running_mean"]
    path = tmp_path / "broken.pth"
    torch.save({"net_recon": state}, path)
    with pytest.raises(deep3d.NetReconLoadError, match=r"broken\.pth.*1 missing keys: backbone\.layer3\.2\.bn2\.running_mean"):
        deep3d.load_net_recon(path)


def test_unexpected_key_is_named():
    state = synthetic_state()
    state["backbone.fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(deep3d.NetReconLoadError, match=r"1 unexpected keys: backbone\.fc\.weight"):
        deep3d.load_net_recon(state)


def test_misshaped_key_is_named_with_both_shapes():
    state = synthetic_state()
    state["final_layers.1.weight"] = torch.zeros(80, 2048, 1, 1)  # exp head with the id head's size
    with pytest.raises(deep3d.NetReconLoadError, match=r"final_layers\.1\.weight: expected \[64, 2048, 1, 1\], got \[80, 2048, 1, 1\]"):
        deep3d.load_net_recon(state)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(deep3d.NetReconLoadError, match="nope.pth does not exist"):
        deep3d.load_net_recon(tmp_path / "nope.pth")
