"""The g2face method in the pipeline: artifact loading, priors, determinism (random-weight test artifact)."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import DEMO_SHARDS, job_tree
from helpers import decode, read_tar
from pipeline.anonymizers import AnonymizerUnavailable, build_anonymizer
from pipeline.g2face_method import (G2FaceAnonymizer, G2FaceUnavailable, irreversible_bits, quality_record,
                                    shipped_evaluation_path)
from pipeline.runner import run_job
from pipeline.spec import AnonymizerSpec, parse_spec

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """An untrained lite-128 artifact: a test fixture for the wiring only, never shipped or used for real."""
    from g2face.checkpoint import save_artifact
    from g2face.config import preset
    from g2face.model import G2Face

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("artifact") / "lite-random.pt"
    save_artifact(G2Face(preset("lite-128")), path)
    return path


def test_g2face_job_runs_the_model_with_shipped_priors(tmp_path, artifact):
    out = tmp_path / "out"
    # 16 draws, not the default 32: this untrained model's faces go through every draw the job allows
    tree = job_tree(out, DEMO_SHARDS[0], anonymizer={"method": "g2face", "checkpoint": str(artifact),
                                                     "payload": "irreversible", "draws": 16},
                    output={"image_format": "png"})
    assert AnonymizerSpec().draws == 32  # the default
    run_job(parse_spec(tree), echo=lambda *_: None)
    rows = pq.read_table(out / "manifests" / f"{DEMO_SHARDS[0].name}.parquet").to_pylist()
    src, dst = read_tar(DEMO_SHARDS[0]), read_tar(out / "shards" / DEMO_SHARDS[0].name)
    assert all(r["status"] == "ok" for r in rows)
    quality = json.loads((out / "run.json").read_text())["payload"]["model_quality"]
    assert quality["evaluated"] is False and "g2face-pipe evaluate" in quality["note"]  # nobody measured it
    assert all(r["model_id"].startswith("g2face:lite-128:") and r["model_id"].endswith(":irreversible") for r in rows)
    for r in rows:
        a, b = decode(src[r["key"]]["jpg"]), decode(dst[r["key"]]["png"])
        assert all(f["method"] == "g2face" for f in r["faces"])
        assert all(f["payload_mode"] == "irreversible" and f["payload_ok"] is None for f in r["faces"])
        assert all(0 <= f["draw"] < 16 for f in r["faces"]) and r["warnings"] == []  # redraw ran
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5
    again = tmp_path / "again"
    run_job(parse_spec(job_tree(again, DEMO_SHARDS[0], anonymizer={"method": "g2face", "checkpoint": str(artifact),
                                                                   "payload": "irreversible", "draws": 16},
                                output={"image_format": "png"})), echo=lambda *_: None)
    assert (again / "shards" / DEMO_SHARDS[0].name).read_bytes() == (out / "shards" / DEMO_SHARDS[0].name).read_bytes()


def test_resolution_mismatch_and_bad_files_are_refused(tmp_path, artifact):
    with pytest.raises(AnonymizerUnavailable, match="anonymizer.resolution: 128"):
        build_anonymizer("g2face", 256, 0.08, 8, str(artifact))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AnonymizerUnavailable, match="anonymizer.checkpoint"):
        build_anonymizer("g2face", 128, 0.08, 8, str(bad))


def test_irreversible_payload_is_seeded_noise():
    a = irreversible_bits([1, 2], 4096)
    assert torch.equal(a, irreversible_bits([1, 2], 4096))
    assert not torch.equal(a[0], a[1])
    assert abs(a.mean().item() - 0.5) < 0.02


# an identity check no draw passes (distance 1.5 + margin): every face is drawn pushed from draw 1
PUSHING = {"draws": 3, "identity_push": 0.5, "identity_push_after": 1, "identity_guard_distance": 1.5,
           "identity_guard": "off"}


@pytest.mark.parametrize("settings", [{}, PUSHING], ids=["default", "pushed-draws"])
def test_reversible_g2face_in_the_model_pool_writes_what_a_local_model_writes(ray_local, tmp_path, artifact, settings):
    """The GPU model pool path (a Ray actor holding the model, here on the CPU): the shard worker sends crops,
    gets embeddings back, encrypts them itself (the key never reaches the pool) and sends the payload bits
    (and, for pushed redraws, the push strengths); the published bytes and manifests equal those of the
    in-process model."""
    import ray

    from pipeline.keys import create_master_key
    from pipeline.ray_adapter import RemoteAnonymizer, _ModelServer
    from pipeline.shard_worker import ShardWorker
    from pipeline.stages import AnonymizeStage
    from pipeline.spec import spec_fingerprint

    key_path = tmp_path / "master.key"
    create_master_key(key_path)

    def run(out, remote: bool) -> dict:
        spec = parse_spec(job_tree(out, DEMO_SHARDS[0],
                                   anonymizer={"method": "g2face", "checkpoint": str(artifact), **settings},
                                   keys={"master": str(key_path)}, output={"image_format": "png"},
                                   metrics={"enabled": False}))
        pool = {}
        if remote:
            server = ray.remote(_ModelServer).options(num_cpus=0.5).remote("g2face", spec)
            model_id = build_anonymizer("g2face", 128, 0.08, 8, str(artifact)).model_id  # as the runner does
            pool = {"g2face": RemoteAnonymizer([server], model_id, 128)}
        from pipeline.keys import load_master_key

        kid = load_master_key(key_path)[1]
        worker = ShardWorker(spec, None, kid, spec_fingerprint(spec), 1, "cpu", pool)
        worker.setup()
        anonymize = next(s for s in worker.stages if isinstance(s, AnonymizeStage))
        assert anonymize.image_format == "png"  # the draw checker knows which images are written in grey
        return worker.process_shard(str(DEMO_SHARDS[0]))

    run(tmp_path / "local", remote=False)
    run(tmp_path / "pool", remote=True)
    name = DEMO_SHARDS[0].name
    assert (tmp_path / "pool" / "shards" / name).read_bytes() == (tmp_path / "local" / "shards" / name).read_bytes()
    local = pq.read_table(tmp_path / "local" / "manifests" / f"{name}.parquet").to_pylist()
    pool = pq.read_table(tmp_path / "pool" / "manifests" / f"{name}.parquet").to_pylist()
    diff = {k for a, b in zip(local, pool) for k in a if a[k] != b[k]}
    assert not diff, [(a[k], b[k]) for a, b in zip(local, pool) for k in diff][:2]
    faces = [f for r in pool for f in r["faces"]]
    assert faces and all(f["payload_mode"] in ("reversible", "irreversible") for f in faces)
    assert all(f["payload_ber"] is not None for f in faces)  # verified against the bits actually hidden
    assert all(not r["warnings"] for r in pool)  # no redraw failed (it would fall back to first draws)
    if settings:
        assert any(f["identity_push"] for f in faces), [(f["draw"], f["identity_push"]) for f in faces]


def test_without_a_checkpoint_the_shipped_model_runs_and_is_pinned(tmp_path, artifact, monkeypatch):
    from g2face import checkpoint as ck

    model = G2FaceAnonymizer(None, 128)
    assert model.shipped and model.artifact_sha256 == ck.SHIPPED_SHA256 and model.checkpoint == str(ck.SHIPPED_ARTIFACT)
    # the file under the shipped name is checked, not trusted: other weights there stop the run
    other = tmp_path / "g2face-lite-128.pt"
    shutil.copyfile(artifact, other)
    monkeypatch.setattr(ck, "SHIPPED_ARTIFACT", other)
    with pytest.raises(G2FaceUnavailable, match="the shipped model .* is not the expected"):
        G2FaceAnonymizer(None, 128)
    monkeypatch.setattr(ck, "SHIPPED_ARTIFACT", tmp_path / "gone.pt")
    with pytest.raises(G2FaceUnavailable, match="missing from this installation"):
        G2FaceAnonymizer(None, 128)


def test_quality_record_of_the_shipped_model_is_its_evaluation():
    from g2face.checkpoint import SHIPPED_SHA256

    ev = json.loads(shipped_evaluation_path().read_text())
    assert ev["model"]["artifact_sha256"] == SHIPPED_SHA256  # the shipped evaluation is of the shipped model
    record = quality_record(SHIPPED_SHA256)
    bars = {k: b for k, b in ev["bars"].items() if isinstance(b, dict)}
    assert record["evaluated"] is True
    assert record["bars_met"] == sorted(k for k, b in bars.items() if b["pass"] is True)
    assert record["bars_not_yet_met"] == sorted(k for k, b in bars.items() if b["pass"] is False)
    assert set(record["bars_met"]) | set(record["bars_not_yet_met"]) | set(record["bars_not_measured"]) == set(bars)
    reinforcement = ev["payload"]["reinforcement"]
    redraw = ev["model"]["redraw"]
    assert record["evaluated_with"] == {"draws": redraw["draws"],  # the settings behind the figures
                                        "identity_push": redraw.get("identity_push", 0.0),
                                        "identity_push_after": redraw.get("identity_push_after"),
                                        "identity_push_hold": (bool(redraw.get("identity_push_hold"))
                                                               if redraw.get("identity_push", 0.0) > 0 else None),
                                        "payload_reinforce_steps": reinforcement["steps"],
                                        "payload_reinforce_max_change": reinforcement["max_change_grey_levels"],
                                        "payload_reinforce_keep_detection": (
                                            bool(reinforcement.get("keep_detection", False))
                                            if reinforcement["steps"] else None),
                                        "payload_format": ev["payload"].get("format_version")}
    card = (shipped_evaluation_path().parents[2] / record["card"]).read_text()
    assert SHIPPED_SHA256 in json.dumps(ev) and all(k in card for k in record["bars_not_yet_met"])


def test_quality_record_names_the_settings_its_evaluation_ran_at(tmp_path, monkeypatch):
    import pipeline.g2face_method as method

    bars = {"1_anonymization_port": {"pass": False}, "6_pixel_change": {"pass": True}}
    ev = {"model": {"artifact_sha256": "ab" * 32,
                    "redraw": {"draws": 5, "identity_push": 0.5, "identity_push_after": 3}}, "bars": bars,
          "payload": {"reinforcement": {"steps": 3, "max_change_grey_levels": 2}, "format_version": 5},
          "data": {"samples": 10}}
    path = tmp_path / "m.eval.json"
    path.write_text(json.dumps(ev))
    monkeypatch.setattr(method, "shipped_evaluation_path", lambda: path)
    record = quality_record("ab" * 32)
    assert record["evaluated_with"] == {"draws": 5, "identity_push": 0.5, "identity_push_after": 3,
                                        "identity_push_hold": False,  # evaluated before the field
                                        "payload_reinforce_steps": 3, "payload_reinforce_max_change": 2,
                                        "payload_reinforce_keep_detection": False,  # evaluated before the field
                                        "payload_format": 5}
    ev["payload"]["reinforcement"]["keep_detection"] = True
    path.write_text(json.dumps(ev))
    assert quality_record("ab" * 32)["evaluated_with"]["payload_reinforce_keep_detection"] is True
    assert (record["bars_met"], record["bars_not_yet_met"]) == (["6_pixel_change"], ["1_anonymization_port"])
    ev["model"]["redraw"]["identity_push_hold"] = True
    path.write_text(json.dumps(ev))
    assert quality_record("ab" * 32)["evaluated_with"]["identity_push_hold"] is True
    for k in ("redraw", "reinforcement", "format_version"):  # an evaluation from before these fields
        (ev["model"] if k == "redraw" else ev["payload"]).pop(k)
    path.write_text(json.dumps(ev))
    assert quality_record("ab" * 32)["evaluated_with"] == {"draws": 1, "identity_push": 0.0, "identity_push_after": None,
                                                           "identity_push_hold": None,
                                                           "payload_reinforce_steps": 0,
                                                           "payload_reinforce_max_change": None,
                                                           "payload_reinforce_keep_detection": None,
                                                           "payload_format": None}
    assert quality_record("cd" * 32)["evaluated"] is False  # another model: not evaluated
