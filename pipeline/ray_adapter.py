"""The one module that imports Ray: shard workers on a Ray Data actor pool, the GPU model pool, and the
Ray Jobs client behind ``submit`` / ``status`` / ``logs``.

Execution pattern (measured in ray_facts.md): a dataset of shard URLs -> ``map_batches`` with one shard
per call on an ``ActorPoolStrategy`` of shard-worker actors. Each call writes its own output shard
atomically, so shards stay 1:1 with the input and a resumed run skips finished ones. When the model
stage asks for GPUs it runs in its own pool of GPU actors that the (CPU) shard workers call with
batches of aligned faces; on a CPU-only cluster every stage runs fused in the shard worker.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .imaging import crops_uint8
from .spec import JobSpec, JobSpecError

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


# -- starting or joining Ray --------------------------------------------------------------------------------


def _cluster_address(spec: JobSpec) -> str | None:
    return spec.runtime.address or os.environ.get("RAY_ADDRESS") or None


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def ensure_ray(spec: JobSpec) -> None:
    """Join the cluster named by runtime.address (or RAY_ADDRESS, set inside a Ray job) or start a local Ray."""
    address = _cluster_address(spec)
    if (address is None or _is_loopback(address)) and "ray" not in sys.modules:
        # A single-machine Ray stays on loopback: without this Ray advertises the external interface even
        # for a 127.0.0.1 head, and a driver that does so cannot be called back by actors of a loopback head.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=spec.runtime.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)


# -- resource plan ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourcePlan:
    """How a job maps onto the cluster: shard workers (CPU stages), and the model stage fused or split out."""

    shard_actors: int
    shard_cpus: float
    shard_gpus: float
    model_actors: int  # 0: the model runs fused inside the shard workers
    model_cpus: float
    model_gpus: float


def plan_resources(spec: JobSpec, cluster: dict, n_shards: int) -> ResourcePlan:
    r = spec.resources
    model_gpus = r.anonymize.num_gpus
    if model_gpus in ("auto", None):
        model_gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    cpu_stages = [r.decode, r.detect, r.encode]
    if model_gpus > 0:
        # No more model actors than the cluster's GPUs can hold: an actor that cannot be placed waits forever.
        fits = int(cluster.get("GPU", 0) // model_gpus) if cluster.get("GPU", 0) >= model_gpus else 1
        plan = ResourcePlan(
            shard_actors=min(max(s.actors for s in cpu_stages), n_shards),
            shard_cpus=max(s.num_cpus for s in cpu_stages),
            shard_gpus=0.0,
            model_actors=max(1, min(r.anonymize.actors, fits)),
            model_cpus=r.anonymize.num_cpus,
            model_gpus=float(model_gpus),
        )
    else:
        # CPU-only: every stage fused in one actor, which asks for what its hungriest stage needs.
        stages = cpu_stages + [r.anonymize]
        plan = ResourcePlan(min(max(s.actors for s in stages), n_shards), max(s.num_cpus for s in stages), 0.0, 0, 0.0, 0.0)
    check_feasible(plan, cluster)
    return plan


def check_feasible(plan: ResourcePlan, cluster: dict) -> None:
    """Refuse actor shapes that no node can host (Ray Data would otherwise wait for them forever)."""
    have_cpu, have_gpu = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if plan.shard_cpus > have_cpu:
        raise JobSpecError(
            f"resources.<stage>.num_cpus asks {plan.shard_cpus} CPUs per shard worker but the Ray cluster has "
            f"{have_cpu}; lower num_cpus (fractions such as 0.5 are allowed)"
        )
    if plan.model_actors and plan.model_gpus > have_gpu:
        raise JobSpecError(
            f"resources.anonymize.num_gpus asks {plan.model_gpus} GPUs per model actor but the Ray cluster has "
            f"{have_gpu}; set it to 0 (or 'auto') on a CPU-only cluster"
        )
    if plan.model_actors and plan.model_cpus + plan.shard_cpus > have_cpu:
        raise JobSpecError(
            f"a model actor ({plan.model_cpus} CPUs) and a shard worker ({plan.shard_cpus} CPUs) do not fit in the "
            f"cluster's {have_cpu} CPUs; lower resources.anonymize.num_cpus or the other stages' num_cpus"
        )


# -- the GPU model pool -------------------------------------------------------------------------------------


class _ModelServer:
    """Holds one anonymizer on its device; called with uint8 crops so transfers stay small and exact."""

    def __init__(self, method: str, spec: JobSpec, expected_model_id: str | None = None):
        from .anonymizers import anonymizer_for
        from .shard_worker import check_model_id, resolve_device

        self.model = anonymizer_for(spec.anonymizer, method)
        if hasattr(self.model, "set_payload_mode") and method == "g2face":
            self.model.set_payload_mode(spec.anonymizer.payload)  # model ids name the payload mode
        check_model_id(spec.anonymizer, self.model.model_id, expected_model_id)
        self.device = torch.device(resolve_device(spec.runtime.device))
        self.model.setup(self.device)

    def _faces(self, crops: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(crops)).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)

    def identity_embeddings(self, crops: np.ndarray) -> np.ndarray:
        """Identity embeddings of the crops (reversible g2face); they go back to the calling shard worker
        only, which encrypts them into payloads (the key never comes here)."""
        with torch.inference_mode():
            return self.model.identity_embeddings(self._faces(crops)).float().cpu().numpy()

    def anonymize(self, crops: np.ndarray, seeds: list[int], payload_bits: np.ndarray | None = None,
                  identity: np.ndarray | None = None, identity_push: np.ndarray | None = None) -> np.ndarray:
        x = self._faces(crops)
        # g2face redraws only: per-face push strengths (pipeline.redraw); absent for the paper's plain draws
        push = {} if identity_push is None else {"identity_push": torch.from_numpy(np.array(identity_push))}
        with torch.inference_mode():
            if payload_bits is None:
                y = self.model.anonymize(x, seeds, **push)
            else:  # g2face: the caller's (encrypted) payload bits, and the embeddings it already has
                ident = None if identity is None else torch.from_numpy(np.array(identity)).to(self.device)
                y = self.model.anonymize(x, seeds, payload_bits=torch.from_numpy(np.array(payload_bits)), identity=ident,
                                         **push)
        return crops_uint8(y)

    def payload_margin_gradient(self, crops: np.ndarray, bits: np.ndarray, margin: float):
        """Payload reinforcement runs its extractor passes here, on the pool's device (bits: ciphertext + ECC)."""
        return self.model.payload_margin_gradient(np.array(crops), np.array(bits), margin)

    def device_name(self) -> str:
        return str(self.device)


