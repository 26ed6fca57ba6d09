"""A killed run, re-run, yields exactly the shards and manifests of an uninterrupted run."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import DEMO_SHARDS, ROOT, job_tree

pytestmark = pytest.mark.timeout(420)
N_SHARDS = 6


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "run_timings.json"}


def _run(job, check=True):
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(job)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=check)


def test_kill_midway_then_resume_equals_uninterrupted(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(N_SHARDS):  # six shards so that a kill lands between shards
        shutil.copy(DEMO_SHARDS[i % 2], inp / f"demo-{i:06d}.tar")
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_tree(out, f"{inp}/demo-*.tar", output={"image_format": "png"})))

    _run(job)
    reference = _files(out)
    assert sum(1 for p in reference if p.parts[0] == "done") == N_SHARDS
    shutil.rmtree(out)

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    done_dir = out / "done"
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 1:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(done_dir.glob("*.json")))
    assert 1 <= finished < N_SHARDS, f"the kill should land midway ({finished} of {N_SHARDS} shards done)"
    assert not (out / "run.json").exists()

    res = _run(job)
    assert f"{N_SHARDS - finished} to run, {finished} already done" in res.stdout
    assert _files(out) == reference
    assert not list(out.rglob("*.tmp")), "temp files of the killed run must be cleaned up"


def test_done_markers_name_the_device_and_a_run_on_mixed_devices_says_so(tmp_path):
    import json

    from pipeline.runner import run_job
    from pipeline.spec import parse_spec

    out = tmp_path / "out"
    spec = parse_spec(job_tree(out, DEMO_SHARDS, runtime={"executor": "local", "progress": False, "device": "cpu"}))
    run_job(spec, echo=lambda *_: None)
    markers = sorted((out / "done").glob("*.json"))
    assert [json.loads(m.read_text())["device"] for m in markers] == ["cpu", "cpu"]
    assert json.loads((out / "run.json").read_text())["devices"] == ["cpu"]
    # one shard as if an earlier attempt had run it on a GPU: the resumed run keeps it and says so
    doc = json.loads(markers[0].read_text())
    markers[0].write_text(json.dumps({**doc, "device": "cuda: NVIDIA H100 80GB HBM3"}))
    lines = []
    run_job(spec, echo=lines.append)
    assert any("processed on different devices (cpu, cuda: NVIDIA H100 80GB HBM3)" in str(x) for x in lines), lines
    assert json.loads((out / "run.json").read_text())["devices"] == ["cpu", "cuda: NVIDIA H100 80GB HBM3"]
