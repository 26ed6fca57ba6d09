"""Checkpoints: official G2Face.pth into paper-256, inference artifacts, safe reading of foreign files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from g2face.checkpoint import (OFFICIAL_ENTRIES, CheckpointError, content_sha256, load_artifact,
                               load_official_g2face, load_torch_file, official_name, save_artifact)
from g2face.config import LITE_128, PAPER_256
from g2face.model import G2Face
from g2face.stylegan2 import Discriminator

FIXTURES = Path(__file__).parent / "fixtures"
# Every key and shape of the official G2Face.pth model entries (copied from shared/reference).
OFFICIAL_SHAPES = json.loads((FIXTURES / "g2face_official_shapes.json").read_text())
_BUFFER_SUFFIXES = ("kernel", "running_mean", "running_var", "num_batches_tracked")


def _official_params(entry: str, prefix: str = "") -> int:
    return sum(int(np.prod(s)) for k, s in OFFICIAL_SHAPES[entry].items()
               if k.startswith(prefix) and not k.endswith(_BUFFER_SUFFIXES))


def _synthetic_official(model: G2Face) -> dict:
    """An official-format checkpoint: tensor i of the listing filled with i + 1; true FIR kernels."""
    own = {official_name(k): v for k, v in model.state_dict().items()}
    ckpt, i = {"epoch": 3, "iter": 30000, "discriminator": {}}, 0
    for entry in OFFICIAL_ENTRIES:
        ckpt[entry] = {}
        for key, shape in OFFICIAL_SHAPES[entry].items():
            i += 1
            if key.endswith("kernel"):
                ckpt[entry][key] = own[(entry, key)].clone()
            elif key.endswith("num_batches_tracked"):
                ckpt[entry][key] = torch.tensor(i)
            else:
                ckpt[entry][key] = torch.full(shape, float(i))
    return ckpt


@pytest.fixture(scope="module")
def paper():
    torch.manual_seed(0)
    model = G2Face(PAPER_256)
    return model, _synthetic_official(model)


def test_paper_256_loads_the_official_checkpoint_strictly(paper):
    model, ckpt = paper
    load_official_g2face(model, ckpt)
    state = model.state_dict()
    used = set()
    for key, value in state.items():  # every tensor came from the official key our mapping names
        entry, okey = official_name(key)
        assert torch.equal(value, ckpt[entry][okey].to(value.dtype)), (key, entry, okey)
        used.add((entry, okey))
    assert used == {(e, k) for e in OFFICIAL_ENTRIES for k in OFFICIAL_SHAPES[e]}  # a bijection


def test_parameter_counts_per_module_equal_the_official(paper):
    model, _ = paper

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(model.encoder) == _official_params("anonymous_net", "pyramid.") == 48_987_092
    assert count(model.fusion) == _official_params("anonymous_net", "fusion_mask.") == 3_902_336
    assert count(model.hiding) == _official_params("anonymous_net", "hiding_injects.") == 362_496
    generator = count(model.synthesis) + count(model.encoder) + count(model.fusion) + count(model.hiding)
    assert generator == _official_params("anonymous_net") == 81_185_014
    assert count(model.mapper) == _official_params("style_mlp") == 3_377_664
    assert count(model.dummy) == _official_params("map_2_id") == 526_336
    assert count(model.extractor) == _official_params("hiding_extractor") == 163_137
    disc = Discriminator(PAPER_256.resolution, PAPER_256.discriminator_channels)
    assert count(disc) == _official_params("discriminator") == 28_864_129
    assert sorted(disc.state_dict()) == sorted(OFFICIAL_SHAPES["discriminator"])


def test_mapper_reproduces_the_doubled_bias(paper):
    model, _ = paper
    layer = model.mapper.low[0]
    x = torch.randn(2, layer.weight.shape[1])
    with torch.no_grad():
        pre = x @ (layer.weight * layer.scale).T + 2 * layer.bias * layer.lr_mul
        torch.testing.assert_close(layer(x), torch.nn.functional.leaky_relu(pre, 0.2) * 2**0.5)


def test_bad_official_files_name_the_keys(paper):
    model, ckpt = paper
    bad = {e: dict(ckpt[e]) for e in OFFICIAL_ENTRIES}
    del bad["anonymous_net"]["pyramid.3.conv1.conv.weight"]
    bad["style_mlp"]["style_extra.0.weight"] = torch.zeros(1)
    bad["hiding_extractor"]["conv1x1_output.weight"] = torch.zeros(2, 128, 3, 3)
    with pytest.raises(CheckpointError) as err:
        load_official_g2face(model, bad)
    msg = str(err.value)
    assert "[anonymous_net] does not match the model: 1 missing keys: pyramid.3.conv1.conv.weight" in msg
    assert "[style_mlp] does not match the model: 1 unexpected keys: style_extra.0.weight" in msg
    assert "conv1x1_output.weight (file [2, 128, 3, 3], model [1, 128, 3, 3])" in msg

    partial = {e: ckpt[e] for e in ("anonymous_net", "style_mlp")}
    with pytest.raises(CheckpointError, match=r"lacks entries \['map_2_id', 'hiding_extractor'\]"):
        load_official_g2face(model, partial)
    kernel = {e: dict(ckpt[e]) for e in OFFICIAL_ENTRIES}
    kernel["anonymous_net"]["to_rgbs.2.upsample.kernel"] = torch.ones(4, 4)
    with pytest.raises(CheckpointError, match="to_rgbs.2.upsample.kernel"):
        load_official_g2face(model, kernel)
    with pytest.raises(CheckpointError, match="mapper_doubled_bias"):
        load_official_g2face(G2Face(LITE_128), ckpt)


class _Exploit:
    """Pickles to a call of os.mkdir: a file that ran it on load would create the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_foreign_objects_in_files_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    weights = {"a.weight": torch.randn(3, 2)}
    path = tmp_path / "G2Face.pth"
    torch.save({"anonymous_net": weights, "scheduler": {"after_scheduler": _Exploit(marker)}, "iter": 5}, path)
    obj = load_torch_file(path)
    assert not marker.exists()
    assert torch.equal(obj["anonymous_net"]["a.weight"], weights["a.weight"]) and obj["iter"] == 5
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pth is not a readable PyTorch file"):
        load_torch_file(tmp_path / "junk.pth")