class RemoteAnonymizer:
    """FaceAnonymizer interface over the model pool: the shard worker's AnonymizeStage calls it like a local one.

    Args:
        handles: Ray actor handles of ``_ModelServer`` actors.
        model_id: id of the model they hold.
        resolution: aligned crop side.
        offset: which actor this worker starts with, so that workers spread over the pool.
    """

    def __init__(self, handles: list, model_id: str, resolution: int, offset: int = 0):
        self.handles = handles
        self.model_id = model_id
        self.resolution = resolution
        self.calls = offset

    def setup(self, device: torch.device) -> None:
        pass

    @staticmethod
    def _crops(faces: torch.Tensor) -> np.ndarray:
        # Inputs came from uint8 crops, so this round trip through uint8 is exact.
        return faces.mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def _next(self):
        handle = self.handles[self.calls % len(self.handles)]
        self.calls += 1
        return handle

    def identity_embeddings(self, faces: torch.Tensor) -> torch.Tensor:
        import ray

        out = ray.get(self._next().identity_embeddings.remote(self._crops(faces)))
        return torch.from_numpy(np.array(out)).to(faces.device)

    def anonymize(self, faces: torch.Tensor, seeds: list[int], payload_bits: torch.Tensor | None = None,
                  identity: torch.Tensor | None = None, identity_push: torch.Tensor | None = None) -> torch.Tensor:
        import ray

        bits = None if payload_bits is None else payload_bits.to(torch.uint8).cpu().numpy()
        ident = None if identity is None else identity.float().cpu().numpy()
        push = None if identity_push is None else torch.as_tensor(identity_push).float().cpu().numpy()
        out = ray.get(self._next().anonymize.remote(self._crops(faces), list(seeds), bits, ident, push))
        return torch.from_numpy(np.array(out)).to(faces.device).permute(0, 3, 1, 2).float().div_(255.0)

    def payload_margin_gradient(self, crops: np.ndarray, bits: np.ndarray, margin: float):
        import ray

        grad, worst = ray.get(self._next().payload_margin_gradient.remote(crops, np.asarray(bits, np.uint8), margin))
        return np.array(grad), np.array(worst)


# -- running shards -----------------------------------------------------------------------------------------


