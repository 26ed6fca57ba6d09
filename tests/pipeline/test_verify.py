"""The payload verification stage of `run`: what it records, the on_unverified policy, and the key check.

An untrained artifact hides nothing readable, so every reversible face fails verification here: these
tests check that such faces are never labelled reversible, and how each policy handles them. The round
trip with a trained hiding path is in test_recover.py.
"""
import pyarrow.parquet as pq
import pytest
import torch

from conftest import DEMO_SHARDS, job_tree
from pipeline.keys import create_master_key
from pipeline.recover import RecoveryError, recover_shard
from pipeline.runner import run_job
from pipeline.spec import JobSpecError, parse_spec

pytestmark = pytest.mark.timeout(300)
SHARD = DEMO_SHARDS[0]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """An untrained lite-128 artifact: a wiring fixture, never shipped."""
    from g2face.checkpoint import save_artifact
    from g2face.config import preset
    from g2face.model import G2Face

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("artifact") / "lite-random.pt"
    save_artifact(G2Face(preset("lite-128")), path)
    return path


def _job(tmp_path, artifact, **sections):
    key = tmp_path / "master.key"
    if not key.exists():
        create_master_key(key)
    an = {"method": "g2face", "checkpoint": str(artifact), **sections.pop("anonymizer", {})}
    return parse_spec(job_tree(tmp_path / "out", SHARD, anonymizer=an, keys={"master": str(key)},
                               metrics={"enabled": False}, **sections))


def _rows(tmp_path):
    return pq.read_table(tmp_path / "out" / "manifests" / f"{SHARD.name}.parquet").to_pylist()


def test_reversible_job_without_master_key_refuses_to_start(tmp_path, untrained):
    tree = job_tree(tmp_path / "out", SHARD, anonymizer={"method": "g2face", "checkpoint": str(untrained)})
    with pytest.raises(JobSpecError, match=r"keys.master.*g2face-pipe keys init"):
        run_job(parse_spec(tree), echo=lambda *_: None)
    assert not (tmp_path / "out" / "shards").exists()


def test_unverified_faces_are_reencoded_then_marked_irreversible(tmp_path, untrained):
    doc = run_job(_job(tmp_path, untrained, output={"image_format": "jpeg", "jpeg_quality": 90}), echo=lambda *_: None)
    rows = _rows(tmp_path)
    assert rows and all(r["status"] == "ok" and r["published"] for r in rows)
    for r in rows:
        assert r["image_format"] == "PNG" and r["payload_reencoded"] is True  # the lossless retry happened
        for f in r["faces"]:
            assert f["payload_mode"] == "irreversible"  # never labelled reversible: nothing verified
            assert f["payload_ok"] is False and f["payload_status"] in ("uncorrectable", "authentication_failed")
            assert 0.3 < f["payload_ber"] < 0.7  # exact raw BER against the hidden bits: chance for an untrained model
    n = sum(r["n_faces"] for r in rows)
    assert doc["counts"]["faces_by_payload"] == {"irreversible": n, "unverified": n}
    assert doc["payload"]["mode"] == "reversible" and len(doc["payload"]["artifact_sha256"]) == 64
    assert doc["payload"]["layout"]["capacity_bits"] == 3240 and doc["payload"]["layout"]["format_version"] == 5
    # nothing opens, so recovery refuses the shard with one message and writes nothing
    with pytest.raises(RecoveryError, match="no reversible face"):
        recover_shard(str(tmp_path / "out" / "shards" / SHARD.name), str(tmp_path / "master.key"), str(tmp_path / "rec"))
    assert not (tmp_path / "rec").exists()
    assert (tmp_path / "out" / "recovery-log.jsonl").read_text().count("\n") == 1  # the attempt is logged
    # the done marker records the layout version the shard was written in; a shard of another version (as an
    # older release wrote: versions 3 and 4) is never resumed into this run
    import json

    marker_path = tmp_path / "out" / "done" / f"{SHARD.name}.json"
    marker = json.loads(marker_path.read_text())
    assert marker["payload_format"] == 5
    for older in (3, 4):
        marker_path.write_text(json.dumps({**marker, "payload_format": older}))
        with pytest.raises(JobSpecError, match=rf"made with .*'payload_format': {older}.*would use .*'payload_format': 5"):
            run_job(_job(tmp_path, untrained, output={"image_format": "jpeg", "jpeg_quality": 90}), echo=lambda *_: None)


