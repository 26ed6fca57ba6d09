"""Crowd photos (../shared/data/wild): every detected face is anonymized or falls back, all accounted for."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import job_tree
from helpers import decode, read_tar
from pipeline.runner import run_job
from pipeline.spec import parse_spec

pytestmark = [pytest.mark.timeout(600), pytest.mark.shared_data, pytest.mark.slow]


def test_every_wild_face_is_anonymized_or_falls_back(tmp_path, shared_data, ray_local):
    shard = shared_data / "wild" / "wild-000000.tar"
    out = tmp_path / "out"
    tree = job_tree(out, shard, output={"image_format": "png"}, runtime={"executor": "ray", "progress": False},
                    resources={"detect": {"actors": 1, "num_cpus": 1, "batch_size": 8}})
    run = run_job(parse_spec(tree), echo=lambda *_: None)
    rows = pq.read_table(out / "manifests" / "wild-000000.tar.parquet").to_pylist()
    src = read_tar(shard)
    dst = read_tar(out / "shards" / "wild-000000.tar")
    assert len(rows) == len(src) == 39
    faces = [f for r in rows for f in r["faces"]]
    assert len(faces) > 500, "the group photos hold hundreds of MTCNN faces"
    assert run["counts"]["faces"] == len(faces) == sum(run["counts"]["faces_by_size"].values())
    for r in rows:
        assert r["status"] == "ok" and r["published"], r["error"]
        inp, outp = decode(src[r["key"]]["jpg"]), decode(dst[r["key"]]["png"])
        for f in r["faces"]:
            assert f["method"] in ("blur", "pixelate") and f["paste_box"] is not None
            assert (f["method"] == "pixelate") == (f["fallback_reason"] is not None)
            x1, y1, x2, y2 = (int(round(v)) for v in f["box"])
            region = np.abs(outp[max(y1, 0):y2, max(x1, 0):x2].astype(int) - inp[max(y1, 0):y2, max(x1, 0):x2].astype(int))
            assert region.size and region.mean() > 1.0, f"{r['key']} face {f['box']} unchanged"
    sizes = run["counts"]["faces_by_size"]
    assert sizes.get("tiny", 0) > sizes.get("large", 0), "crowds are mostly tiny faces"
    assert run["counts"]["fallback_reasons"].get("too_small", 0) == sizes.get("tiny", 0)
