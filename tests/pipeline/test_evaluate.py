"""`g2face-pipe evaluate`: its numbers against an independent computation and against `g2face-pipe audit`.

The G2Face artifact here is an untrained, seeded, narrow lite-128-like model: it checks that every number is
computed correctly from what the pipeline wrote, never the quality of a model.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import DEMO_SHARDS, ROOT
from helpers import decode, read_tar, val_pairs_slice
from pipeline import align
from pipeline.audit import write_audit
from pipeline.cli import app
from pipeline.evaluate import BARS, EvaluateError, evaluate
from test_audit import _copies_shard, _independent_faces, _pairs_csv, _roc_tar

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """Untrained, seeded, narrow 128 px G2Face: for checking the arithmetic only, never shipped."""
    from g2face.checkpoint import save_artifact
    from g2face.config import LITE_128
    from g2face.model import G2Face

    cfg = LITE_128.replace(
        name="lite-128-narrow-test", style_dim=64, channels=(32, 32, 32, 32, 16, 16), dummy_noise_dim=32,
        dummy_hidden_dim=64, extractor_width=16, discriminator_channels=(32, 32, 32, 32, 16, 16),
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("artifact") / "narrow.pt"
    save_artifact(G2Face(cfg), path)
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, artifact):
    """Demo shard 0 plus mirrored copies (genuine pairs), the model and the blur baseline; then audit on the runs."""
    tmp = tmp_path_factory.mktemp("evaluate")
    shards = [str(DEMO_SHARDS[0]), str(_copies_shard(tmp / "copies-000000.tar"))]
    pairs = _pairs_csv(tmp / "pairs.csv")
    lines: list[str] = []
    # 16 draws, not the default 32: this untrained model's faces go through every draw allowed
    doc = evaluate(shards, str(pairs), str(tmp / "eval.json"), checkpoint=str(artifact), baselines=("blur",),
                   work_dir=str(tmp / "work"), torch_threads=1, echo=lines.append, draws=16)
    _, audit_json = write_audit(str(tmp / "work" / "g2face"), str(tmp / "report" / "report.html"), pairs=str(pairs),
                                baselines=[str(tmp / "work" / "blur")], examples=False)
    return {"tmp": tmp, "doc": doc, "pairs": pairs, "audit": json.loads(audit_json.read_text()),
            "runs": [tmp / "work" / "g2face", tmp / "work" / "blur"], "lines": lines}


def _pixel_change(run: Path) -> float:
    """Mean |original - written| inside the paste ellipse core, by a direct warp of the images (no pipeline code)."""
    import cv2

    res = json.loads((run / "run.json").read_text())["spec"]["anonymizer"]["resolution"]
    inside = align.paste_mask(res) >= 0.5
    changes = []
    for item in json.loads((run / "run.json").read_text())["inputs"]:
        inputs, outputs = read_tar(Path(item["url"])), read_tar(run / "shards" / item["shard"])
        private = pq.read_table(run / "private" / f"{item['shard']}.parquet").to_pylist()
        for p in private:
            orig = decode(next(v for k, v in inputs[p["original_key"]].items() if k in ("jpg", "png")))
            anon = decode(outputs[p["key"]]["png"])
            for t in p["transforms"]:
                m = np.asarray(t).reshape(2, 3)
                a, b = (cv2.warpAffine(x, m, (res, res), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
                        for x in (orig, anon))
                changes.append(np.abs(a.astype(float) - b)[inside].mean())
    return float(np.mean(changes))


def _check_against_independent(doc: dict, runs: list[Path], pairs_path: Path) -> None:
    """Identity distances by a direct image -> chip warp and the dlib port; threshold and TAR by an ROC sweep."""
    pairs = [(a, b, s == "1") for a, b, s in csv.reader(pairs_path.open()) if s != "same"]
    ver = doc["verification"]
    faces_by_run = [_independent_faces(r) for r in runs]
    ref = {f["key"]: f for f in faces_by_run[0]}
    used = [p for p in pairs if p[0] in ref and p[1] in ref]
    dist = lambda x, y: float(np.linalg.norm(x - y))  # noqa: E731
    impostor = np.array([dist(ref[a]["orig"], ref[b]["orig"]) for a, b, s in used if not s])
    gen_orig = np.array([dist(ref[a]["orig"], ref[b]["orig"]) for a, b, s in used if s])
    t, tar_orig = _roc_tar(gen_orig, impostor, 1e-3)
    assert ver["computed"] and ver["pairs_used"] == len(used)
    assert ver["threshold"] == pytest.approx(t, abs=0.03)
    near = lambda g: np.mean(np.abs(g - t) < 0.03) + 1e-9  # noqa: E731  (faces the two routes may decide apart)
    assert abs(ver["rows"][0]["tar"] - tar_orig) <= near(gen_orig)
    for i, faces in enumerate(faces_by_run):
        d = np.array([dist(f["orig"], f["anon"]) for f in faces])
        row = doc["privacy_rows"][i]
        assert row["faces"] == len(faces)
        assert row["identity_distance"]["mean"] == pytest.approx(d.mean(), abs=0.03)
        assert abs(row["share_still_matching"] - np.mean(d < 0.6)) <= np.mean(np.abs(d - 0.6) < 0.03) + 1e-9
        by_key = {f["key"]: f for f in faces}
        gen = np.array([dist(ref[a]["orig"], by_key[b]["anon"]) for a, b, s in used if s and b in by_key])
        assert abs(ver["rows"][1 + i]["tar"] - float(np.mean(gen < t))) <= near(gen)
        assert ver["rows"][1 + i]["genuine_pairs"] == len(gen)
    ident = doc["identity"]["port_aligned"]
    assert ident["share_still_matching"] == doc["privacy_rows"][0]["share_still_matching"]
    assert doc["verification"]["tar_one_side_anonymized"] == ver["rows"][1]["tar"]


def test_numbers_agree_with_an_independent_computation(evaluated):
    doc = evaluated["doc"]
    _check_against_independent(doc, evaluated["runs"], evaluated["pairs"])
    assert doc["verification"]["rows"][0]["tar"] > 0.8, "mirrored copies of a portrait verify as the same person"
    assert doc["counts"]["g2face"]["images"] == doc["counts"]["g2face"]["faces"] == 12
    # (the pipeline's crops are anti-aliased before shrinking, the direct warp is not: a few tenths apart)
    assert doc["pixel_change"]["mean_abs_grey_levels"] == pytest.approx(_pixel_change(evaluated["runs"][0]), abs=0.5)
    assert doc["pixel_change"]["baselines"]["blur"] == pytest.approx(_pixel_change(evaluated["runs"][1]), abs=0.5)

    # NME: the manifests' 68-point distances over the template's eye-centre distance at 256 px.
    for key, run in (("model", evaluated["runs"][0]), ("blur", evaluated["runs"][1])):
        lm = [f["metrics"]["landmark68_distance"] for p in sorted((run / "manifests").glob("*.parquet"))
              for r in pq.read_table(p).to_pylist() for f in r["faces"]]
        eye = np.linalg.norm(align.template(256)[0] - align.template(256)[1])
        assert doc["utility"][key]["nme"] == pytest.approx(np.mean(lm) / eye)

    # MTCNN's misses, by where they come from: every miss counted once; the model's faces carry the redraw
    # check's verdict (the job redraws), the baseline's its method; fallback faces their reason.
    from pipeline.redraw import DRAW_CHECK_OUTCOMES

    for key in ("model", "blur"):
        util = doc["utility"][key]
        missed = util["mtcnn_missed_by"]
        assert sum(missed.values()) == util["mtcnn_original_found"] - util["mtcnn_redetected"]
    assert all(k.split("/")[0] in ("g2face", "pixelate") for k in doc["utility"]["model"]["mtcnn_missed_by"])
    assert all(k.partition("/")[2] in DRAW_CHECK_OUTCOMES for k in doc["utility"]["model"]["mtcnn_missed_by"]
               if k.startswith("g2face"))
    assert all(k == "blur" or k.startswith("pixelate/") for k in doc["utility"]["blur"]["mtcnn_missed_by"])

    # dlib C++ route: every face is accounted for; the perturbed route measures every face.
    dl = doc["identity"]["dlib_cpp"]
    assert dl["faces"] + dl["original_not_found"] + dl["anonymized_not_found"] == 12
    assert doc["identity"]["perturbed"]["faces"] == 12
    blur = doc["identity"]["baselines"]["blur"]
    assert blur["port_aligned_share"] == doc["privacy_rows"][1]["share_still_matching"]


def test_dlib_cpp_route_matches_dlib_called_directly(evaluated):
    """The one face of each portrait, detected, landmarked and described by dlib's own Python API here."""
    import importlib.util

    import dlib

    models = Path(list(importlib.util.find_spec("face_recognition_models").submodule_search_locations)[0]) / "models"
    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    rec = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def iou(r, box):
        x0, y0, x1, y1 = max(r.left(), box[0]), max(r.top(), box[1]), min(r.right(), box[2]), min(r.bottom(), box[3])
        inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
        return inter / ((r.right() - r.left()) * (r.bottom() - r.top()) + (box[2] - box[0]) * (box[3] - box[1]) - inter)

    def descriptor(img, box):
        """dlib's face at the pipeline's box (the detection overlapping it most, IoU >= 0.3)."""
        rects = sorted(det(img, 1), key=lambda r: -iou(r, box))
        if not rects or iou(rects[0], box) < 0.3:
            return None
        return np.asarray(rec.compute_face_descriptor(img, sp(img, rects[0])))

    run = evaluated["runs"][0]
    d = []
    for item in json.loads((run / "run.json").read_text())["inputs"]:
        inputs, outputs = read_tar(Path(item["url"])), read_tar(run / "shards" / item["shard"])
        public = {r["index"]: r for r in pq.read_table(run / "manifests" / f"{item['shard']}.parquet").to_pylist()}
        for p in pq.read_table(run / "private" / f"{item['shard']}.parquet").to_pylist():
            box = public[p["index"]]["faces"][0]["box"]
            a = descriptor(decode(next(v for k, v in inputs[p["original_key"]].items() if k in ("jpg", "png"))), box)
            b = descriptor(decode(outputs[p["key"]]["png"]), box)
            if a is not None and b is not None:
                d.append(np.linalg.norm(a - b))
    route = json.loads((evaluated["tmp"] / "eval.json").read_text())["identity"]["dlib_cpp"]
    assert len(d) >= 5 and route["faces"] == len(d)
    assert route["identity_distance"]["mean"] == pytest.approx(np.mean(d), abs=1e-6)
    assert route["share_still_matching"] == pytest.approx(np.mean(np.array(d) < 0.6))


