"""`prepare`: aligned training shards from the committed NASA portraits, resume, drop reasons, guards."""
from __future__ import annotations

import io
import json
import tarfile

import cv2
import numpy as np
import pytest
from conftest import DEMO_SHARDS, ROOT
from helpers import decode, encode, no_face_image, read_tar, write_tar

from pipeline.prepare import DROP_REASONS, load_prepare_spec, prepare, read_prepared
from pipeline.spec import JobSpecError


def job(out, paths, min_detect: int = 40, **prepare_opts) -> dict:
    return {
        "dataset": {"id": "nasa"},
        "input": {"format": "webdataset", "paths": [str(p) for p in paths]},
        "output": {"dir": str(out)},
        "detection": {"min_face_size": min_detect},  # 40 for portraits: a short MTCNN pyramid keeps tests fast
        "prepare": {"person_field": "json.person", **prepare_opts},
        # one thread: on a shared 2-core machine two OpenMP threads under load run MTCNN many times slower
        "runtime": {"progress": True, "torch_threads": 1},
    }


def read_plain(path) -> dict[str, dict]:
    """A prepared shard with tarfile + numpy only (PNG decoded by PIL through tests/helpers)."""
    out: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.rsplit(".", 1)
            data = tar.extractfile(m).read()
            if ext == "npz":
                with np.load(io.BytesIO(data), allow_pickle=False) as z:
                    out.setdefault(key, {}).update({k: z[k] for k in z.files})
            else:
                assert ext == "png" and data[:8] == b"\x89PNG\r\n\x1a\n"
                out.setdefault(key, {})["image"] = decode(data)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Both demo shards, prepared in two calls (first shard, then all): a resume with one shard done."""
    out = tmp_path_factory.mktemp("prepared")
    lines1, lines2 = [], []
    first = prepare(job(out, DEMO_SHARDS[:1]), echo=lines1.append)
    tar0 = (out / "shards" / DEMO_SHARDS[0].name).read_bytes()
    second = prepare(job(out, DEMO_SHARDS), echo=lines2.append)
    return out, first, second, lines1, lines2, tar0


def test_outputs_are_plain_tars_with_documented_fields(prepared):
    out, _, second, *_ = prepared
    assert second["complete"] and second["total"] == {"samples": 12, "kept": 12, "dropped": {}}
    keys = []
    for shard in DEMO_SHARDS:
        items = read_plain(out / "shards" / shard.name)
        src = read_tar(shard)
        assert sorted(items) == sorted(src)  # 1:1 with the input, every portrait kept
        for key, it in items.items():
            keys.append(key)
            assert it["image"].shape == (128, 128, 3) and it["image"].dtype == np.uint8
            assert it["geometry"].shape == (53,) and it["camera"].shape == (3,)
            assert it["landmarks68"].shape == it["fit_landmarks68"].shape == (68, 2)
            assert it["identity"].shape == (128,) and it["transform"].shape == (2, 3)
            assert int(it["resolution"]) == 128
            assert str(it["person"]) == json.loads(src[key]["json"])["person"]
            lm = it["landmarks68"]
            # an aligned crop: eyes near the template's (pipeline/align.py), the face inside the crop
            assert abs(lm[36:42, 0].mean() - 48.2) < 6 and abs(lm[36:42, 1].mean() - 60.0) < 6
            assert (lm > -5).all() and (lm < 133).all()
            assert 0 < float(it["fit_nme"]) <= 0.05
            err = np.linalg.norm(it["fit_landmarks68"] - lm, axis=-1).mean() / np.linalg.norm(lm[36] - lm[45])
            assert abs(err - float(it["fit_nme"])) < 1e-4  # fit_nme is the stored fit's error
            # the crop is the source warped by the stored transform
            img = decode(src[key]["jpg"])
            again = cv2.warpAffine(img, it["transform"], (128, 128), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT101)
            assert np.abs(again.astype(int) - it["image"].astype(int)).mean() < 3
    assert len(keys) == len(set(keys)) == 12


def test_resume_skips_finished_shards_without_duplicates(prepared):
    out, first, second, lines1, lines2, tar0 = prepared
    assert first["total"]["samples"] == 6 and first["complete"]
    assert "1 shard(s), 0 already done, 1 to run" in lines1[0]
    assert "2 shard(s), 1 already done, 1 to run" in lines2[0]
    assert second["this_run"]["shards"] == 1
    assert (out / "shards" / DEMO_SHARDS[0].name).read_bytes() == tar0  # not rewritten
    assert sorted(p.name for p in (out / "done").iterdir()) == sorted(s.name + ".json" for s in DEMO_SHARDS)
    report = json.loads((out / "report.json").read_text())
    assert report["total"]["kept"] == 12 and set(report["shards"]) == {s.name for s in DEMO_SHARDS}


def test_identity_descriptor_matches_dlib(prepared):
    """The stored descriptor (port, through the aligned crop) agrees with dlib C++ on dlib's own chip."""
    import dlib

    from g2face import landmarks

    out = prepared[0]
    rec = dlib.face_recognition_model_v1(str(landmarks.predictor_path().parent / "dlib_face_recognition_resnet_model_v1.dat"))
    src = read_tar(DEMO_SHARDS[0])
    items = read_plain(out / "shards" / DEMO_SHARDS[0].name)
    cos = []
    for key, it in items.items():
        img = decode(src[key]["jpg"])
        box = landmarks.detect_faces(img)[0]
        shape = landmarks._predictor()(img, dlib.rectangle(*[int(v) for v in box]))
        ref = np.asarray(rec.compute_face_descriptor(dlib.get_face_chip(img, shape, 150, 0.25)))
        cos.append(ref @ it["identity"] / np.linalg.norm(ref) / np.linalg.norm(it["identity"]))
    assert min(cos) > 0.98, cos  # measured 0.989-0.999 (the crop path resamples twice)


