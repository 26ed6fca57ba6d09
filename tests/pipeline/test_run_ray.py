"""End to end on a real local Ray with real MTCNN on the committed public-domain demo portraits."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEMO_SHARDS, job_tree
from helpers import decode, read_tar
from pipeline.runner import run_job
from pipeline.spec import parse_spec

pytestmark = pytest.mark.timeout(300)


def _faces_changed_and_outside_untouched(inp: np.ndarray, out: np.ndarray, faces: list[dict]) -> None:
    assert inp.shape == out.shape
    touched = np.zeros(inp.shape[:2], bool)
    for f in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in f["box"])
        x1, y1 = max(x1, 0), max(y1, 0)
        region = np.abs(out[y1:y2, x1:x2].astype(int) - inp[y1:y2, x1:x2].astype(int))
        assert region.mean() > 8, f"face {f['box']} barely changed (mean abs diff {region.mean():.2f})"
        px0, py0, px1, py1 = f["paste_box"]
        touched[py0:py1, px0:px1] = True
    assert np.array_equal(inp[~touched], out[~touched]), "pixels outside the paste-back band changed"


def test_demo_corpus_on_ray_png(tmp_path, ray_local):
    out = tmp_path / "out"
    spec = parse_spec(job_tree(out, DEMO_SHARDS, output={"image_format": "png"}, runtime={"executor": "ray", "progress": False}))
    run = run_job(spec, echo=lambda *_: None)

    total = 0
    for shard in DEMO_SHARDS:
        src = read_tar(shard)
        dst = read_tar(out / "shards" / shard.name)
        rows = pq.read_table(out / "manifests" / f"{shard.name}.parquet").to_pylist()
        assert [r["key"] for r in rows] == list(src), "manifest rows must equal input samples, in order"
        assert set(dst) == set(src)
        for r in rows:
            assert r["status"] == "ok" and r["published"] and r["n_faces"] >= 1, r
            assert set(dst[r["key"]]) == {"png"}, "non-image fields are dropped unless allow-listed"
            _faces_changed_and_outside_untouched(decode(src[r["key"]]["jpg"]), decode(dst[r["key"]]["png"]), r["faces"])
            assert all(f["method"] == "blur" and f["size_class"] in ("medium", "large") for f in r["faces"])
        total += len(rows)
        assert (out / "done" / f"{shard.name}.json").is_file()
    assert run["counts"]["samples"] == total == 12
    assert run["counts"]["faces_anonymized"] >= 12
    assert json.loads((out / "run.json").read_text())["counts"] == run["counts"]


def test_rerun_skips_done_shards_and_is_byte_identical(tmp_path, ray_local):
    out = tmp_path / "out"
    tree = job_tree(out, DEMO_SHARDS[:1], runtime={"executor": "ray", "progress": False})
    run_job(parse_spec(tree), echo=lambda *_: None)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run_timings.json"}
    lines = []
    run_job(parse_spec(tree), echo=lines.append)
    assert any("0 to run, 1 already done" in line for line in lines)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run_timings.json"}
    assert after == files
    # a fresh output dir gives the same bytes: deterministic shards and manifests
    out2 = tmp_path / "out2"
    run_job(parse_spec(job_tree(out2, DEMO_SHARDS[:1], runtime={"executor": "ray", "progress": False})), echo=lambda *_: None)
    for sub in ("shards", "manifests", "private", "done"):
        for p in (out / sub).iterdir():
            assert (out2 / sub / p.name).read_bytes() == p.read_bytes(), f"{sub}/{p.name} differs between runs"


def test_changed_config_is_refused_on_a_used_output_dir(tmp_path):
    out = tmp_path / "out"
    run_job(parse_spec(job_tree(out, DEMO_SHARDS[:1])), echo=lambda *_: None)
    from pipeline.spec import JobSpecError

    with pytest.raises(JobSpecError, match="different job configuration"):
        run_job(parse_spec(job_tree(out, DEMO_SHARDS[:1], anonymizer={"method": "pixelate"})), echo=lambda *_: None)


def test_shards_of_another_model_or_payload_format_are_refused_on_resume(tmp_path):
    """The spec may name no checkpoint (the shipped model), and the shipped model and payload format change
    between versions: done markers record both, and a resume that would mix them under one run.json stops."""
    out = tmp_path / "out"
    tree = job_tree(out, DEMO_SHARDS[:1])
    run_job(parse_spec(tree), echo=lambda *_: None)
    marker_path = next((out / "done").glob("*.json"))
    marker = json.loads(marker_path.read_text())
    assert marker["model_id"].startswith("blur-v1") and marker["payload_format"] is None
    marker["model_id"] = "blur-v0:an-older-release"
    marker_path.write_text(json.dumps(marker))
    from pipeline.spec import JobSpecError

    with pytest.raises(JobSpecError, match=f"holds shard {marker['shard']} made with .*blur-v0.*model or the payload"):
        run_job(parse_spec(tree), echo=lambda *_: None)


def test_a_done_shard_is_resumed_from_its_fingerprint_of_before_weight_paths_left_it(tmp_path):
    """Done markers written while weight files' paths were hashed into the fingerprint still count as done
    (the model id checks the weights); any other fingerprint is refused."""
    from pipeline.runner import plan_shards
    from pipeline.spec import JobSpecError, fingerprint_fields, spec_fingerprint
    from pipeline.spec import _hash as fingerprint_hash

    out = tmp_path / "out"
    spec = parse_spec(job_tree(out, DEMO_SHARDS[:1], metrics={"recognizer_checkpoint": "/w/r50.pth",
                                                              "recognizer_sha256": "ab" * 32}))
    old = fingerprint_hash(fingerprint_fields(spec, weight_paths=True))
    assert old != spec_fingerprint(spec)
    marker = {"shard": DEMO_SHARDS[0].name, "fingerprint": old, "key_id": None, "model_id": "blur-v1:x",
              "payload_format": None}
    (out / "done").mkdir(parents=True)
    (out / "done" / f"{DEMO_SHARDS[0].name}.json").write_text(json.dumps(marker))
    assert [p.done for p in plan_shards(spec, spec_fingerprint(spec), None, "blur-v1:x", None)] == [True]
    marker["fingerprint"] = "0123456789abcdef"
    (out / "done" / f"{DEMO_SHARDS[0].name}.json").write_text(json.dumps(marker))
    with pytest.raises(JobSpecError, match="different job configuration"):
        plan_shards(spec, spec_fingerprint(spec), None, "blur-v1:x", None)


def _demo_as_parquet(path, struct_images: bool):
    src = read_tar(DEMO_SHARDS[0])
    keys = list(src)
    images = [src[k]["jpg"] for k in keys]
    col = pa.array([{"bytes": b, "path": f"{k}.jpg"} for k, b in zip(keys, images)]) if struct_images else pa.array(images, pa.binary())
    table = pa.table({"id": keys, "image": col, "person": [json.loads(src[k]["json"])["person"] for k in keys], "split": ["demo"] * len(keys)})
    pq.write_table(table, path)
    return keys, images


@pytest.mark.parametrize("struct_images", [False, True])
def test_parquet_input_on_ray(tmp_path, ray_local, struct_images):
    shard = tmp_path / "in" / "demo-000000.parquet"
    shard.parent.mkdir()
    keys, images = _demo_as_parquet(shard, struct_images)
    out = tmp_path / "out"
    tree = job_tree(
        out, shard,
        input={"format": "parquet", "paths": str(shard), "image_column": "image", "key_column": "id"},
        output={"image_format": "png", "metadata": {"fields": ["split"]}},
        runtime={"executor": "ray", "progress": False},
    )
    run_job(parse_spec(tree), echo=lambda *_: None)
    res = pq.read_table(out / "shards" / shard.name)
    assert res.column_names == ["id", "image", "split"], "person (a name) must be dropped, split allow-listed"
    rows = res.to_pylist()
    manifest = pq.read_table(out / "manifests" / f"{shard.name}.parquet").to_pylist()
    assert [r["id"] for r in rows] == keys == [m["key"] for m in manifest]
    for r, src, m in zip(rows, images, manifest):
        data = r["image"]["bytes"] if struct_images else r["image"]
        if struct_images:
            assert r["image"]["path"] is None, "source paths (often names) are not published"
        _faces_changed_and_outside_untouched(decode(src), decode(data), m["faces"])


def test_model_servers_check_the_model_they_load_against_the_drivers(tmp_path):
    """The GPU pool's model servers load their own copy: one that differs from what run.json records stops."""
    from pipeline.models import WeightsError
    from pipeline.ray_adapter import _ModelServer

    spec = parse_spec(job_tree(tmp_path / "out", DEMO_SHARDS[0]))
    expected = _ModelServer("blur", spec).model.model_id
    assert _ModelServer("blur", spec, expected).model.model_id == expected
    with pytest.raises(WeightsError, match=f"changed after the run started: this worker loaded {expected}, the run "
                                           "started with blur-v1:sigma=9"):
        _ModelServer("blur", spec, "blur-v1:sigma=9@128")
