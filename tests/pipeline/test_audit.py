"""`g2face-pipe audit`: numbers checked by an independent route, schemas, no leaked keys, and a real browser."""

import asyncio
import csv
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import DEMO_SHARDS, ROOT, job_tree
from helpers import decode, encode, read_tar, val_pairs_slice, write_tar
from g2face.identity import crop_to_chip_matrix, load_dlib_face_resnet
from pipeline import align
from pipeline.audit import coverage, far_threshold, psnr_ssim_mae, rank1, write_audit
from pipeline.cli import app
from pipeline.manifest import PRIVATE_SCHEMA, PUBLIC_SCHEMA
from pipeline.runner import run_job
from pipeline.spec import parse_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SECTIONS = ("coverage", "privacy", "utility", "recovery", "figures", "examples", "provenance")
QUIET = {"executor": "local", "progress": False, "torch_threads": 1}


# ---------------------------------------------------------------------------------------------------------
# A corpus with genuine pairs: each portrait of demo shard 0 plus a mirrored, rescaled, re-compressed copy.


def _copies_shard(path: Path) -> Path:
    members = []
    for key, fields in read_tar(DEMO_SHARDS[0]).items():
        img = decode(fields["jpg"])[:, ::-1]
        h, w = img.shape[:2]
        img = np.asarray(
            Image.fromarray(np.ascontiguousarray(img)).resize((int(w * 0.85), int(h * 0.85)), Image.BICUBIC)
        )
        members.append((f"{key}_copy.jpg", encode(img, "JPEG", quality=88)))
    return write_tar(path, members)


def _pairs_csv(path: Path) -> Path:
    people = list(read_tar(DEMO_SHARDS[0]))
    images = people + [p + "_copy" for p in people]
    rows = []
    for i, a in enumerate(images):
        for b in images[i + 1 :]:
            rows.append((a, b, int(a.removesuffix("_copy") == b.removesuffix("_copy"))))
    rows.append(("not_in_this_run", people[0], 0))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key_a", "key_b", "same"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    inputs = [DEMO_SHARDS[0], _copies_shard(tmp / "copies-000000.tar")]
    common = dict(output={"keys": "pseudonymize"}, keys={"create_demo_key": True}, runtime=QUIET)
    run_job(parse_spec(job_tree(tmp / "blur", inputs, **common)), echo=lambda *_: None)
    # A baseline so mild that identities survive: its TAR is far from 0, which makes the TAR check bite.
    run_job(parse_spec(job_tree(tmp / "mild", inputs, anonymizer={"blur_sigma": 0.02}, **common)), echo=lambda *_: None)
    pairs = _pairs_csv(tmp / "pairs.csv")
    html_path, json_path = write_audit(
        str(tmp / "blur"), str(tmp / "report" / "report.html"), pairs=str(pairs), baselines=[str(tmp / "mild")]
    )
    return {
        "tmp": tmp,
        "run": tmp / "blur",
        "mild": tmp / "mild",
        "pairs": pairs,
        "html": html_path,
        "doc": json.loads(json_path.read_text()),
    }


# ---------------------------------------------------------------------------------------------------------
# The independent route: the test's own reading of tars and manifests, one direct image -> chip warp with
# OpenCV (the audit cuts 256 px crops, then warps them to chips in torch), and threshold / TAR by an ROC sweep.


