"""Cluster operation against a real Ray head on loopback, started and stopped by the test itself."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import DEMO_SHARDS, ROOT, job_tree
from pipeline.ray_adapter import ResourcePlan, plan_resources
from pipeline.runner import run_job
from pipeline.spec import JobSpecError, parse_spec

VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on 127.0.0.1 with its own ports and temp dir; 1 logical GPU."""
    temp_dir = tempfile.mkdtemp(prefix="g2rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = {name: _free_port() for name in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                             "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "runtime-env-agent-port")}
    worker_lo = 20000 + (os.getpid() % 100) * 100  # below the ephemeral range the other ports come from
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host",
           "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "4", "--num-gpus", "1", "--temp-dir", temp_dir,
           "--disable-usage-stats", "--min-worker-port", str(worker_lo), "--max-worker-port", str(worker_lo + 99)]
    for name, port in ports.items():
        cmd += [f"--{name}", str(port)]
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    from pipeline.ray_adapter import jobs_client

    deadline = time.monotonic() + 90
    while True:
        try:
            jobs_client(address, timeout_s=2)
            break
        except ConnectionError:
            if time.monotonic() > deadline or head.poll() is not None:
                os.killpg(head.pid, signal.SIGKILL)
                pytest.fail(f"Ray head did not come up: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield address
    # Stop exactly what we started: the head's process group and every descendant (job drivers run in
    # sessions of their own); never `ray stop`, which kills every Ray process on the machine.
    started = _descendants(head.pid)
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    for _ in range(40):
        if not _processes_mentioning(temp_dir):
            break
        time.sleep(0.5)
    for pid in set(_processes_mentioning(temp_dir)) | {p for p in started if _alive(p)}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    log.close()
    survivors = [p for p in set(_processes_mentioning(temp_dir)) | set(started) if _alive(p)]
    assert not survivors, f"Ray processes of the test head survived: {survivors}"


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(420)
def test_submit_demo_job_runs_on_the_cluster_with_a_gpu_model_stage(ray_head, tmp_path):
    out = tmp_path / "out"
    res = _cli("submit", "jobs/demo.yaml", "--address", ray_head, "--wait", "--timeout", "300",
               "--set", f"output.dir={out}", "--set", "runtime.progress=false")
    assert res.returncode == 0, res.stdout + res.stderr
    sid = res.stdout.splitlines()[0]
    assert f"{sid}: SUCCEEDED" in res.stdout
    for shard in DEMO_SHARDS:
        rows = pq.read_table(out / "manifests" / f"{shard.name}.parquet").to_pylist()
        assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
        assert (out / "done" / f"{shard.name}.json").is_file()
    assert json.loads((out / "run.json").read_text())["counts"]["faces_anonymized"] == 12
    logs = _cli("logs", sid, "--address", ray_head)
    assert logs.returncode == 0 and "model stage: 1 actor(s) x 1.0 GPU" in logs.stdout, logs.stdout[-3000:]
    st = _cli("status", sid, "--address", ray_head)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout


@pytest.mark.timeout(300)
def test_failing_jobs_report_their_error_through_status(ray_head, tmp_path):
    t0 = time.monotonic()
    res = _cli("submit", "jobs/demo.yaml", "--address", ray_head, "--set", f"output.dir={tmp_path / 'out'}",
               "--set", "input.paths=/nonexistent/shards-*.tar")
    assert res.returncode == 0, res.stderr
    sid = res.stdout.splitlines()[0]
    from pipeline.ray_adapter import wait_for

    st = wait_for(ray_head, sid, timeout_s=120, poll_s=0.5)
    assert st["status"] == "FAILED"
    assert time.monotonic() - t0 < 90, "a missing input must fail fast"
    shown = _cli("status", sid, "--address", ray_head)
    assert shown.returncode == 1 and "input.paths" in shown.stdout and "matches no file" in shown.stdout

    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli("submit", "jobs/demo.yaml", "--address", ray_head, "--wait", "--timeout", "120",
               "--set", f"output.dir={blocker / 'out'}")
    assert res.returncode == 1 and "FAILED" in res.stdout and "not writable" in res.stdout


def test_unreachable_address_fails_within_seconds(tmp_path):
    t0 = time.monotonic()
    res = _cli("submit", "jobs/demo.yaml", "--address", f"http://127.0.0.1:{_free_port()}", "--set", f"output.dir={tmp_path}")
    assert res.returncode == 2 and "no Ray dashboard answers" in res.stderr
    assert time.monotonic() - t0 < 30
    res = _cli("status", "raysubmit_x", "--address", f"http://127.0.0.1:{_free_port()}")
    assert res.returncode == 2 and "no Ray dashboard answers" in res.stderr


def test_submit_refuses_relative_outputs_and_outside_inputs(tmp_path):
    res = _cli("submit", "jobs/demo.yaml", "--address", "http://127.0.0.1:1")
    assert res.returncode == 2 and "output.dir 'runs/demo' is relative" in res.stderr


def _spec(tmp_path, **resources):
    return parse_spec(job_tree(tmp_path, DEMO_SHARDS, resources=resources))


def test_resource_plan_splits_the_model_stage_only_when_there_are_gpus(tmp_path):
    cpu_only = plan_resources(_spec(tmp_path), {"CPU": 4.0}, n_shards=10)
    assert cpu_only == ResourcePlan(2, 0.5, 0.0, 0, 0.0, 0.0)
    gpu = plan_resources(_spec(tmp_path, anonymize={"actors": 2, "num_gpus": 0.5, "num_cpus": 1}), {"CPU": 8.0, "GPU": 1.0}, 10)
    assert (gpu.model_actors, gpu.model_gpus, gpu.model_cpus, gpu.shard_gpus) == (2, 0.5, 1, 0.0)
    auto = plan_resources(_spec(tmp_path), {"CPU": 8.0, "GPU": 2.0}, 10)
    assert auto.model_gpus == 1.0 and auto.model_actors == 1
    assert plan_resources(_spec(tmp_path), {"CPU": 8.0}, n_shards=1).shard_actors == 1


def test_resource_plans_no_node_can_host_are_refused(tmp_path):
    with pytest.raises(JobSpecError, match="num_cpus"):
        plan_resources(_spec(tmp_path, detect={"num_cpus": 8}), {"CPU": 2.0}, 4)
    with pytest.raises(JobSpecError, match="resources.anonymize.num_gpus"):
        plan_resources(_spec(tmp_path, anonymize={"num_gpus": 1}), {"CPU": 2.0}, 4)
    with pytest.raises(JobSpecError, match="resources.decode.num_gpus must be a number"):
        _spec(tmp_path, decode={"num_gpus": "auto"})


def test_fsspec_file_and_memory_urls(tmp_path):
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe("/g2test/in/demo-000000.tar", DEMO_SHARDS[0].read_bytes())
    tree = job_tree("memory:///g2test/out", "memory:///g2test/in/*.tar")
    run = run_job(parse_spec(tree), echo=lambda *_: None)
    assert run["counts"]["samples"] == 6 and mem.exists("/g2test/out/done/demo-000000.tar.json")
    assert mem.exists("/g2test/out/shards/demo-000000.tar") and mem.exists("/g2test/out/run.json")
    out = tmp_path / "out"
    run = run_job(parse_spec(job_tree(f"file://{out}", f"file://{DEMO_SHARDS[1]}")), echo=lambda *_: None)
    assert run["counts"]["samples"] == 6 and (out / "done" / f"{DEMO_SHARDS[1].name}.json").is_file()
    mem.rm("/g2test", recursive=True)