def test_evaluate_and_audit_report_the_same_numbers(evaluated):
    doc, audit = evaluated["doc"], evaluated["audit"]
    av, ev = audit["privacy"]["verification"], doc["verification"]
    assert ev["threshold"] == av["threshold"] and ev["pairs_used"] == av["pairs_used"]
    assert [(r["tar"], r["far"], r["genuine_pairs"]) for r in ev["rows"]] == [
        (r["tar"], r["far"], r["genuine_pairs"]) for r in av["rows"]
    ]
    for e, a in zip(doc["privacy_rows"], audit["privacy"]["rows"]):
        assert e["method"] == a["method"]
        for k in ("faces", "still_matching", "share_still_matching", "identity_distance", "rank1", "histogram"):
            assert e[k] == a[k], k
    keyless, ak = doc["recovery"]["without_key"], audit["privacy"]["keyless_resynthesis"]
    assert ak["computed"] and ak["attacked"] == keyless["attacked"] > 0
    assert ak["share_matching_original"] == keyless["share_matching_original"]
    assert ak["identity_distance"] == keyless["identity_distance"]
    for e, a in zip(doc["utility"]["rows"], audit["utility"]["rows"]):
        assert {k: v for k, v in e.items() if k != "label"} == {k: v for k, v in a.items() if k != "label"}
    # the report states the run's misses by cause, with the counts of its audit.json
    html_text = (evaluated["tmp"] / "report" / "report.html").read_text()
    missed = audit["utility"]["rows"][0]["mtcnn_missed_by"]
    from pipeline.audit_html import miss_cause

    stated = ", ".join(f"{miss_cause(k)}: {n}" for k, n in missed.items())
    assert missed and f"no longer finds in this run, by cause: {stated}.</p>" in html_text