class _ShardActor:
    """Ray Data callable class: holds one ShardWorker for its lifetime."""

    def __init__(self, spec: JobSpec, pseudonym_key, key_id, fingerprint, torch_threads, device, model_handles, model_id):
        from .shard_worker import ShardWorker

        remote = {}
        if model_handles:
            offset = os.getpid()
            remote[spec.anonymizer.method] = RemoteAnonymizer(model_handles, model_id, spec.anonymizer.resolution, offset)
        self.worker = ShardWorker(spec, pseudonym_key, key_id, fingerprint, torch_threads, device, remote,
                                  expected_model_id=model_id)
        self.worker.setup()

    def __call__(self, batch: dict) -> dict:
        results = [json.dumps(self.worker.process_shard(str(url))) for url in batch["url"]]
        return {"result": results}


def run_shards(
    spec: JobSpec,
    urls: list[str],
    pseudonym_key: bytes | None,
    key_id: str | None,
    fingerprint: str,
    model_id: str,
    on_result: Callable[[dict], None],
    echo: Callable[[str], None] = lambda *_: None,
) -> ResourcePlan:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ensure_ray(spec)
    plan = plan_resources(spec, ray.cluster_resources(), len(urls))
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = spec.runtime.progress
    if hasattr(ctx, "wait_for_min_actors_s"):
        ctx.wait_for_min_actors_s = 600  # fail instead of waiting forever for actors that cannot be placed
    handles = []
    if plan.model_actors:
        server = ray.remote(num_cpus=plan.model_cpus, num_gpus=plan.model_gpus)(_ModelServer)
        handles = [server.remote(spec.anonymizer.method, spec, model_id) for _ in range(plan.model_actors)]
        ready, pending = ray.wait([h.device_name.remote() for h in handles], num_returns=len(handles), timeout=600)
        if pending:
            for h in handles:
                ray.kill(h)
            raise RuntimeError(
                f"{len(pending)} of {len(handles)} model actor(s) could not start within 600 s; check "
                "resources.anonymize (num_gpus, num_cpus, actors) against the cluster"
            )
        devices = ray.get(ready)
        echo(f"model stage: {plan.model_actors} actor(s) x {plan.model_gpus} GPU on {', '.join(sorted(set(devices)))}")
    # A shard worker that asked for no GPU must not use one (Ray leaves CUDA visible to such actors).
    device = "cpu" if spec.runtime.device == "auto" else None
    threads = spec.runtime.torch_threads or max(1, int(plan.shard_cpus))
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
            "model_handles": handles,
            "model_id": model_id,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=plan.shard_actors),
        num_cpus=plan.shard_cpus,
        num_gpus=plan.shard_gpus,
    )
    try:
        for row in ds.iter_rows():
            on_result(json.loads(row["result"]))
    finally:
        for h in handles:
            ray.kill(h)
    return plan


# -- Ray Jobs: submit / status / logs -----------------------------------------------------------------------


def jobs_client(address: str, timeout_s: float = 10.0):
    """A JobSubmissionClient, or a clear error within ``timeout_s`` when the address does not answer."""
    import urllib.error
    import urllib.request

    from ray.job_submission import JobSubmissionClient

    url = address.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    try:
        urllib.request.urlopen(url + "/api/version", timeout=timeout_s).read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"no Ray dashboard answers at {address} ({reason}); check --address (http://HEAD:8265) and that the "
            "head is running (`ray start --head --dashboard-host 0.0.0.0`)"
        ) from None
    return JobSubmissionClient(url)


def submit(address: str, entrypoint: str, working_dir: str, metadata: dict, env_vars: dict) -> str:
    client = jobs_client(address)
    runtime_env = {"working_dir": working_dir, "env_vars": env_vars}
    return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata)


def job_status(address: str, submission_id: str) -> dict:
    client = jobs_client(address)
    try:
        info = client.get_job_info(submission_id)
    except RuntimeError as e:
        raise LookupError(f"no job {submission_id!r} on {address}: {e}") from None
    return {"submission_id": submission_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message or "", "entrypoint": info.entrypoint}


def job_logs(address: str, submission_id: str) -> str:
    return jobs_client(address).get_job_logs(submission_id)


def follow_logs(address: str, submission_id: str, write: Callable[[str], None]) -> None:
    import asyncio

    client = jobs_client(address)

    async def _tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            write(lines)

    asyncio.run(_tail())


def wait_for(address: str, submission_id: str, timeout_s: float, poll_s: float = 1.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        st = job_status(address, submission_id)
        if st["status"] in TERMINAL_STATES or time.monotonic() > deadline:
            return st
        time.sleep(poll_s)
