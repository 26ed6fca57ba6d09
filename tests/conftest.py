"""Shared fixtures: repo paths, a real local Ray on loopback (one per session), job builders."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
# Ray otherwise advertises the machine's external interface even when told 127.0.0.1; tests stay on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
DEMO_SHARDS = sorted((ROOT / "data" / "demo").glob("nasa-*.tar"))
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (use it with ``pytest.mark.usefixtures``): on this shared 2-core machine
    two OpenMP threads under load run the networks (MTCNN above all) 30-50x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray on 127.0.0.1 with 4 logical CPUs (2 on this machine would starve the read stage)."""
    import ray
    from ray.data import DataContext

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        _node_ip_address="127.0.0.1",
    )
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (a user's clone has no shared/); this test needs its corpora")
    return SHARED_DATA


def job_tree(out_dir: Path, paths, **sections) -> dict:
    """A minimal valid job as a dict; keyword arguments replace or extend whole sections."""
    tree = {
        "dataset": {"id": "test"},
        "input": {"format": "webdataset", "paths": [str(p) for p in paths] if isinstance(paths, list) else str(paths)},
        "output": {"dir": str(out_dir), "keys": "keep"},
        "anonymizer": {"method": "blur"},
        "runtime": {"executor": "local", "progress": False},
        "resources": {"detect": {"actors": 2, "num_cpus": 0.5, "batch_size": 4}},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(name), dict):
            tree[name] = {**tree[name], **value}
        else:
            tree[name] = value
    return tree