# ---- inference artifact -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite_artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = G2Face(LITE_128)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gain", "noise.weight")):
                p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("artifact") / "lite.g2face"
    digest = save_artifact(model, path, metadata={"ema": True, "step": 1000})
    return model.eval(), path, digest


def test_artifact_round_trip(lite_artifact):
    model, path, digest = lite_artifact
    assert path.stat().st_size < 30e6
    loaded = load_artifact(path, expected_sha256=digest)
    assert loaded.config == LITE_128 and not loaded.training
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        want = a.half().float() if a.is_floating_point() else a
        assert torch.equal(b, want), k  # exactly the fp16-rounded weights
    r = LITE_128.resolution
    faces, geo = torch.rand(1, 3, r, r), torch.randn(1, LITE_128.geometry_dim)
    bits = torch.randint(0, 2, (1, LITE_128.payload_bits)).float()
    a = model.anonymize(faces, None, geo, bits, [1])
    b = loaded.anonymize(faces, None, geo, bits, [1])
    assert (a - b).abs().max() < 0.05  # only fp16 storage separates them


def test_artifact_integrity_errors(lite_artifact, tmp_path):
    _, path, digest = lite_artifact
    obj = torch.load(path, weights_only=True)
    obj["state_dict"]["synthesis.conv1.conv.weight"][0, 0, 0, 0, 0] += 1
    torch.save(obj, tmp_path / "tampered.g2face")
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_artifact(tmp_path / "tampered.g2face")
    with pytest.raises(CheckpointError, match="not the expected"):
        load_artifact(path, expected_sha256="0" * 64)
    # a consistent hash over an incomplete state dict still fails, naming the keys
    del obj["state_dict"]["extractor.head.bias"]
    obj["sha256"] = content_sha256(obj["config"], obj["state_dict"], obj["metadata"])
    torch.save(obj, tmp_path / "partial.g2face")
    with pytest.raises(CheckpointError, match="missing keys: extractor.head.bias"):
        load_artifact(tmp_path / "partial.g2face")
    torch.save({"model": {}, "optimizer": {}, "step": 3}, tmp_path / "train.pt")
    with pytest.raises(CheckpointError, match="not a G2Face inference artifact"):
        load_artifact(tmp_path / "train.pt")