def test_the_keyless_attack_uses_the_seeds_and_crops_the_run_used(evaluated):
    """pipeline.resynthesis attacks with public material only, yet must hit the seeds and crops the run used
    (else its figures say nothing about the key): checked against the private manifest's transforms and the
    stage's own seed rule, with no payload needing to open; and the audit's section follows its schema."""
    import jsonschema

    from pipeline.resynthesis import attack_targets
    from pipeline.stages import face_seed, seed_sample_key

    run = evaluated["runs"][0]
    doc = json.loads((run / "run.json").read_text())
    assert doc["face_seeds"] == "published_key"
    checked = 0
    for item in doc["inputs"]:
        public = pq.read_table(run / "manifests" / f"{item['shard']}.parquet").to_pylist()
        private = {r["index"]: r for r in pq.read_table(run / "private" / f"{item['shard']}.parquet").to_pylist()}
        for r in public:
            p = private[r["index"]]
            for t in attack_targets(r, doc["spec"]["seed"], doc["spec"]["anonymizer"]["resolution"]):
                assert np.allclose(t.transform, np.asarray(p["transforms"][t.face_index]).reshape(2, 3), atol=1e-3)
                assert t.seed == face_seed(doc["spec"]["seed"], seed_sample_key(r["key"], p["original_key"], r["index"]),
                                           t.face_index)
                checked += 1
    assert checked == evaluated["doc"]["recovery"]["without_key"]["attacked"] > 0
    schema = json.loads((ROOT / "schemas" / "audit.schema.json").read_text())
    jsonschema.validate(evaluated["audit"], schema, cls=jsonschema.Draft202012Validator)
    assert evaluated["audit"]["privacy"]["keyless_resynthesis"]["computed"] is True