def _independent_faces(run: Path) -> list[dict]:
    net = load_dlib_face_resnet()
    spec = json.loads((run / "run.json").read_text())["spec"]
    res = spec["anonymizer"]["resolution"]
    to_chip = crop_to_chip_matrix(align.template(res))
    faces = []
    for item in json.loads((run / "run.json").read_text())["inputs"]:
        shard = item["shard"]
        inputs, outputs = read_tar(Path(item["url"])), read_tar(run / "shards" / shard)
        public = pq.read_table(run / "manifests" / f"{shard}.parquet").to_pylist()
        private = {r["index"]: r for r in pq.read_table(run / "private" / f"{shard}.parquet").to_pylist()}
        for row in public:
            if not row["published"]:
                continue
            p = private[row["index"]]
            orig = decode(next(v for k, v in inputs[p["original_key"]].items() if k in ("jpg", "png")))
            anon = decode(next(v for k, v in outputs[p["key"]].items() if k in ("jpg", "png")))
            for face, t in zip(row["faces"], p["transforms"]):
                t = np.asarray(t).reshape(2, 3)
                m = np.hstack([to_chip[:, :2] @ t[:, :2], (to_chip[:, :2] @ t[:, 2] + to_chip[:, 2])[:, None]])
                chips = np.stack(
                    [
                        cv2.warpAffine(im, m, (150, 150), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
                        for im in (orig, anon)
                    ]
                )
                with torch.inference_mode():
                    e = net(torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255.0).double().numpy()
                faces.append(
                    {
                        "key": p["original_key"],
                        "orig": e[0],
                        "anon": e[1],
                        "manifest_distance": face["metrics"]["identity_distance"] if face["metrics"] else None,
                    }
                )
    return faces


def _roc_tar(genuine: np.ndarray, impostor: np.ndarray, far: float) -> tuple[float, float]:
    """Sweep every candidate threshold; keep the largest whose impostor acceptance stays within far."""
    best = None
    for t in np.concatenate([np.sort(impostor), [np.inf]]):
        if np.mean(impostor < t) <= far:
            best = t
    return best, float(np.mean(genuine < best))


def _check_numbers_independently(doc: dict, runs: list[Path], pairs_path: Path) -> list[float]:
    """runs: the audited run, then its baselines in order. Returns the independently computed TARs."""
    dist = lambda x, y: float(np.linalg.norm(x - y))  # noqa: E731
    pairs = [(a, b, s == "1") for a, b, s in csv.reader(pairs_path.open()) if s != "same"]
    v = doc["privacy"]["verification"]
    assert v["computed"]
    tars = []
    for i, run in enumerate(runs):
        faces = _independent_faces(run)
        d = np.array([np.linalg.norm(f["orig"] - f["anon"]) for f in faces])
        manifest = np.array([f["manifest_distance"] for f in faces], np.float64)
        np.testing.assert_allclose(manifest, d, atol=0.03)  # two alignment routes, same recognizer
        row = doc["privacy"]["rows"][i]
        assert row["faces"] == len(faces)
        undecided = np.abs(d - 0.6) < 0.03
        assert abs(row["share_still_matching"] - np.mean(d < 0.6)) <= undecided.mean() + 1e-9

        by_key = {f["key"]: f for f in faces}
        used = [p for p in pairs if p[0] in by_key and p[1] in by_key]
        impostor = np.array([dist(by_key[a]["orig"], by_key[b]["orig"]) for a, b, s in used if not s])
        gen_orig = np.array([dist(by_key[a]["orig"], by_key[b]["orig"]) for a, b, s in used if s])
        gen_anon = np.array([dist(by_key[a]["orig"], by_key[b]["anon"]) for a, b, s in used if s])
        t, tar_orig = _roc_tar(gen_orig, impostor, 1e-3)
        _, tar_anon = _roc_tar(gen_anon, impostor, 1e-3)
        assert v["pairs_used"] == len(used) and v["threshold"] == pytest.approx(t, abs=0.03)
        checks = [(v["rows"][1 + i]["tar"], tar_anon, gen_anon)] + (
            [(v["rows"][0]["tar"], tar_orig, gen_orig)] if i == 0 else []
        )
        for got, want, gen in checks:
            near = np.mean(np.abs(gen - t) < 0.03)
            assert abs(got - want) <= near + 1e-9, (got, want)
        assert v["rows"][1 + i]["genuine_pairs"] == len(gen_anon) and v["rows"][0]["impostor_pairs"] == len(impostor)
        tars.append(tar_anon)
    return tars


def test_numbers_agree_with_an_independent_computation(audited):
    tar_blur, tar_mild = _check_numbers_independently(
        audited["doc"], [audited["run"], audited["mild"]], audited["pairs"]
    )
    assert tar_blur < 0.5 < tar_mild, "the check must see one run whose faces still verify and one whose faces do not"
    doc = audited["doc"]
    v = doc["privacy"]["verification"]
    assert v["pairs_skipped"] == 1  # the pair naming a key outside the run
    assert v["rows"][0]["tar"] > 0.8, "mirrored copies of a portrait verify as the same person"
    assert [r["label"] for r in v["rows"]] == [
        "Original (no anonymization)",
        "this run (blur-v1:sigma=0.08@128)",
        "baseline 1 (blur-v1:sigma=0.02@128)",
    ]
    assert [r["method"] for r in doc["utility"]["rows"]] == ["blur", "blur"]
    mild = doc["utility"]["rows"][1]
    assert mild["mtcnn_detection_rate"] > doc["utility"]["rows"][0]["mtcnn_detection_rate"]
    assert doc["coverage"]["images"] == doc["coverage"]["faces"] == 12


def test_coverage_counts_every_outcome_and_states_the_risky_share():
    def face(size, reason=None, method="blur", draw=None, share=None):
        return {"size_class": size, "fallback_reason": reason, "method": "pixelate" if reason else method,
                "draw": draw, "reinforce_share": share}

    rows = [
        {
            "shard": "a",
            "status": "ok",
            "published": True,
            "n_faces": 3,
            "faces": [face("large"), face("tiny", "too_small"), face("medium", "low_score")],
        },
        {"shard": "a", "status": "ok", "published": True, "n_faces": 2, "warnings": ["redraw failed, ..."],
         "faces": [face("large", method="g2face", draw=3, share=0.0), face("large", method="g2face", draw=0, share=1.0)]},
        {"shard": "a", "status": "no_face", "published": True, "n_faces": 0, "faces": []},
        {"shard": "b", "status": "withheld", "published": False, "n_faces": 1, "faces": [face("tiny", "too_small")]},
        {"shard": "b", "status": "error", "published": False, "n_faces": 0, "faces": []},
    ]
    c = coverage(rows)
    assert (c["images"], c["published"], c["faces"], c["anonymized"], c["fallback"]) == (5, 3, 6, 5, 2)
    assert (c["withheld"], c["errors"], c["no_face"]) == (1, 1, 1)
    assert c["by_method"] == {"blur": 1, "g2face": 2, "pixelate": 2}
    assert c["fallback_reasons"] == {"low_score": 1, "too_small": 2}
    assert (c["redrawn_faces"], c["samples_with_warnings"], c["reinforcement_scaled_faces"]) == (1, 1, 1)
    sizes = {x["size_class"]: x for x in c["by_size_class"]}
    assert sizes["tiny"] == {"size_class": "tiny", "faces": 2, "anonymized": 1, "fallback": 1}
    assert [s["withheld"] for s in c["by_shard"]] == [0, 1]
    risky = c["risky_faces"]
    assert (risky["tiny"], risky["low_score"], risky["total"], risky["share"]) == (2, 1, 3, 0.5)
    assert risky["statement"].startswith("3 of 6 detected faces (50.0%) are tiny")


def test_privacy_row_splits_still_matching_faces_by_the_method_that_made_them():
    """A g2face run's fallback faces (pixelated: too small or low score) are counted apart from the model's,
    from the manifests and, with metrics off, from the re-read embeddings."""
    from types import SimpleNamespace

    from pipeline.audit import Collected, FaceRecord
    from pipeline.privacy_metrics import privacy_row

    def face(method, distance, size="medium"):
        return {"method": method, "size_class": size, "metrics": {"identity_distance": distance}}

    rows = [{"published": True, "faces": [face("g2face", 0.5), face("g2face", 0.7), face("pixelate", 0.55, "tiny")]},
            {"published": True, "faces": [face("g2face", 0.8), face("pixelate", 0.65, "tiny")]},
            {"published": False, "faces": [face("g2face", 0.1)]}]  # withheld: nothing published to match
    row = privacy_row("run", SimpleNamespace(public=rows, method="g2face"), None)
    assert (row["faces"], row["still_matching"]) == (5, 2)
    assert row["by_method"] == [
        {"method": "g2face", "faces": 3, "still_matching": 1, "share_still_matching": 1 / 3},
        {"method": "pixelate", "faces": 2, "still_matching": 1, "share_still_matching": 0.5},
    ]
    assert {x["size_class"]: x["still_matching"] for x in row["by_size_class"]}["tiny"] == 1
    col = Collected()
    for i, (method, d) in enumerate([("g2face", 0.9), ("blur", 0.3)]):
        orig = np.zeros(128, np.float32)
        col.faces.append(FaceRecord("a", i, 0, None, 80.0, "medium", None, orig=orig, anon=orig + d / np.sqrt(128),
                                    method=method))
    unmeasured = [{"published": True, "faces": [{"method": "g2face", "size_class": "medium", "metrics": None}]}]
    row = privacy_row("run", SimpleNamespace(public=unmeasured, method="g2face"), col)
    assert row["distance_source"] == "recomputed"
    assert [(x["method"], x["still_matching"]) for x in row["by_method"]] == [("blur", 1), ("g2face", 0)]
    empty = privacy_row("run", SimpleNamespace(public=[], method="g2face"), None)
    assert empty["faces"] == 0 and empty["by_method"] == [] and empty["distance_source"] == "none"


def test_small_helpers_match_their_definitions():
    imp = np.arange(2000) / 1000.0  # FAR 1e-3 of 2000 impostors: 2 may pass
    t, far = far_threshold(imp)
    assert t == pytest.approx(0.002) and far == pytest.approx(1e-3)
    t, far = far_threshold(np.array([0.5, 0.7, 0.9]))  # too few impostors: none may pass
    assert t == 0.5 and far == 0.0
    g = np.eye(4)
    assert rank1(g, g + 0.1) == 1.0 and rank1(g, g[::-1].copy()) == 0.0
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-8, 9, a.shape), 0, 255).astype(np.uint8)
    q = psnr_ssim_mae(b, a)
    mse = np.mean((a.astype(float) - b) ** 2)
    assert q["psnr"] == pytest.approx(10 * np.log10(255**2 / mse)) and q["mae"] == pytest.approx(
        np.abs(a.astype(float) - b).mean() / 255
    )
    assert psnr_ssim_mae(a, a) == {"psnr": None, "ssim": pytest.approx(1.0), "mae": 0.0}
    assert 0 < q["ssim"] < 1


