"""Bad samples and bad shards complete the job and are accounted for in the manifests."""
import json

import pyarrow.parquet as pq
import pytest

from conftest import DEMO_SHARDS, job_tree
from helpers import encode, no_face_image, read_tar, write_tar
from pipeline.runner import run_job
from pipeline.spec import parse_spec

pytestmark = pytest.mark.timeout(300)


def _portrait() -> bytes:
    return read_tar(DEMO_SHARDS[0])["nasa_Christina_Koch"]["jpg"]


def _bad_shard(path):
    good = _portrait()
    return write_tar(
        path,
        [
            ("s0_good.jpg", good),
            ("s1_corrupt.jpg", good[:200] + b"\x00garbage" * 50),
            ("s2_empty.jpg", b""),
            ("s3_noface.png", encode(no_face_image(), "PNG")),
            ("s4_noimage.json", b'{"note": "no image member"}'),
            ("s5_good.jpg", good),
        ],
    )


def test_bad_samples_are_recorded_not_dropped(tmp_path):
    shard = _bad_shard(tmp_path / "bad-000000.tar")
    out = tmp_path / "out"
    lines = []
    run = run_job(parse_spec(job_tree(out, shard, output={"image_format": "keep"})), echo=lines.append)
    rows = {r["key"]: r for r in pq.read_table(out / "manifests" / "bad-000000.tar.parquet").to_pylist()}
    assert list(rows) == ["s0_good", "s1_corrupt", "s2_empty", "s3_noface", "s4_noimage", "s5_good"]
    assert rows["s0_good"]["status"] == "ok" and rows["s5_good"]["status"] == "ok"
    assert rows["s1_corrupt"]["status"] == "error" and "cannot decode" in rows["s1_corrupt"]["error"]
    assert rows["s2_empty"]["status"] == "error" and "0 bytes" in rows["s2_empty"]["error"]
    assert rows["s3_noface"]["status"] == "no_face" and rows["s3_noface"]["published"]
    assert rows["s4_noimage"]["status"] == "error" and "no image field" in rows["s4_noimage"]["error"]
    published = read_tar(out / "shards" / "bad-000000.tar")
    assert set(published) == {"s0_good", "s3_noface", "s5_good"}
    assert set(published["s3_noface"]) == {"png"}
    assert run["counts"]["status"] == {"error": 3, "no_face": 1, "ok": 2}
    assert any("error 3" in line and "no_face 1" in line and "ok 2" in line for line in lines), lines
    private = pq.read_table(out / "private" / "bad-000000.tar.parquet").to_pylist()
    assert len(private) == 6 and private[0]["input_sha256"] and private[2]["input_sha256"] is None
    # original keys and transforms are the data controller's: other users cannot read the private manifest
    assert (out / "private" / "bad-000000.tar.parquet").stat().st_mode & 0o777 == 0o600
    assert (out / "manifests" / "bad-000000.tar.parquet").stat().st_mode & 0o777 == 0o644