def test_withhold_policy_withholds_unverified_images(tmp_path, untrained):
    run_job(_job(tmp_path, untrained, anonymizer={"on_unverified": "withhold"}, output={"image_format": "png"}),
            echo=lambda *_: None)
    rows = _rows(tmp_path)
    assert rows and all(r["status"] == "withheld" and not r["published"] for r in rows)
    assert all("payload does not verify" in r["error"] and "on_unverified" in r["error"] for r in rows)
    assert all(f["payload_mode"] is None and f["payload_ok"] is False for r in rows for f in r["faces"])


def test_irreversible_policy_keeps_the_jpeg(tmp_path, untrained):
    run_job(_job(tmp_path, untrained, anonymizer={"on_unverified": "irreversible"},
                 output={"image_format": "jpeg", "jpeg_quality": 90}), echo=lambda *_: None)
    rows = _rows(tmp_path)
    assert all(r["image_format"] == "JPEG" and r["payload_reencoded"] is False for r in rows)
    assert all(f["payload_mode"] == "irreversible" for r in rows for f in r["faces"])


def test_recovery_reads_payloads_in_the_format_version_the_run_recorded():
    """Runs written in older payload formats stay recoverable: their run.json layout decides the version."""
    from types import SimpleNamespace

    from pipeline.payload import PayloadLayout
    from pipeline.verify import run_payload_job

    model = SimpleNamespace(payload_bits=4096, identity_dim=128, artifact_sha256="ab" * 32)
    for doc, version in (({"payload": {"layout": PayloadLayout(4096, 128, 1).describe()}}, 1),
                         ({"payload": {"layout": PayloadLayout(4096, 128, 2).describe()}}, 2),
                         ({"payload": {"layout": PayloadLayout(4096, 128, 3).describe()}}, 3),
                         ({"payload": {"layout": PayloadLayout(4096, 128, 4).describe()}}, 4),
                         ({"payload": {"layout": PayloadLayout(4096, 128).describe()}}, 5),
                         ({"payload": {"mode": "reversible"}}, 1)):  # runs from before layouts were recorded
        assert run_payload_job(doc, "ds", 3, model).layout == PayloadLayout(4096, 128, version)
    with pytest.raises(ValueError, match="records payloads of 3240 bits, but the model carries 4096"):
        run_payload_job({"payload": {"layout": PayloadLayout(3240, 128).describe()}}, "ds", 3, model)


def test_a_model_failure_during_verification_fails_those_samples_not_the_run(tmp_path, untrained, monkeypatch):
    """Fault injection (as an out-of-memory error would strike): nothing whose payload was not checked is
    published, each sample's row says why, and the shard still completes."""
    from pipeline import verify

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(verify, "extract_logits", out_of_memory)
    doc = run_job(_job(tmp_path, untrained, output={"image_format": "png"}), echo=lambda *_: None)
    rows = _rows(tmp_path)
    with_faces = [r for r in rows if r["n_faces"]]
    assert with_faces and all(r["status"] == "error" and not r["published"] for r in with_faces)
    assert all(r["error"] == "payload verification failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
               for r in with_faces)
    assert all(f["payload_mode"] is None for r in with_faces for f in r["faces"])
    assert doc["counts"]["status"]["error"] == len(with_faces) and (tmp_path / "out" / "done" / f"{SHARD.name}.json").exists()


def test_a_checkpoint_replaced_after_the_run_started_stops_the_workers(tmp_path, untrained):
    """run.json, the done markers and every payload name the model the driver loaded: a worker that finds
    another valid artifact at the same path must stop, not write shards of it."""
    import shutil

    from g2face.checkpoint import save_artifact
    from g2face.config import preset
    from g2face.model import G2Face
    from pipeline.models import WeightsError

    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_artifact(G2Face(preset("lite-128")), other)
    path = tmp_path / "model.pt"
    shutil.copy(untrained, path)

    def swap_when_shards_are_planned(line: str) -> None:
        if "shard(s):" in line:
            shutil.copy(other, path)

    with pytest.raises(WeightsError, match=rf"anonymizer.checkpoint {path} changed after the run started: this worker "
                                           r"loaded g2face:lite-128:\w{16}:reversible, the run started with g2face"):
        run_job(_job(tmp_path, path), echo=swap_when_shards_are_planned)
    assert not (tmp_path / "out" / "done").exists() or not any((tmp_path / "out" / "done").iterdir())