def test_audit_json_and_manifests_follow_the_schemas(audited):
    schema = json.loads((ROOT / "schemas" / "audit.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(audited["doc"], schema, cls=jsonschema.Draft202012Validator)
    keyless = audited["doc"]["privacy"]["keyless_resynthesis"]  # a blur run: nothing to re-synthesise
    assert keyless == {"computed": False, "reason": "a blur run has no recover pass to run without the key"}
    broken = json.loads(json.dumps(audited["doc"]))
    broken["privacy"]["rows"][0]["share_still_matching"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)

    doc = json.loads((ROOT / "schemas" / "manifest.schema.json").read_text())
    for kind, arrow in (("public", PUBLIC_SCHEMA), ("private", PRIVATE_SCHEMA)):
        row_schema = doc["row_json_schema"][kind]
        jsonschema.Draft202012Validator.check_schema(row_schema)
        files = sorted((audited["run"] / ("manifests" if kind == "public" else "private")).glob("*.parquet"))
        assert len(files) == 2
        for path in files:
            table = pq.read_table(path)
            assert table.schema.names == [f["name"] for f in doc[kind]]
            assert table.schema.equals(arrow, check_metadata=False)  # Arrow types equal (list child names aside)
            for row in table.to_pylist():
                jsonschema.validate(row, row_schema, cls=jsonschema.Draft202012Validator)
    row = pq.read_table(files[0]).to_pylist()[0]
    row["status"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(row, doc["row_json_schema"]["private"], cls=jsonschema.Draft202012Validator)


def test_report_has_every_section_and_never_an_original_key(audited):
    text = audited["html"].read_text()
    raw = (audited["html"].parent / "audit.json").read_text()
    for s in SECTIONS:
        assert f"id='{s}'" in text
    for key in read_tar(DEMO_SHARDS[0]):
        assert key not in text and key not in raw, "original keys hold names and must not reach the report"
    assert 'src="http' not in text and 'href="http' not in text, "the report must be self-contained"
    assert len(re.findall(r"data:image/png;base64,", text)) == len(audited["doc"]["figures"]) + 1  # + example grid
    assert "No payload in this run" in text and "FID:</b> not computed" in text
    assert "Recovery was not checked" in text
    # its example grid shows original faces: other users cannot read it; audit.json holds no image
    assert audited["html"].stat().st_mode & 0o777 == 0o600
    assert (audited["html"].parent / "audit.json").stat().st_mode & 0o777 == 0o644


def test_metrics_off_unreachable_inputs_and_no_examples_are_stated(audited, tmp_path):
    # A copy of the run whose inputs are gone: numbers that need the originals are not computed, and the report says so.
    moved = tmp_path / "moved"
    shutil.copytree(audited["run"], moved)
    run_doc = json.loads((moved / "run.json").read_text())
    for item in run_doc["inputs"]:
        item["url"] = str(tmp_path / "gone" / item["shard"])
    (moved / "run.json").write_text(json.dumps(run_doc))
    result = CliRunner().invoke(app, ["audit", str(moved), "--pairs", str(audited["pairs"]), "--no-examples"])
    assert result.exit_code == 0, result.output
    doc = json.loads((moved / "audit.json").read_text())
    assert not doc["inputs"]["reachable"] and len(doc["inputs"]["unreachable"]) == 2
    assert doc["privacy"]["rows"][0]["rank1"] is None and not doc["privacy"]["verification"]["computed"]
    assert "unreachable" in doc["privacy"]["verification"]["reason"]
    assert doc["privacy"]["rows"][0]["distance_source"] == "manifest", "the manifests still give the histogram"
    text = (moved / "report.html").read_text()
    assert "was not computed: the originals could not be re-read" in text
    assert "left out (--no-examples)" in text and len(re.findall("data:image/png", text)) == len(doc["figures"])
    assert (moved / "report.html").stat().st_mode & 0o777 == 0o644, "without examples it may be shared"

    # Metrics off: distances are recomputed from the re-read faces, and they agree with the measured ones.
    off = tmp_path / "off"
    run_job(parse_spec(job_tree(off, DEMO_SHARDS[0], metrics={"enabled": False}, runtime=QUIET)), echo=lambda *_: None)
    on_doc = audited["doc"]
    _, json_path = write_audit(str(off), examples=False)
    doc = json.loads(json_path.read_text())
    assert (
        doc["privacy"]["rows"][0]["distance_source"] == "recomputed"
        and doc["utility"]["rows"][0]["faces_measured"] == 0
    )
    assert doc["privacy"]["rows"][0]["faces"] == 6
    # the re-read faces keep the method that made them (FaceRecord.method), as the manifest route does
    assert [(m["method"], m["faces"]) for m in doc["privacy"]["rows"][0]["by_method"]] == [("blur", 6)]
    assert [m["faces"] for m in on_doc["privacy"]["rows"][0]["by_method"]] == [on_doc["privacy"]["rows"][0]["faces"]]
    assert (
        doc["privacy"]["rows"][0]["identity_distance"]["mean"] > 0.6
        and on_doc["privacy"]["rows"][0]["identity_distance"]["mean"] > 0.6
    )

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nx,y\n")
    result = CliRunner().invoke(
        app, ["audit", str(audited["run"]), "--pairs", str(bad), "--out", str(tmp_path / "r.html")]
    )
    assert result.exit_code == 2 and "key_a,key_b,same" in result.output
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "run.json" in result.output


def test_recovery_section_measures_recovered_faces(audited, tmp_path):
    run = audited["run"]
    rec = tmp_path / "recovered"
    (rec / "shards").mkdir(parents=True)
    dropped = None
    psnrs = []
    for item in json.loads((run / "run.json").read_text())["inputs"]:
        private = pq.read_table(run / "private" / f"{item['shard']}.parquet").to_pylist()
        inputs = read_tar(Path(item["url"]))
        members = []
        for p in private:
            if dropped is None:
                dropped = p["key"]  # one face that did not open
                continue
            orig = decode(inputs[p["original_key"]]["jpg"])
            stand_in = encode(orig, "JPEG", quality=80)  # a recovery that is close to, not equal to, the original
            members.append((f"{p['key']}.jpg", stand_in))
            t = np.asarray(p["transforms"][0]).reshape(2, 3) * 2.0
            a = cv2.warpAffine(
                decode(stand_in), t, (256, 256), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101
            )
            b = cv2.warpAffine(orig, t, (256, 256), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
            psnrs.append(10 * np.log10(255**2 / np.mean((a.astype(float) - b) ** 2)))
        write_tar(rec / "shards" / item["shard"], members)
    _, json_path = write_audit(str(run), str(tmp_path / "r" / "report.html"), recovery=str(rec), examples=False)
    r = json.loads(json_path.read_text())["recovery"]
    assert r["run"] and r["faces_expected"] == 12 and r["faces_recovered"] == 11
    assert r["decode_rate"] == pytest.approx(11 / 12)
    assert r["psnr"]["mean"] == pytest.approx(np.mean(psnrs), abs=0.3)
    assert 0.8 < r["ssim"]["mean"] < 1 and 0 < r["mae"]["mean"] < 0.05


@pytest.mark.shared_data
def test_val_slice_numbers_agree_with_an_independent_computation(shared_data, tmp_path):
    """CelebA val: the first 15 genuine and 15 impostor pairs of the shipped pairs file, on a slice of its images."""
    chosen, slice_tar = val_pairs_slice(shared_data / "val", tmp_path / "val-slice-000000.tar", 15)
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.DictWriter(f, ["key_a", "key_b", "same"])
        w.writeheader()
        w.writerows(chosen)
    run_job(parse_spec(job_tree(tmp_path / "run", slice_tar, runtime=QUIET)), echo=lambda *_: None)
    _, json_path = write_audit(str(tmp_path / "run"), pairs=str(pairs), examples=False)
    doc = json.loads(json_path.read_text())
    _check_numbers_independently(doc, [tmp_path / "run"], pairs)


# ---------------------------------------------------------------------------------------------------------
# Headless Chromium through the DevTools protocol: console messages, exceptions, layout and images.

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1200,900",
]
_CHECK_JS = """JSON.stringify({
  sections: [...document.querySelectorAll('section')].map(s => ({id: s.id, height: s.getBoundingClientRect().height,
    heading: (s.querySelector('h2') || {}).innerText || '', visible: getComputedStyle(s).display !== 'none'})),
  images: [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0})),
  height: document.documentElement.scrollHeight})"""


async def _cdp_session(url: str, profile: Path, screenshot: Path | None) -> dict:
    import aiohttp  # shipped with ray[default]

    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        ws_url = None
        deadline = time.monotonic() + 60
        while ws_url is None and time.monotonic() < deadline:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            ws_url = m.group(1) if m else None
        assert ws_url, "chromium did not open its DevTools endpoint"
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
            ids, events = iter(range(1, 10**6)), []

            async def call(method, params=None, session=None):
                mid = next(ids)
                msg = {"id": mid, "method": method, "params": params or {}}
                if session:
                    msg["sessionId"] = session
                await ws.send_str(json.dumps(msg))
                while True:
                    reply = json.loads((await asyncio.wait_for(ws.receive(), 60)).data)
                    if reply.get("id") == mid:
                        assert "error" not in reply, reply
                        return reply["result"]
                    events.append(reply)

            target = (await call("Target.createTarget", {"url": "about:blank"}))["targetId"]
            sid = (await call("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                await call(f"{domain}.enable", session=sid)
            await call("Page.navigate", {"url": url}, session=sid)
            while not any(e.get("method") == "Page.loadEventFired" for e in events):
                events.append(json.loads((await asyncio.wait_for(ws.receive(), 60)).data))
            await asyncio.sleep(0.5)  # late console messages
            state = json.loads(
                (await call("Runtime.evaluate", {"expression": _CHECK_JS, "returnByValue": True}, session=sid))[
                    "result"
                ]["value"]
            )
            if screenshot is not None:
                shot = await call(
                    "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=sid
                )
                import base64

                screenshot.write_bytes(base64.b64decode(shot["data"]))
            await call("Runtime.evaluate", {"expression": "1"}, session=sid)  # flush pending events
            problems = [
                e["params"]
                for e in events
                if e.get("method") in ("Runtime.exceptionThrown", "Runtime.consoleAPICalled")
            ]
            problems += [
                e["params"]["entry"]
                for e in events
                if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] in ("error", "warning")
            ]
            return {"state": state, "problems": problems}
    finally:
        proc.kill()
        await proc.wait()


def render_in_chromium(html_path: Path, profile: Path, screenshot: Path | None = None) -> dict:
    return asyncio.run(_cdp_session(html_path.resolve().as_uri(), profile, screenshot))


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian: apt-get install chromium); the report rendering test needs it",
)


@needs_chromium
def test_the_browser_check_catches_console_errors_and_broken_images(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><section id='x'><h2>X</h2></section><img alt='a' src='data:image/png;base64,AAAA'>"
        "<script>console.error('boom'); missingFunction();</script></body></html>"
    )
    got = render_in_chromium(bad, tmp_path / "profile")
    assert len(got["problems"]) >= 2, got["problems"]
    assert not got["state"]["images"][0]["ok"]


@needs_chromium
def test_report_renders_in_headless_chromium_with_every_section(audited, tmp_path):
    shot = audited["html"].parent / "report.png"
    got = render_in_chromium(audited["html"], tmp_path / "profile", shot)
    assert got["problems"] == [], got["problems"]
    sections = {s["id"]: s for s in got["state"]["sections"]}
    assert set(SECTIONS) <= set(sections)
    for name in SECTIONS:
        assert sections[name]["visible"] and sections[name]["height"] > 40 and sections[name]["heading"], sections[name]
    assert got["state"]["images"] and all(i["ok"] for i in got["state"]["images"]), got["state"]["images"]
    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"))
    assert img.shape[0] > 2000 and img.std() > 10, "a long, non-blank page"