def test_document_bars_and_privacy(evaluated):
    doc = evaluated["doc"]
    on_disk = json.loads((evaluated["tmp"] / "eval.json").read_text())
    assert on_disk["bars"] == doc["bars"]
    bars = doc["bars"]
    assert set(BARS) <= set(bars)
    for name, (path, op, threshold) in BARS.items():
        b = bars[name]
        assert b["threshold"] == threshold and b["comparison"] == op
        if b["value"] is None:
            assert b["pass"] is None and b["reason"].startswith("not available: ")
        else:
            assert b["pass"] == {"<=": b["value"] <= threshold, ">=": b["value"] >= threshold,
                                 "<": b["value"] < threshold}[op]
    # The untrained model's payloads do not open: the payload and recovery bars say so rather than pass.
    assert bars["4_payload_decode_jpeg90"]["pass"] is not True and bars["3_recovery_match"]["pass"] is not True
    # ... while the key-less attack needs no payload: it re-synthesises every g2face face from public material
    keyless = doc["recovery"]["without_key"]
    assert keyless["faces"] == doc["recovery"]["faces"] > 0 and keyless["attacked"] == keyless["faces"]
    assert 0 <= keyless["share_matching_original"] <= 1 and keyless["identity_distance"]["mean"] > 0
    assert doc["model"]["artifact_sha256"] and doc["data"]["samples"] == 12 and doc["timing"]["seconds_per_image"] > 0
    text = (evaluated["tmp"] / "eval.json").read_text()
    for key in read_tar(DEMO_SHARDS[0]):
        assert key not in text, "sample keys hold names and must not reach eval.json"
    assert "evaluation.key" not in text


