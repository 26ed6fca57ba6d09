"""FID in `g2face-pipe audit`: computed from user-given Inception weights, checked by an independent route.

The weights are synthetic (torchvision's Inception-v3 state dict with real key names and shapes, batch-norm
statistics calibrated on random images): real reference weights cannot be shipped. The check is therefore
of the audit's glue (which faces, which crops, which order, the cache shared with baselines, the distance),
not of the published FID values.
"""

import hashlib
import json
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from conftest import DEMO_SHARDS, ROOT, job_tree
from helpers import decode, read_tar
from g2face.inception import load_inception
from pipeline import align
from pipeline.audit import write_audit
from pipeline.cli import app
from pipeline.metrics_stage import metric_transform
from pipeline.runner import run_job
from pipeline.spec import parse_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUIET = {"executor": "local", "progress": False, "torch_threads": 1}
FID_FACES = 4


def _weights(path: Path, classes: int, aux: bool) -> Path:
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=aux, init_weights=False, num_classes=classes)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running stats := this batch's, so activations stay of order one
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 299, 299) * 2 - 1)
    torch.save(net.eval().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit_fid")
    common = dict(
        output={"keys": "pseudonymize"}, keys={"create_demo_key": True}, runtime=QUIET, metrics={"enabled": False}
    )
    for name in ("blur", "pixelate"):
        spec = job_tree(tmp / name, [DEMO_SHARDS[0]], anonymizer={"method": name}, **common)
        run_job(parse_spec(spec), echo=lambda *_: None)
    return {"tmp": tmp, "fid_weights": _weights(tmp / "pt_inception.pth", 1008, False)}


def _first_crops(run: Path, n: int) -> tuple[list, list]:
    """The first n faces in run order, cut from the tars by the test itself."""
    doc = json.loads((run / "run.json").read_text())
    res, job_res = doc["spec"]["metrics"]["resolution"], doc["spec"]["anonymizer"]["resolution"]
    orig, anon = [], []
    for item in doc["inputs"]:
        inputs, outputs = read_tar(Path(item["url"])), read_tar(run / "shards" / item["shard"])
        public = pq.read_table(run / "manifests" / f"{item['shard']}.parquet").to_pylist()
        private = {r["index"]: r for r in pq.read_table(run / "private" / f"{item['shard']}.parquet").to_pylist()}
        for row in public:
            if not (row["published"] and row["n_faces"]):
                continue
            p = private[row["index"]]
            o_img, a_img = decode(inputs[p["original_key"]]["jpg"]), decode(outputs[p["key"]]["jpg"])
            for t in p["transforms"]:
                m = metric_transform(np.asarray(t).reshape(2, 3), job_res, res)
                orig.append(align.warp_to_crop(o_img, m, res))
                anon.append(align.warp_to_crop(a_img, m, res))
    return orig[:n], anon[:n]


def _independent_fid(model, orig, anon) -> float:
    with torch.no_grad():
        feats = [model(torch.from_numpy(np.stack(c)).permute(0, 3, 1, 2).float() / 255).double().numpy()
                 for c in (orig, anon)]
    mu1, mu2 = feats[0].mean(0), feats[1].mean(0)
    s1, s2 = np.cov(feats[0].T), np.cov(feats[1].T)
    # Both covariances live in the span of the centred features: project onto an orthonormal basis of it and
    # take a general (non-symmetric) eigensolver's eigenvalues of S1 S2 there. Not the audit's route.
    q, _ = np.linalg.qr(np.concatenate([feats[0] - mu1, feats[1] - mu2]).T)
    w = np.linalg.eigvals((q.T @ s1 @ q) @ (q.T @ s2 @ q))
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2) - 2 * np.sqrt(np.clip(w.real, 0, None)).sum())


def test_fid_is_computed_recorded_and_matches_an_independent_route(runs):
    tmp, weights = runs["tmp"], runs["fid_weights"]
    html_path, json_path = write_audit(
        str(tmp / "blur"), str(tmp / "report" / "report.html"), baselines=[str(tmp / "pixelate")],
        inception_weights=str(weights), fid_faces=FID_FACES, examples=False,
    )
    doc = json.loads(json_path.read_text())
    schema = json.loads((ROOT / "schemas" / "audit.schema.json").read_text())
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    fid = doc["utility"]["fid"]
    assert fid["computed"] and fid["weights_format"] == "pytorch-fid"
    # synthetic weights of the reference layout are still not the reference file
    assert not fid["comparable_with_published"] and "not its reference file" in fid["statement"]
    assert fid["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert fid["max_faces"] == FID_FACES and fid["weights"] == str(weights)
    assert "biased upwards on small samples" in fid["statement"]
    model = load_inception(weights)
    values = []
    for row, name in zip(fid["rows"], ("blur", "pixelate")):
        orig, anon = _first_crops(tmp / name, FID_FACES)
        assert len(orig) == FID_FACES, "the demo shard should have more faces than the FID bound"
        assert row["faces"] == FID_FACES and row["label"].startswith(("this run", "baseline 1"))
        assert row["value"] == pytest.approx(_independent_fid(model, orig, anon), rel=1e-5, abs=1e-9)
        values.append(row["value"])
    assert values[0] != pytest.approx(values[1]), "blur and pixelate should not give the same FID"
    text = html_path.read_text()
    assert "<b>FID:</b> this run" in text and f"{values[0]:.2f} over {FID_FACES} faces" in text
    assert "pytorch-fid layout" in text and "not computed" not in text.split("<b>FID:</b>")[1].split("</p>")[0]


def test_torchvision_weights_say_they_are_not_comparable_and_bad_files_fail_clearly(runs, tmp_path):
    tmp = runs["tmp"]
    tv_weights = _weights(tmp_path / "inception_v3_google.pth", 1000, True)
    cli = CliRunner()
    out = tmp_path / "r" / "report.html"
    res = cli.invoke(app, ["audit", str(tmp / "blur"), "--out", str(out), "--inception-weights", str(tv_weights),
                           "--fid-faces", "3", "--no-examples"])
    assert res.exit_code == 0, res.output
    fid = json.loads(out.with_name("audit.json").read_text())["utility"]["fid"]
    assert fid["weights_format"] == "torchvision" and not fid["comparable_with_published"]
    assert fid["rows"][0]["faces"] == 3 and fid["rows"][0]["value"] > 0
    assert "not with published FIDs" in fid["statement"]

    state = torch.load(tv_weights, weights_only=True)
    state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(192, 2048, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    res = cli.invoke(app, ["audit", str(tmp / "blur"), "--out", str(out), "--inception-weights",
                           str(tmp_path / "bad.pth")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert str(tmp_path / "bad.pth") in res.output and "Mixed_7c.branch_pool.conv.weight" in res.output


def test_without_weights_the_report_says_fid_was_not_computed_and_why(runs, tmp_path):
    html_path, json_path = write_audit(str(runs["tmp"] / "blur"), str(tmp_path / "report.html"), examples=False)
    fid = json.loads(json_path.read_text())["utility"]["fid"]
    assert fid == {"computed": False, "reason": fid["reason"]} and "--inception-weights" in fid["reason"]
    assert "<b>FID:</b> not computed. FID needs the Inception-v3 weights" in html_path.read_text()