def test_truncated_shard_completes_and_reports_the_tail(tmp_path):
    whole = _bad_shard(tmp_path / "whole.tar").read_bytes()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(whole[: len(whole) // 2 + 100])
    out = tmp_path / "out"
    run_job(parse_spec(job_tree(out, cut)), echo=lambda *_: None)
    rows = pq.read_table(out / "manifests" / "cut-000000.tar.parquet").to_pylist()
    assert rows[0]["status"] == "ok"
    assert rows[-1]["status"] == "error" and "shard unreadable after" in rows[-1]["error"]
    assert json.loads((out / "done" / "cut-000000.tar.json").read_text())["counts"]["samples"] == len(rows)


def test_policies_withhold_no_face_and_fallback(tmp_path):
    shard = _bad_shard(tmp_path / "bad-000000.tar")
    out = tmp_path / "out"
    tree = job_tree(out, shard, policy={"on_no_face": "withhold"}, anonymizer={"method": "blur", "min_size": 10_000, "fallback": "withhold"})
    run_job(parse_spec(tree), echo=lambda *_: None)
    rows = {r["key"]: r for r in pq.read_table(out / "manifests" / "bad-000000.tar.parquet").to_pylist()}
    assert rows["s0_good"]["status"] == "withheld" and "fallback" in rows["s0_good"]["error"]
    assert rows["s0_good"]["faces"][0]["fallback_reason"] == "too_small"
    assert rows["s3_noface"]["status"] == "no_face" and not rows["s3_noface"]["published"]
    assert read_tar(out / "shards" / "bad-000000.tar") == {}, "withheld samples must be absent from the shard"
    private = pq.read_table(out / "private" / "bad-000000.tar.parquet").to_pylist()
    assert [r["original_key"] for r in private][0] == "s0_good" and private[0]["status"] == "withheld"


def test_small_faces_get_the_fallback_method(tmp_path):
    out = tmp_path / "out"
    run_job(parse_spec(job_tree(out, DEMO_SHARDS[0], anonymizer={"method": "blur", "min_size": 10_000})), echo=lambda *_: None)
    rows = pq.read_table(out / "manifests" / f"{DEMO_SHARDS[0].name}.parquet").to_pylist()
    faces = [f for r in rows for f in r["faces"]]
    assert faces and all(f["method"] == "pixelate" and f["fallback_reason"] == "too_small" for f in faces)
    assert all(r["status"] == "ok" and r["published"] for r in rows)


def test_fail_policy_stops_the_job(tmp_path):
    from pipeline.stages import StageError

    shard = _bad_shard(tmp_path / "bad-000000.tar")
    with pytest.raises(StageError, match=r"^shard bad-000000.tar, sample 1: cannot decode.*'withhold' records"):
        run_job(parse_spec(job_tree(tmp_path / "out", shard, policy={"on_error": "fail"})), echo=lambda *_: None)
    assert not (tmp_path / "out" / "done" / "bad-000000.tar.json").exists()
    # the CLI says the same in one line, no traceback
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_tree(tmp_path / "out2", shard, policy={"on_error": "fail"})))
    res = CliRunner().invoke(app, ["run", str(job)])
    assert res.exit_code != 0 and "shard bad-000000.tar, sample 1: cannot decode" in res.output
    assert "Traceback" not in res.output


def test_unwritable_output_and_missing_input_fail_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="input.paths"):
        run_job(parse_spec(job_tree(tmp_path / "out", tmp_path / "nothing-*.tar")), echo=lambda *_: None)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="output.dir"):
        run_job(parse_spec(job_tree(blocker / "out", DEMO_SHARDS[0])), echo=lambda *_: None)


def test_public_errors_carry_no_names_or_addresses_and_rerun_identically(tmp_path):
    shard = write_tar(
        tmp_path / "names-000000.tar",
        [("Barack.Obama.json", b"{}"), ("Barack.Obama.txt", b"x"), ("junk.jpg", b"this is not an image at all"),
         ("tiny.png", encode(no_face_image(8, 8), "PNG"))],
    )
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        run_job(parse_spec(job_tree(out, shard)), echo=lambda *_: None)
        outs.append((out / "manifests" / "names-000000.tar.parquet").read_bytes())
    assert outs[0] == outs[1], "error texts must not contain run-dependent details (object addresses)"
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out0" / "manifests" / "names-000000.tar.parquet").to_pylist()}
    assert "obama" not in rows["Barack"]["error"].lower() and "no image field" in rows["Barack"]["error"]
    assert rows["junk"]["status"] == "error" and " at 0x" not in rows["junk"]["error"]
    assert rows["tiny"]["status"] == "no_face", "an image smaller than any detectable face has no face"