def test_progress_names_each_method_and_shard_as_it_finishes(evaluated):
    """A full evaluation runs for hours on a CPU: each finished shard of each run is reported, in run order."""
    done = [line for line in evaluated["lines"] if " done " in line]
    shards = [Path(r).name for r in (DEMO_SHARDS[0], "copies-000000.tar")]
    assert [line.split()[1:3] for line in done] == [[m, "done"] for m in ("g2face", "blur") for _ in shards]
    for method in ("g2face", "blur"):
        assert sorted(line.split()[3].rstrip(":") for line in done if line.split()[1] == method) == sorted(shards)
    assert all(line.startswith("evaluate: ") and line.endswith(" min)") for line in done)
    running = [i for i, line in enumerate(evaluated["lines"]) if line.startswith("evaluate: running ")]
    assert len(running) == 2 and running[0] < evaluated["lines"].index(done[0]) < running[1]


def test_a_killed_evaluation_resumes_in_its_work_dir_with_the_same_options(evaluated, tmp_path, artifact):
    """Hours on a CPU: an evaluation killed in --work-dir picks up there, keeping its finished shards, and gives
    the numbers a whole run gives; other options than it started with are refused, naming them."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(evaluated["tmp"] / "work", work)
    # killed during the baseline: one of its shards had not finished, and run.json was not written yet
    (work / "blur" / "run.json").unlink()
    (work / "blur" / "done" / "copies-000000.tar.json").unlink()
    kept = (work / "g2face" / "shards" / f"{DEMO_SHARDS[0].name}").stat().st_mtime_ns
    shards = [str(DEMO_SHARDS[0]), str(evaluated["tmp"] / "copies-000000.tar")]
    lines: list[str] = []
    doc = evaluate(shards, str(evaluated["pairs"]), None, checkpoint=str(artifact), baselines=("blur",),
                   work_dir=str(work), torch_threads=1, echo=lines.append, draws=16)
    assert lines[0] == f"evaluate: resuming the evaluation in {work} (finished shards are kept)"
    assert [line.split()[1:4] for line in lines if " done " in line] == [["blur", "done", "copies-000000.tar:"]]
    assert (work / "g2face" / "shards" / f"{DEMO_SHARDS[0].name}").stat().st_mtime_ns == kept
    first = evaluated["doc"]
    assert doc["bars"] == first["bars"] and doc["privacy_rows"] == first["privacy_rows"]
    assert doc["utility"]["rows"] == first["utility"]["rows"]
    assert doc["timing"]["resumed"] is True and doc["timing"]["seconds_per_image"] is None
    assert first["timing"]["resumed"] is False
    with pytest.raises(EvaluateError, match=r"started with other draws, limit; resume it with the same options"):
        evaluate(shards, str(evaluated["pairs"]), None, checkpoint=str(artifact), baselines=("blur",),
                 work_dir=str(work), torch_threads=1, limit=3, draws=2, echo=lambda *_: None)


def test_cli_errors_name_the_fix(tmp_path, artifact):
    r = CliRunner().invoke(app, ["evaluate", "--data", str(DEMO_SHARDS[0]), "--out", str(tmp_path / "e.json"),
                                 "--checkpoint", str(tmp_path / "missing.pt")])
    assert r.exit_code == 2 and "--checkpoint" in r.output and "missing.pt" in r.output
    r = CliRunner().invoke(app, ["evaluate", "--data", str(DEMO_SHARDS[0]), "--out", str(tmp_path / "e.json"),
                                 "--checkpoint", str(artifact), "--baselines", "mosaic"])
    assert r.exit_code == 2 and "blur,pixelate" in r.output
    r = CliRunner().invoke(app, ["evaluate", "--data", str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "e.json"),
                                 "--checkpoint", str(artifact)])
    assert r.exit_code == 2 and "--data" in r.output
    assert not (tmp_path / "e.json").exists()


def test_limit_takes_the_first_samples_and_the_cli_writes_the_json(tmp_path, artifact):
    out = tmp_path / "e.json"
    r = CliRunner().invoke(app, ["evaluate", "--data", str(DEMO_SHARDS[0]), "--out", str(out), "--checkpoint",
                                 str(artifact), "--limit", "2", "--baselines", ""])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["data"]["samples"] == 2 and doc["counts"]["g2face"]["images"] == 2
    assert doc["verification"]["computed"] is False and doc["bars"]["2_verification_tar"]["pass"] is None


@pytest.mark.shared_data
def test_val_slice_numbers_agree_with_an_independent_computation(shared_data, tmp_path, artifact):
    """CelebA val: the first 8 genuine and 8 impostor pairs of the shipped pairs file, on a slice of its images."""
    chosen, slice_tar = val_pairs_slice(shared_data / "val", tmp_path / "val-slice-000000.tar", 8)
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.DictWriter(f, ["key_a", "key_b", "same"])
        w.writeheader()
        w.writerows(chosen)
    doc = evaluate(str(slice_tar), str(pairs), str(tmp_path / "eval.json"), checkpoint=str(artifact), baselines=(),
                   work_dir=str(tmp_path / "work"), torch_threads=1, echo=lambda *_: None)
    _check_against_independent(doc, [tmp_path / "work" / "g2face"], pairs)
    _, audit_json = write_audit(str(tmp_path / "work" / "g2face"), pairs=str(pairs), examples=False)
    audit = json.loads(audit_json.read_text())
    assert [r["tar"] for r in doc["verification"]["rows"]] == [r["tar"] for r in audit["privacy"]["verification"]["rows"]]
    assert doc["privacy_rows"][0]["share_still_matching"] == audit["privacy"]["rows"][0]["share_still_matching"]


def test_model_card_states_exactly_the_evaluated_numbers(evaluated, artifact, tmp_path):
    """scripts/make_model_card.py: the bar table is evaluate's JSON (no number typed by hand), the card names
    the artifact's sha256, and the grid is three rows (original / anonymized / recovered) of all 12 portraits."""
    import hashlib
    import importlib.util
    import re

    from PIL import Image

    spec = importlib.util.spec_from_file_location("make_model_card", ROOT / "scripts" / "make_model_card.py")
    card_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(card_mod)
    eval_json = evaluated["tmp"] / "eval.json"
    runs = [[{"phase": "hiding_warmup", "total_steps": 1, "time": 30.0},  # a model trained over two runs
             {"phase": "train", "total_steps": 2, "time": 60.0}],
            [{"phase": "train", "total_steps": 3, "time": 90.0}]]
    for i, run in enumerate(runs):
        (tmp_path / f"stats{i}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in run))
    assert card_mod.main(["--artifact", str(artifact), "--eval", str(eval_json), "--hardware", "test",
                          "--stats", str(tmp_path / "stats0.jsonl"), "--stats", str(tmp_path / "stats1.jsonl"),
                          "--recipe", "weights.dissimilar_margin=0.8", "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / f"{artifact.stem}.md").read_text()
    assert "1 warm-up + 2 full-objective steps (last: step 3, 2.5 min)" in text  # time summed over the runs
    assert "Recipe: weights.dissimilar_margin=0.8" in text
    assert "payload reinforcement 12 steps, at most 6 grey levels" in text  # the pipeline setting bar 4 rests on
    # and the faces it would lose to MTCNN scaled back, which bar 5 rests on
    assert json.loads(eval_json.read_text())["payload"]["reinforcement"]["keep_detection"] is True
    assert "grey levels, scaled back on faces MTCNN would lose" in text
    assert "redraws up to 16 draws" in text  # and the redraws that bars 1 and 5 rest on
    from pipeline.payload import FORMAT_VERSIONS

    written = json.loads(eval_json.read_text())["payload"]["format_version"]  # the format bar 3 rests on
    assert written in FORMAT_VERSIONS and f"payload format {written};" in text
    assert "identity push 0.5 from draw 8" in text
    # the job default holds pushes; evaluate records it and the card says so
    assert json.loads(eval_json.read_text())["model"]["redraw"]["identity_push_hold"] is True
    assert "drawn on with weaker pushes, `identity_push_hold`" in text
    g2 = next(r for r in json.loads(eval_json.read_text())["privacy_rows"] if r["method"] == "g2face")
    split = {m["method"]: m for m in g2["by_method"]}
    assert sum(m["faces"] for m in split.values()) == g2["faces"] and "g2face" in split
    assert f"g2face {split['g2face']['still_matching']} of {split['g2face']['faces']}" in text  # bar 1 by method
    kept = json.loads(eval_json.read_text())["model"]["redraw"]["faces_by_kept_draw"]
    assert set(kept) <= {str(k) for k in range(16)} and sum(kept.values()) > 0
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() in text
    keyless = json.loads(eval_json.read_text())["recovery"]["without_key"]
    assert (f"restores a face matching the original for {card_mod._fmt(keyless['share_matching_original'])} of the "
            f"{keyless['attacked']} faces attacked") in text
    doc = json.loads(eval_json.read_text())
    rows = dict(re.findall(r"^\| (\d_[a-z0-9_]+) \| ([^|]+) \|", text, re.M))
    bars = {k: b for k, b in doc["bars"].items() if isinstance(b, dict)}
    assert set(rows) == set(bars)
    for name, b in bars.items():
        assert rows[name].strip() == card_mod._fmt(b["value"]), name
    missed = sorted(k for k, b in bars.items() if b["pass"] is False)
    assert f"{len(missed)} not yet" in text and all(k in text for k in missed)
    assert json.loads((tmp_path / f"{artifact.stem}.eval.json").read_text()) == doc  # what run.json reads bars from
    assert doc["model"]["artifact_sha256"] in text
    grid = np.asarray(Image.open(tmp_path / f"{artifact.stem}-grid.png"))
    assert grid.shape == (3 * 128, 12 * 128, 3)
    # an untrained model's payloads never open: the recovered row is left white, not filled with anything else
    assert (grid[256:] == 255).all()
    # The same artifact re-evaluated (--keep-training): the Training section is kept word for word, the numbers
    # are the new evaluation's; a card of another file is refused.
    sha = hashlib.sha256(artifact.read_bytes()).hexdigest()
    card = tmp_path / f"{artifact.stem}.md"
    kept = card_mod.kept_training(card, sha)
    assert kept[0] == "- Hardware and time: test." and "- Recipe: weights.dissimilar_margin=0.8" in kept
    again = json.loads(json.dumps(doc))
    again["bars"]["6_pixel_change"]["value"] = 99.5
    meta = {"config": json.loads(re.search(r"- Config: `(.*)`", text).group(1)),
            "artifact_sha256": doc["model"]["artifact_sha256"]}
    older = json.loads(json.dumps(doc))
    del older["payload"]["format_version"]  # an evaluation from before the field: said, not guessed
    text2 = card_mod.card_text(artifact, sha, meta, again, [], None, "grid.png", {"portraits": 12, "recovered": 0},
                               previous=older, training=kept, pipeline_change="the redraw check (a94552c)")
    assert (f"payload format not recorded (an evaluation from before the field) then, format {written} now"
            in text2)
    assert "What else changed, as stated by whoever made this card: the redraw check (a94552c):" in text2
    section = lambda t: t.split("## Training\n", 1)[1].split("\n## ", 1)[0]  # noqa: E731
    assert section(text2) == section(text)
    assert "| 6_pixel_change | 99.5 |" in text2 and "| 6_pixel_change | " + card_mod._fmt(doc["bars"]["6_pixel_change"]["value"]) + " | 99.5 |" in text2
    with pytest.raises(SystemExit, match="another file"):
        card_mod.kept_training(card, "0" * 64)
