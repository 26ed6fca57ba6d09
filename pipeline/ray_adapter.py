"""The one module that imports Ray: maps shard workers onto a Ray Data actor pool.

Pattern (measured in ray_facts.md): a dataset of shard URLs -> ``map_batches`` with one shard per
call on an ``ActorPoolStrategy`` of shard-worker actors. Each call writes its own output shard
atomically, so shards stay 1:1 with the input and a resumed run can skip finished ones.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterable

from .spec import JobSpec

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class _ShardActor:
    """Ray Data callable class: holds one ShardWorker for its lifetime."""

    def __init__(self, spec: JobSpec, pseudonym_key, key_id, fingerprint, torch_threads, device):
        from .shard_worker import ShardWorker

        self.worker = ShardWorker(spec, pseudonym_key, key_id, fingerprint, torch_threads, device)
        self.worker.setup()

    def __call__(self, batch: dict) -> dict:
        results = [json.dumps(self.worker.process_shard(str(url))) for url in batch["url"]]
        return {"result": results}


def fused_resources(spec: JobSpec) -> tuple[int, float, float]:
    """Actors, CPUs and GPUs of one fused shard worker.

    All stages of a shard run in one actor (the 1:1 shard pattern), so the actor asks for what its
    hungriest stage needs and the pool is as large as the largest stage's actor count.
    """
    stages = [spec.resources.decode, spec.resources.detect, spec.resources.anonymize, spec.resources.encode]
    return max(s.actors for s in stages), max(s.num_cpus for s in stages), max(s.num_gpus for s in stages)


def check_feasible(cpus: float, gpus: float, cluster: dict) -> None:
    """Refuse actor shapes that no node can host (Ray Data would wait for them forever)."""
    from .spec import JobSpecError

    have_cpu, have_gpu = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if cpus > have_cpu:
        raise JobSpecError(
            f"resources.<stage>.num_cpus asks {cpus} CPUs per shard worker but the Ray cluster has {have_cpu}; "
            "lower num_cpus (fractions such as 0.5 are allowed)"
        )
    if gpus > have_gpu:
        raise JobSpecError(
            f"resources.<stage>.num_gpus asks {gpus} GPUs per shard worker but the Ray cluster has {have_gpu}; "
            "set num_gpus: 0 on a CPU-only cluster"
        )


def ensure_ray(spec: JobSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
    if spec.runtime.address:
        ray.init(address=spec.runtime.address, **kwargs)
    else:
        # A local Ray stays on loopback: nothing of a single-machine run listens on external interfaces.
        ray.init(num_cpus=spec.runtime.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)


def run_shards(
    spec: JobSpec,
    urls: list[str],
    pseudonym_key: bytes | None,
    key_id: str | None,
    fingerprint: str,
    on_result: Callable[[dict], None],
) -> None:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ensure_ray(spec)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = spec.runtime.progress
    actors, cpus, gpus = fused_resources(spec)
    actors = min(actors, len(urls))
    check_feasible(cpus, gpus, ray.cluster_resources())
    if hasattr(ctx, "wait_for_min_actors_s"):
        ctx.wait_for_min_actors_s = 600  # fail instead of waiting forever for actors that cannot be placed
    # An actor that asked for no GPU must not use one (Ray leaves CUDA visible to such actors).
    device = "cpu" if gpus == 0 and spec.runtime.device == "auto" else None
    threads = spec.runtime.torch_threads or max(1, int(cpus))
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    ds = ds.map_batches(
        _ShardActor,
        fn_constructor_kwargs={
            "spec": spec,
            "pseudonym_key": pseudonym_key,
            "key_id": key_id,
            "fingerprint": fingerprint,
            "torch_threads": threads,
            "device": device,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    for row in _iter_rows(ds):
        on_result(json.loads(row["result"]))


def _iter_rows(ds) -> Iterable[dict]:
    yield from ds.iter_rows()