def test_wrong_parquet_column_is_a_job_error_before_anything_is_written(tmp_path):
    import pyarrow as pa

    from pipeline.spec import JobSpecError

    shard = tmp_path / "t-000000.parquet"
    pq.write_table(pa.table({"img": [b"x"], "id": ["a"]}), shard)
    tree = job_tree(tmp_path / "out", shard, input={"format": "parquet", "paths": str(shard), "image_column": "image"})
    with pytest.raises(JobSpecError, match=r"input.image_column 'image' is not a column of t-000000.parquet"):
        run_job(parse_spec(tree), echo=lambda *_: None)
    assert not (tmp_path / "out" / "done").exists()



def test_a_key_that_repeats_in_a_shard_is_recorded_once_published_and_once_an_error(tmp_path):
    """Outputs, manifests and payloads are bound to the key: the second sample under a key is not published,
    and not lost either: its manifest row says why."""
    good = _portrait()
    shard = write_tar(tmp_path / "dup-000000.tar", [("a.jpg", good), ("b.png", encode(no_face_image(), "PNG")),
                                                    ("a.jpg", good)])
    out = tmp_path / "out"
    run = run_job(parse_spec(job_tree(out, shard)), echo=lambda *_: None)
    rows = pq.read_table(out / "manifests" / "dup-000000.tar.parquet").to_pylist()
    assert [(r["index"], r["key"], r["status"]) for r in rows] == [(0, "a", "ok"), (1, "b", "no_face"), (2, "a", "error")]
    assert rows[2]["error"].startswith("duplicate key: sample 0 of this shard") and not rows[2]["published"]
    assert sorted(read_tar(out / "shards" / "dup-000000.tar")) == ["a", "b"]
    assert run["counts"]["status"] == {"error": 1, "no_face": 1, "ok": 1}
    # the audit's reader matches the published "a" with the first sample of the key, and skips the repeat
    from pipeline.audit import _read_samples

    spec = parse_spec(json.loads((out / "run.json").read_text())["spec"])
    inputs = _read_samples(spec, str(shard), output=False)
    assert sorted(inputs) == ["a", "b"] and inputs["a"].index == 0
    # recover's reader of an older run's output that published a repeated key keeps the first, never fails
    from pipeline.recover import _read_published

    old = write_tar(tmp_path / "old-000000.tar", [("a.png", b"first"), ("b.png", b"b"), ("a.png", b"second")])
    published = _read_published(spec, str(old))
    assert sorted(published) == ["a", "b"] and published["a"].fields["png"] == b"first"


def test_the_audit_reader_skips_rows_with_a_null_key_and_keeps_the_rest(tmp_path):
    import pyarrow as pa

    from pipeline.audit import _read_samples

    shard = tmp_path / "t-000000.parquet"
    pq.write_table(pa.table({"image": [_portrait(), _portrait()], "id": pa.array(["x", None])}), shard)
    spec = parse_spec(job_tree(tmp_path / "out", shard, input={"format": "parquet", "paths": str(shard),
                                                                "image_column": "image", "key_column": "id"}))
    assert list(_read_samples(spec, str(shard), output=False)) == ["x"]
    shard.write_bytes(b"PAR1 not parquet")
    with pytest.raises(OSError, match="shard unreadable"):
        _read_samples(spec, str(shard), output=False)


def test_an_unreadable_parquet_shard_leaves_no_output_of_an_earlier_attempt(tmp_path):
    """An attempt killed after writing its output shard, then a rerun that cannot read the input: the done
    shard's outputs must agree with its manifest (one error row, nothing published), not keep stale rows."""
    shard = tmp_path / "t-000000.parquet"
    shard.write_bytes(b"PAR1 this is not parquet PAR1")
    out = tmp_path / "out"
    stale = out / "shards" / "t-000000.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"rows of an earlier attempt")
    tree = job_tree(out, shard, input={"format": "parquet", "paths": str(shard), "image_column": "image"})
    run_job(parse_spec(tree), echo=lambda *_: None)
    (row,) = pq.read_table(out / "manifests" / "t-000000.parquet.parquet").to_pylist()
    assert row["status"] == "error" and "shard unreadable" in row["error"] and not row["published"]
    assert not stale.exists() and (out / "done" / "t-000000.parquet.json").exists()
