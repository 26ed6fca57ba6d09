"""anonymizer.weights: official: the paper's configuration wired into the pipeline, on synthetic weights.

The files are built from the official key/shape listings (tests/g2face/fixtures, copied from shared/reference):
random values, never real weights; they test the wiring, not the model's quality.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO_SHARDS, ROOT, job_tree
from helpers import decode, read_tar, write_tar
from pipeline.anonymizers import AnonymizerUnavailable, anonymizer_for
from pipeline.official import OfficialG2FaceAnonymizer, arcface_input, official_geometry
from pipeline.payload import PayloadLayout
from pipeline.runner import run_job
from pipeline.spec import JobSpecError, parse_spec

pytestmark = pytest.mark.timeout(600)
G2FACE_TESTS = Path(__file__).resolve().parents[1] / "g2face"
OFFICIAL_SHAPES = json.loads((G2FACE_TESTS / "fixtures" / "g2face_official_shapes.json").read_text())


def _helper(name: str):
    """A test module of tests/g2face (their synthetic-state builders), imported by path."""
    spec = importlib.util.spec_from_file_location(f"_official_{name}", G2FACE_TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_g2face_pth() -> dict:
    """An official-format G2Face.pth: a seeded paper-256 init under the official names, checked against the listing."""
    from g2face.checkpoint import OFFICIAL_ENTRIES, official_name
    from g2face.config import PAPER_256
    from g2face.model import G2Face

    torch.manual_seed(0)
    ckpt = {"epoch": 3, "iter": 30000}
    for k, v in G2Face(PAPER_256).state_dict().items():
        entry, key = official_name(k)
        ckpt.setdefault(entry, {})[key] = v.clone()
    for entry in OFFICIAL_ENTRIES:  # keys and shapes are exactly the official file's
        assert {k: list(v.shape) for k, v in ckpt[entry].items()} == {k: list(s) for k, s in OFFICIAL_SHAPES[entry].items()}
    return ckpt


@pytest.fixture(scope="module")
def official_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("official")
    files = {"g2face": d / "G2Face.pth", "arcface": d / "ms1mv3_arcface_r50.pth", "deep3d": d / "epoch_20.pth",
             "bfm": d / "BFM_model_front.mat"}
    torch.save(synthetic_g2face_pth(), files["g2face"])
    torch.save(_helper("test_arcface").synthetic_state_dict("iresnet50"), files["arcface"])
    torch.save({"net_recon": _helper("test_deep3d").synthetic_state()}, files["deep3d"])
    files["bfm"].write_bytes(b"MATLAB 5.0 MAT-file, synthetic header for the path check".ljust(128, b" "))
    return files


@pytest.fixture(scope="module")
def one_image_shard(tmp_path_factory) -> Path:
    src = read_tar(DEMO_SHARDS[0])
    key = sorted(src)[0]
    path = tmp_path_factory.mktemp("shard") / "nasa-one.tar"
    return write_tar(path, [(f"{key}.{ext}", data) for ext, data in sorted(src[key].items())])


def _official(files: dict[str, Path], **changes) -> dict:
    return {**{k: str(v) for k, v in files.items()}, **changes}


def _tree(out: Path, shard: Path, files: dict, **anonymizer) -> dict:
    an = {"method": "g2face", "weights": "official", "resolution": 256, "official": _official(files),
          "payload": "irreversible", **anonymizer}
    return job_tree(out, shard, anonymizer=an, output={"image_format": "png", "keys": "keep"},
                    metrics={"enabled": False}, runtime={"executor": "local", "progress": False, "torch_threads": 1})


def test_official_job_runs_end_to_end(tmp_path, official_files, one_image_shard):
    torch.set_num_threads(1)
    out = tmp_path / "out"
    run_job(parse_spec(_tree(out, one_image_shard, official_files)), echo=lambda *_: None)

    g2face_sha = hashlib.sha256(official_files["g2face"].read_bytes()).hexdigest()
    run = json.loads((out / "run.json").read_text())
    assert run["payload"]["artifact_sha256"] == g2face_sha and run["payload"]["mode"] == "irreversible"
    assert run["anonymizer_model_id"].startswith(f"g2face-official:paper-256:{g2face_sha[:16]}:arcface-r50=")
    assert run["spec"]["anonymizer"]["weights"] == "official"

    manifest_doc = json.loads((ROOT / "schemas" / "manifest.schema.json").read_text())
    rows = pq.read_table(out / "manifests" / f"{one_image_shard.name}.parquet").to_pylist()
    for row in rows:
        jsonschema.validate(row, manifest_doc["row_json_schema"]["public"], cls=jsonschema.Draft202012Validator)
    for row in pq.read_table(out / "private" / f"{one_image_shard.name}.parquet").to_pylist():
        jsonschema.validate(row, manifest_doc["row_json_schema"]["private"], cls=jsonschema.Draft202012Validator)
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    assert rows[0]["model_id"] == run["anonymizer_model_id"] and rows[0]["model_id"].endswith(":irreversible")

    src, dst = read_tar(one_image_shard), read_tar(out / "shards" / one_image_shard.name)
    a, b = decode(src[rows[0]["key"]]["jpg"]), decode(dst[rows[0]["key"]]["png"])
    faces = rows[0]["faces"]
    assert faces and all(f["method"] == "g2face" and f["payload_mode"] == "irreversible" for f in faces)
    assert a.shape == b.shape
    x0, y0, x1, y1 = (int(v) for v in faces[0]["paste_box"])
    assert np.abs(a[y0:y1, x0:x1].astype(int) - b[y0:y1, x0:x1].astype(int)).mean() > 2.0  # the face changed
    outside = np.ones(a.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(a[outside], b[outside])  # and nothing outside its paste box did


def test_priors_are_computed_as_the_official_code_does(official_files):
    torch.set_num_threads(1)
    coeffs = torch.arange(2 * 257, dtype=torch.float32).reshape(2, 257)
    geo = official_geometry(coeffs)
    assert geo.shape == (2, 147)
    assert torch.equal(geo, torch.cat([coeffs[:, :144], coeffs[:, 224:227]], 1))  # id 80 | exp 64 | angles 3

    faces = torch.rand(2, 3, 256, 256)
    x = arcface_input(faces)
    assert x.shape == (2, 3, 112, 112) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, F.interpolate(faces * 2 - 1, size=112))  # nearest, full frame, no crop

    model = OfficialG2FaceAnonymizer(**{k: str(v) for k, v in official_files.items()})
    assert model.payload_bits == 16384 and model.identity_dim == 512
    assert model.identity_embeddings(faces).shape == (2, 512)
    assert torch.equal(model.geometry(faces), official_geometry(model.geometry_net(faces)))
    # 512-d ArcFace embeddings fit the official capacity (one copy of the encrypted, RS-coded stream)
    assert PayloadLayout(model.payload_bits, model.identity_dim).copies >= 1
    y1 = model.anonymize(faces[:1], [7])
    assert y1.shape == (1, 3, 256, 256) and torch.isfinite(y1).all()
    assert model.extract(y1).shape == (1, 16384)


def test_reversible_official_job_hides_512_d_payloads_and_labels_only_verified_faces(tmp_path, official_files,
                                                                                    one_image_shard):
    """The payload layout follows the model's embedding size (512-d ArcFace); with these random weights the
    payload does not read back, so the face must not be published as reversible."""
    import json

    import pyarrow.parquet as pq

    from pipeline.keys import create_master_key

    key = tmp_path / "master.key"
    create_master_key(key)
    tree = _tree(tmp_path / "out", one_image_shard, official_files, payload="reversible")
    tree["keys"] = {"master": str(key)}
    run_job(parse_spec(tree), echo=lambda *_: None)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["payload"]["layout"]["embedding_dim"] == 512 and run["payload"]["layout"]["capacity_bits"] == 16384
    rows = pq.read_table(next((tmp_path / "out" / "manifests").glob("*.parquet"))).to_pylist()
    faces = [f for r in rows for f in r["faces"]]
    assert faces and all((f["payload_mode"] == "reversible") == bool(f["payload_ok"]) for f in faces)

    # `recover` rebuilds the run's own official model from its spec, bound to the hash run.json recorded.
    from pipeline.official import OfficialG2FaceAnonymizer
    from pipeline.recover import RecoveryError, _load_model

    model = _load_model(run, None, torch.device("cpu"))
    assert isinstance(model, OfficialG2FaceAnonymizer) and model.artifact_sha256 == run["payload"]["artifact_sha256"]
    run["payload"]["artifact_sha256"] = "0" * 64
    with pytest.raises(RecoveryError, match="but the run used 0000"):
        _load_model(run, None, torch.device("cpu"))


def _official_an(tmp_path, files, **changes):
    return parse_spec(_tree(tmp_path / "o", DEMO_SHARDS[0], files, **changes)).anonymizer


def test_bad_files_are_refused_naming_the_field_file_and_keys(tmp_path, official_files):
    torch.set_num_threads(1)
    missing = tmp_path / "nope.pth"
    an = _official_an(tmp_path, official_files, official=_official(official_files, deep3d=str(missing)))
    with pytest.raises(AnonymizerUnavailable, match=rf"anonymizer.official.deep3d {missing}: no such file"):
        anonymizer_for(an)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    an = _official_an(tmp_path, official_files, official=_official(official_files, arcface=str(garbage)))
    with pytest.raises(AnonymizerUnavailable, match=rf"anonymizer.official.arcface {garbage}: not a readable"):
        anonymizer_for(an)

    arc = torch.load(official_files["arcface"], weights_only=True)
    arc["fc.weight"] = arc["fc.weight"][:, :100]
    bad_arc = tmp_path / "arc.pth"
    torch.save(arc, bad_arc)
    an = _official_an(tmp_path, official_files, official=_official(official_files, arcface=str(bad_arc)))
    with pytest.raises(AnonymizerUnavailable, match=r"anonymizer.official.arcface .*arc.pth.*mis-shaped.*fc.weight"):
        anonymizer_for(an)

    ckpt = torch.load(official_files["g2face"], weights_only=True)
    del ckpt["style_mlp"]["style_low.0.weight"]
    ckpt["hiding_extractor"]["conv1x1_output.bias"] = torch.zeros(3)
    bad_g2 = tmp_path / "G2Face-partial.pth"
    torch.save(ckpt, bad_g2)
    an = _official_an(tmp_path, official_files, official=_official(official_files, g2face=str(bad_g2)))
    with pytest.raises(AnonymizerUnavailable) as err:
        anonymizer_for(an)
    msg = str(err.value)
    assert msg.startswith(f"anonymizer.official.g2face {bad_g2}:") and str(bad_g2) in msg
    assert "missing keys: style_low.0.weight" in msg and "conv1x1_output.bias" in msg

    not_mat = tmp_path / "bfm.mat"
    not_mat.write_bytes(b"\x00" * 600)
    an = _official_an(tmp_path, official_files, official=_official(official_files, bfm=str(not_mat)))
    with pytest.raises(AnonymizerUnavailable, match=r"anonymizer.official.bfm .*not a MATLAB"):
        anonymizer_for(an)


@pytest.mark.parametrize("anonymizer, field", [
    ({"official": None}, "anonymizer.official is required"),
    ({"resolution": 128}, "anonymizer.resolution is 128 but the official model is 256 px"),
    ({"official": {"g2face": "G2Face.pth", "deep3d": "epoch_20.pth"}}, "anonymizer.official.arcface: Field required"),
    ({"checkpoint": "lite.g2face"}, "remove checkpoint"),
    ({"weights": "shipped"}, "anonymizer.official is read only with anonymizer.weights: official"),
    ({"method": "blur"}, "set anonymizer.method: g2face"),
    ({"official": {"g2face": "a", "arcface": "b", "deep3d": "c", "bfm_path": "d"}}, "anonymizer.official.bfm_path: unknown key"),
])
def test_config_errors_name_the_field(tmp_path, official_files, anonymizer, field):
    tree = _tree(tmp_path / "out", DEMO_SHARDS[0], official_files)
    tree["anonymizer"] = {k: v for k, v in {**tree["anonymizer"], **anonymizer}.items() if v is not None}
    with pytest.raises(JobSpecError, match=field):
        parse_spec(tree)