def test_report_and_markers_hold_counts_not_descriptors(prepared):
    """Descriptors live only in the shards: reports and markers hold counts and settings, no arrays."""

    def longest_list(node) -> int:
        if isinstance(node, dict):
            return max([longest_list(v) for v in node.values()] + [0])
        if isinstance(node, list):
            return max([len(node)] + [longest_list(v) for v in node])
        return 0

    out = prepared[0]
    for path in [out / "report.json", *(out / "done").iterdir()]:
        doc = json.loads(path.read_text())
        assert longest_list(doc) <= 3, path  # input paths, stage thresholds: never a 128-d vector
    marker = json.loads((out / "done" / (DEMO_SHARDS[0].name + ".json")).read_text())
    assert set(marker) == {"shard", "source", "fingerprint", "format", "counts", "seconds"}
    assert marker["counts"] == {"samples": 6, "kept": 6, "dropped": {}}


def test_drop_reasons_are_counted(tmp_path):
    portraits = read_tar(DEMO_SHARDS[0])
    big = decode(portraits[sorted(portraits)[0]]["jpg"])  # face box ~150 px
    tiny = cv2.resize(big, (big.shape[1] // 6, big.shape[0] // 6), interpolation=cv2.INTER_AREA)  # ~25 px
    shard = write_tar(tmp_path / "mixed-000000.tar", [
        ("a_ok.jpg", encode(big)),
        ("b_landscape.jpg", encode(no_face_image())),
        ("c_tiny.png", encode(np.pad(tiny, ((60, 60), (60, 60), (0, 0)), mode="edge"), "PNG")),
        ("d_corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),
    ])
    lines = []
    rep = prepare(job(tmp_path / "out", [shard], min_detect=16, min_face_size=40, identity=False), echo=lines.append)
    assert rep["total"] == {"samples": 4, "kept": 1, "dropped": {"unreadable": 1, "no_face": 1, "too_small": 1}}
    assert "1 faces kept, dropped: unreadable 1, no_face 1, too_small 1" in "\n".join(lines)
    assert list(read_plain(tmp_path / "out" / "shards" / "mixed-000000.tar")) == ["a_ok"]
    # the last two reasons, forced by impossible bounds on the portraits
    rep = prepare(job(tmp_path / "o2", DEMO_SHARDS[:1], max_landmark_offset=0.001, identity=False), echo=lambda s: None)
    assert rep["total"]["dropped"] == {"dlib_disagrees": 6} and rep["total"]["kept"] == 0
    rep = prepare(job(tmp_path / "o3", DEMO_SHARDS[:1], max_fit_nme=0.001, identity=False), echo=lambda s: None)
    assert rep["total"]["dropped"] == {"fit_nme": 6}
    assert set(DROP_REASONS) >= {"unreadable", "no_face", "too_small", "dlib_no_face", "dlib_disagrees", "fit_nme"}


def test_killed_run_leftovers_are_redone(tmp_path):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    name = DEMO_SHARDS[1].name
    (out / "shards" / name).write_bytes(b"half-written by a killed run")  # no done marker
    (out / "shards" / f".{name}.abc.tmp").write_bytes(b"temp file of a killed run")
    rep = prepare(job(out, DEMO_SHARDS[1:], identity=False), echo=lambda s: None)
    assert rep["total"]["kept"] == 6
    assert len(read_prepared(out / "shards" / name)) == 6
    assert not list((out / "shards").glob(".*.tmp"))


def test_max_shards_leaves_the_rest_pending(tmp_path):
    lines = []
    rep = prepare(job(tmp_path, DEMO_SHARDS, identity=False), max_shards=1, echo=lines.append)
    assert not rep["complete"] and list(rep["shards"]) == [DEMO_SHARDS[0].name]
    assert "total (1/2 shards): 6 images, 6 faces kept" in "\n".join(lines)
    rep = prepare(job(tmp_path, DEMO_SHARDS, identity=False), echo=lambda s: None)
    assert rep["complete"] and rep["this_run"]["shards"] == 1 and rep["total"]["kept"] == 12


def test_other_settings_into_same_output_are_refused(tmp_path):
    prepare(job(tmp_path, DEMO_SHARDS[:1], identity=False), echo=lambda s: None)
    assert "identity" not in read_prepared(tmp_path / "shards" / DEMO_SHARDS[0].name)[0]
    with pytest.raises(JobSpecError, match="prepared with other settings"):
        prepare(job(tmp_path, DEMO_SHARDS[:1], identity=False, max_fit_nme=0.04), echo=lambda s: None)


def test_guards_and_spec_errors(tmp_path):
    with pytest.raises(JobSpecError, match="inside the repository"):
        prepare(job(ROOT / "runs" / "prepared", DEMO_SHARDS), echo=lambda s: None)
    run_out = tmp_path / "anonymized"
    (run_out / "manifests").mkdir(parents=True)
    (run_out / "run.json").write_text("{}")
    with pytest.raises(JobSpecError, match="inside the `run` job output"):
        prepare(job(run_out / "train", DEMO_SHARDS), echo=lambda s: None)
    bad = job(tmp_path, DEMO_SHARDS)
    bad["prepare"]["max_fit_nmе"] = 0.1  # Cyrillic 'е': a typo'd key
    with pytest.raises(JobSpecError, match=r"prepare\.max_fit_nm.*unknown key \(did you mean 'max_fit_nme'\? .*PrepareSpec in pipeline/prepare\.py"):
        prepare(bad, echo=lambda s: None)
    with pytest.raises(JobSpecError, match="resolution"):
        prepare(job(tmp_path, DEMO_SHARDS, resolution=100), echo=lambda s: None)


def test_shipped_train_job_validates():
    spec = load_prepare_spec(ROOT / "jobs" / "prepare-train.yaml", ["output.dir=/tmp/elsewhere"])
    assert spec.prepare.resolution == 128 and spec.output.dir == "/tmp/elsewhere"
    assert spec.input.paths == "../shared/data/train/lfw-devtrain-*.tar"
