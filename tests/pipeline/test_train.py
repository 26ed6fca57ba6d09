"""`g2face-pipe train`: the Ray Train job on the real local Ray, exact resume from a reported checkpoint, spec errors.

Data: the committed NASA portraits through the real `prepare` stage at 64 px; model: the tiny 64 px config of
tests/g2face/test_train_step.py given as model.overrides; priors: the real dlib port and geometry regressor.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import DEMO_SHARDS, ROOT
from helpers import prepare_small
from typer.testing import CliRunner

from g2face import training
from pipeline import align
from pipeline.cli import app
from pipeline.spec import JobSpecError
from pipeline.train import latest_ray_checkpoint, load_train_spec, model_config, parse_train_spec, shard_paths, train

sys.path.insert(0, str(ROOT / "tests" / "g2face"))
from test_train_step import TINY  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return str(prepare_small(DEMO_SHARDS[0], tmp_path_factory.mktemp("prepared64")) / "*.tar")


def job(shards, out, steps: int) -> dict:
    overrides = {k: v for k, v in TINY.to_dict().items() if k != "name"}
    return {"data": {"paths": shards}, "output": {"dir": str(out)},
            "model": {"config": "lite-128", "overrides": overrides},
            "run": {"batch_size": 2, "steps": steps, "seed": 3, "hiding_warmup_steps": 1, "checkpoint_every": 2,
                    "grid_every": 0, "grid_faces": 2},
            "train": {"steps_per_epoch": 1, "warmup_epochs": 2, "weights": {"r1_interval": 2},
                      "paste": {"photo_scale": [1.0, 1.5]}},
            "runtime": {"torch_threads": 1}}


def stats(out) -> list[dict]:
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("time", "steps_per_s")}


def uninterrupted(shards, out) -> list[dict]:
    """The same job's 3 steps through g2face.training in this process (what the standalone script runs)."""
    spec = parse_train_spec(job(shards, out, 3))
    r = TINY.resolution
    priors = training.build_priors(r, align.template(r), align.paste_mask(r))
    state = training.new_state(model_config(spec), training.train_config_from_dict(spec.train), spec.run.seed, "cpu")
    settings = training.RunSettings(batch_size=2, steps=3, seed=3, hiding_warmup_steps=1, checkpoint_every=2,
                                    grid_every=0, grid_faces=2)
    training.run_training(settings, state, training.read_faces(shard_paths(spec)), priors, out, echo=lambda s: None)
    return stats(out)


def test_ray_train_checkpoints_and_resumes_exactly(ray_local, tmp_path, shards):
    torch.set_num_threads(1)  # as the Ray worker (runtime.torch_threads): the same float reductions
    reference = uninterrupted(shards, tmp_path / "reference")
    assert [m["total_steps"] for m in reference] == [1, 2, 3]

    part = train(job(shards, tmp_path / "part", 2), echo=lambda s: None)
    assert (tmp_path / "part" / "warm_start" / "meta.json").is_file()
    ckpt = latest_ray_checkpoint(tmp_path / "part")
    assert part["steps"] == 2 and {"training.pt", "model.g2face", "meta.json"} <= {p.name for p in ckpt.iterdir()}
    with pytest.raises(JobSpecError, match="--resume"):
        train(job(shards, tmp_path / "part", 3), echo=lambda s: None)
    resumed = train(job(shards, tmp_path / "part", 3), resume=True, echo=lambda s: None)
    assert resumed["steps"] == 3
    again = stats(tmp_path / "part")
    assert [without_timing(m) for m in again] == [without_timing(m) for m in reference]


@pytest.mark.timeout(600)
def test_two_workers_train_data_parallel_in_step(ray_local, tmp_path, shards):
    """scaling.workers=2 (gloo on CPU): each rank takes its own faces, gradients are averaged, and the two
    replicas stay bit-identical (checked at every checkpoint; a spread stops the run); rank 0 alone writes."""
    tree = job(shards, tmp_path / "dp", 2)
    tree["scaling"] = {"workers": 2, "cpus_per_worker": 0.5}
    tree["run"]["batch_size"] = 1
    result = train(tree, echo=lambda s: None)
    assert result["steps"] == 2
    assert result["metrics"]["replica_spread"] == 0
    assert [m["total_steps"] for m in stats(tmp_path / "dp")] == [1, 2]  # one line per step, not per rank
    assert latest_ray_checkpoint(tmp_path / "dp") is not None


def test_spec_errors_name_the_field(tmp_path, shards):
    with pytest.raises(JobSpecError, match=r"run\.batch_size"):
        parse_train_spec({**job(shards, tmp_path, 2), "run": {"batch_size": 0, "steps": 2}})
    with pytest.raises(JobSpecError, match=r"run\.steps / run\.minutes"):
        parse_train_spec({**job(shards, tmp_path, 2), "run": {"batch_size": 2}})
    with pytest.raises(JobSpecError, match=r"scaling\.gpus: unknown key"):
        parse_train_spec({**job(shards, tmp_path, 2), "scaling": {"gpus": 1}})
    with pytest.raises(JobSpecError, match=r"run\.step: unknown key \(did you mean 'steps'\?.*TrainSpec"):
        parse_train_spec({**job(shards, tmp_path, 2), "run": {"batch_size": 2, "steps": 2, "step": 2}})
    with pytest.raises(JobSpecError, match=r"train\.weights.*'r2'"):
        parse_train_spec({**job(shards, tmp_path, 2), "train": {"weights": {"r2": 1}}})
    with pytest.raises(JobSpecError, match=r"train\.weights: unknown setting\(s\) \['wrong_keys'\]; did you mean 'wrong_key'"):
        parse_train_spec({**job(shards, tmp_path, 2), "train": {"weights": {"wrong_keys": 5}}})
    with pytest.raises(JobSpecError, match="resolution"):
        parse_train_spec({**job(shards, tmp_path, 2), "model": {"overrides": {"resolution": 65}}})
    spec = load_train_spec(ROOT / "jobs" / "train-lite.yaml", ["run.minutes=5", "scaling.workers=2"])
    assert spec.run.minutes == 5 and spec.scaling.workers == 2 and spec.model.config == "lite-128"


def test_cli_reports_spec_errors(tmp_path):
    result = CliRunner().invoke(app, ["train", str(ROOT / "jobs" / "train-lite.yaml"), "--set", "run.seed=-1"])
    assert result.exit_code == 2 and "run.seed" in result.output
