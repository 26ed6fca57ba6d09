"""The training run (g2face/training.py): exact resume through checkpoints, warm-start files, logs, grids.

Data: the committed NASA portraits through the real `prepare` stage at 64 px (MTCNN, dlib, fit, identity).
Priors: the real dlib ResNet port and the shipped geometry regressor. Model: the tiny 64 px config of
test_train_step.py (every part of lite-128, narrower).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import DEMO_SHARDS
from helpers import prepare_small
from PIL import Image
from test_train_step import TINY

from g2face import degrade, losses, training
from g2face import train_step as ts
from g2face.checkpoint import load_artifact
from g2face.config import LITE_128
from pipeline import align

SETTINGS = dict(batch_size=2, steps=3, seed=5, hiding_warmup_steps=1, checkpoint_every=2, grid_every=2,
                grid_faces=3, log_every=1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_small(DEMO_SHARDS[0], tmp_path_factory.mktemp("prepared64"))


@pytest.fixture(scope="module")
def faces(prepared):
    return training.read_faces(sorted(prepared.glob("*.tar")))


@pytest.fixture(scope="module")
def priors():
    return training.build_priors(64, align.template(64), align.paste_mask(64))


def train_config() -> ts.TrainConfig:
    return ts.TrainConfig(steps_per_epoch=1, warmup_epochs=2, weights=losses.LossWeights(r1_interval=2),
                          paste=degrade.PasteBackConfig(photo_scale=(1.0, 1.5), jpeg_probability=0.5))


def run(out, faces, priors, weights_seed=0, **kw):
    settings = training.RunSettings(**{**SETTINGS, **kw.pop("settings", {})})
    state = training.new_state(TINY, train_config(), settings.seed + weights_seed, "cpu")
    state.rng.manual_seed(settings.seed)  # same draws whatever the initial weights
    last = training.run_training(settings, state, faces, priors, out, echo=lambda s: None, **kw)
    return state, last


def stats(out) -> list[dict]:
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("time", "steps_per_s")}


def test_reader_and_sampler(faces):
    assert len(faces) == 6 and all(f.identity is not None and f.geometry is not None for f in faces)
    batch = training.collate(faces[:2], 64)
    assert batch.image.shape == (2, 3, 64, 64) and -1 <= batch.image.min() < batch.image.max() <= 1
    assert batch.identity.shape == (2, 128) and batch.camera.shape == (2, 3)
    # a 64 px crop read at 32 px: the camera (crop pixels) halves with it
    assert torch.allclose(training.collate(faces[:2], 32).camera, batch.camera / 2)

    a = training.FaceSampler(faces, 2, seed=1)
    seen = [[f.key for f in a.next_faces()] for _ in range(3)]
    assert sorted(sum(seen, [])) == sorted(f.key for f in faces)  # an epoch visits every face once
    b = training.FaceSampler(faces, 2, seed=1)
    b.load_state(a.state())
    assert [f.key for f in a.next_faces()] == [f.key for f in b.next_faces()]
    ranks = [training.FaceSampler(faces, 2, seed=1, rank=r, world_size=2).next_faces() for r in (0, 1)]
    assert not {f.key for f in ranks[0]} & {f.key for f in ranks[1]}


def test_run_checkpoints_and_resumes_exactly(tmp_path, faces, priors):
    full, last = run(tmp_path / "full", faces, priors)
    lines = stats(tmp_path / "full")
    assert [(m["phase"], m["total_steps"]) for m in lines] == [("hiding_warmup", 1), ("train", 2), ("train", 3)]
    assert last["total_steps"] == 3 and all(0 <= m.get("anonymize/hiding_ber", 0.5) <= 1 for m in lines)
    assert {"lr", "steps_per_s", "time", "recover/identity_recover", "anonymize/hiding_ber"} <= set(lines[-1])

    ckpt = tmp_path / "full" / "checkpoints" / "step-0000002"
    assert training.latest_checkpoint(tmp_path / "full").name == "step-0000003"
    model = load_artifact(ckpt / training.ARTIFACT_FILE)  # the inference artifact: fp16 EMA, loadable
    assert model.config == TINY
    for name in ("step-0000002.png", "step-0000003.png"):
        grid = np.asarray(Image.open(tmp_path / "full" / "grids" / name))
        assert grid.shape == (3 * 64, 3 * 64, 3) and grid.std() > 0

    # Resume from step 2 with other initial weights: everything comes from the checkpoint.
    os.makedirs(tmp_path / "resumed")
    (tmp_path / "resumed" / "stats.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    resumed, again = run(tmp_path / "resumed", faces, priors, weights_seed=99, resume_from=ckpt)
    assert without_timing(again) == without_timing(last)
    for a, b in ((full.model, resumed.model), (full.ema, resumed.ema), (full.discriminator, resumed.discriminator)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    # the resumed run's log replaced the steps after the checkpoint instead of repeating them
    assert [m["total_steps"] for m in stats(tmp_path / "resumed")] == [1, 2, 3]

    with pytest.raises(training.TrainingError, match="batch_size"):
        run(tmp_path / "other", faces, priors, resume_from=ckpt, settings={"batch_size": 3})
    with pytest.raises(training.TrainingError, match="trained with run.seed 5, this run has 1; resume with run.seed 5"):
        run(tmp_path / "other-seed", faces, priors, resume_from=ckpt, settings={"seed": 1})


def test_a_resume_that_would_change_the_data_order_is_refused(faces):
    """"Continues exactly" needs the same order of faces to come: the seed and the number of workers fix it."""
    saved = training.FaceSampler(faces, 2, seed=5, rank=0, world_size=2)
    saved.next_faces()
    state = saved.state()
    same = training.FaceSampler(faces, 2, seed=5, rank=1, world_size=2)
    same.load_state(state)  # another rank of the same run
    assert (same.epoch, same.index) == (saved.epoch, saved.index)
    with pytest.raises(training.TrainingError, match="data order comes from run.seed 5, this run has 6; resume with run.seed 5"):
        training.FaceSampler(faces, 2, seed=6, rank=0, world_size=2).load_state(state)
    with pytest.raises(training.TrainingError, match="trained by 2 worker\\(s\\), this run has 1"):
        training.FaceSampler(faces, 2, seed=5).load_state(state)
    old = {k: state[k] for k in ("epoch", "index", "faces")}  # a checkpoint from before these were saved
    training.FaceSampler(faces, 2, seed=6).load_state(old)


def test_warm_start_files_are_small_and_load(tmp_path, faces, priors):
    state, _ = run(tmp_path / "a", faces, priors, settings={"steps": 2, "hiding_warmup_steps": 0})
    meta = training.save_warm_start(state, tmp_path / "ws", total_steps=2, part_bytes=2**17)
    assert len(meta["parts"]["generator"]) > 1  # split into parts
    fresh = training.new_state(TINY, train_config(), 123, "cpu")
    training.load_warm_start(fresh, tmp_path / "ws")
    for a, b in ((state.model, fresh.model), (state.ema, fresh.ema), (state.discriminator, fresh.discriminator)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p.half().float() if p.is_floating_point() else p, q), name
    # a new run from it continues the step count and trains on
    _, last = run(tmp_path / "b", faces, priors, warm_start=tmp_path / "ws", settings={"steps": 1})
    assert last["total_steps"] == 3 and last["step"] == 1

    sha = training.artifact_from_warm_start(tmp_path / "ws", tmp_path / "model.g2face")
    assert load_artifact(tmp_path / "model.g2face", expected_sha256=sha).config == TINY
    training.artifact_from_warm_start(tmp_path / "ws", tmp_path / "live.g2face", weights="generator")
    for src, path in ((state.ema, "model.g2face"), (state.model, "live.g2face")):  # each holds what it says
        loaded = load_artifact(tmp_path / path).state_dict()
        for name, p in src.state_dict().items():
            assert torch.equal(p.half().float() if p.is_floating_point() else p, loaded[name].float()), (path, name)
    for name in meta["parts"]["ema"]:  # EMA left out (a smaller carry): the generator stands in
        (tmp_path / "ws" / name).unlink()
    training.load_warm_start(fresh, tmp_path / "ws")
    assert all(torch.equal(p, q) for p, q in zip(fresh.ema.state_dict().values(), fresh.model.state_dict().values()))

    (tmp_path / "ws" / meta["parts"]["generator"][0]).write_bytes(b"changed")
    with pytest.raises(training.TrainingError, match="sha256"):
        training.load_warm_start(fresh, tmp_path / "ws")


def test_an_inference_artifact_warm_starts_generator_and_ema(tmp_path, faces, priors):
    """The shipped model carries training on across GPU leases: its weights start generator and EMA (the
    discriminator, which no artifact holds, starts fresh), and the step count goes on from its metadata."""
    state, _ = run(tmp_path / "a", faces, priors, settings={"steps": 2, "hiding_warmup_steps": 0})
    training.save_warm_start(state, tmp_path / "ws", total_steps=2)
    training.artifact_from_warm_start(tmp_path / "ws", tmp_path / "model.g2face")
    fresh = training.new_state(TINY, train_config(), 123, "cpu")
    disc_before = {k: v.clone() for k, v in fresh.discriminator.state_dict().items()}
    meta = training.load_warm_start(fresh, tmp_path / "model.g2face")
    assert meta["steps"] == 2
    for module in (fresh.model, fresh.ema):
        for (name, p), q in zip(state.ema.state_dict().items(), module.state_dict().values()):
            assert torch.equal(p.half().float() if p.is_floating_point() else p, q), name
    assert all(torch.equal(disc_before[k], v) for k, v in fresh.discriminator.state_dict().items())
    _, last = run(tmp_path / "b", faces, priors, warm_start=tmp_path / "model.g2face", settings={"steps": 1})
    assert last["total_steps"] == 3
    other = training.new_state(LITE_128, ts.TrainConfig(), 0, "cpu")
    with pytest.raises(training.TrainingError, match="another model config"):
        training.load_warm_start(other, tmp_path / "model.g2face")


def test_lite_warm_start_files_fit_the_transfer_limit(tmp_path):
    torch.manual_seed(0)
    state = training.new_state(LITE_128, ts.TrainConfig(), 0, "cpu")
    meta = training.save_warm_start(state, tmp_path, total_steps=0)
    sizes = {name: (tmp_path / name).stat().st_size for name in meta["files"]}
    assert all(s < 16 * 2**20 for s in sizes.values()), sizes
    assert sum(sizes.values()) < 64 * 2**20 and len(sizes) + 1 <= 8  # with meta.json, one $OUT transfer


def test_train_config_from_dict_names_bad_keys():
    cfg = training.train_config_from_dict({"lr_new": 5e-4, "weights": {"r1_interval": 4},
                                          "paste": {"photo_scale": [1.0, 2.0]}, "identity_perturb": None})
    assert cfg.lr_new == 5e-4 and cfg.weights.r1_interval == 4 and cfg.paste.photo_scale == (1.0, 2.0)
    assert cfg.identity_perturb is None
    with pytest.raises(training.TrainingError, match=r"train.weights.*r2"):
        training.train_config_from_dict({"weights": {"r2": 1}})


def _warmed_payload_psnr(faces, priors, min_psnr, steps=40):
    state = training.new_state(TINY, train_config(), 0, "cpu")
    state.rng.manual_seed(0)
    opt = training._warmup_optimizer(state, 3e-3)
    sampler = training.FaceSampler(faces, 2, 0)
    for _ in range(steps):
        m = training._hiding_warmup_step(state, priors, training.collate(sampler.next_faces(), 64), opt, None, min_psnr)
    assert ("hiding_warmup/payload_psnr_db" in m) == (min_psnr is not None)
    batch = training.collate(faces[:4], 64)
    x = batch.image
    model = state.model.eval()
    bits = torch.randint(0, 2, (4, TINY.payload_bits), generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad():
        w = model.styles(priors.identity(x), priors.geometry(x)[0])
        residual = torch.from_numpy(align.paste_mask(64).copy()) * ts.payload_residual(model, x, w, bits)
    return 10 * np.log10(4 / residual.square().mean().item())


def test_warmup_visibility_budget_keeps_the_payload_quiet(faces, priors):
    free = _warmed_payload_psnr(faces, priors, None)
    # 40 steps of this tiny model move the payload to ~49 dB; a 58 dB budget must hold it well above that.
    held = _warmed_payload_psnr(faces, priors, 58.0)
    print(f"\npayload PSNR after 40 warm-up steps: {free:.1f} dB without a budget, {held:.1f} dB with 58 dB")
    assert held >= 55.0 and held > free + 3.0, (free, held)


def test_held_out_figures_are_repeatable_and_in_range(faces, priors):
    """The recipe comparison's figures (bench/anonymize_recipe.py, scripts/device_recipes.py): fixed draws give
    the same numbers on every call and leave the model's mode as it was; another seed and chunk size change
    the draws, not which faces are measured."""
    torch.manual_seed(3)
    model = training.G2Face(TINY).train()
    batch = training.collate(faces, 64)
    a = training.held_out_figures(model, priors, batch, seed=7, chunk=64)
    assert model.training
    assert a == training.held_out_figures(model.eval(), priors, batch, seed=7, chunk=64) and not model.training
    assert a["faces"] == len(faces)
    assert 0 <= a["still_matching"] <= 1 and 0 <= a["recovered_matching"] <= 1 and 0 <= a["ber"] <= 1
    assert a["mean_distance"] > 0 and a["change_grey"] > 0 and a["recovered_psnr_db"] > 0
    assert 0 <= a["own_identity_matching"] <= 1 and a["own_identity_distance"] > 0
    assert 0 <= a["keyless_matching"] <= 1
    b = training.held_out_figures(model, priors, batch, seed=8, chunk=2)
    assert b["faces"] == a["faces"] and b["ber"] != a["ber"]  # other draws, same faces


def test_the_shipped_recipe_is_valid_and_every_continuation_script_trains_with_it():
    """Continuing the shipped model with the official weights undoes its anonymization, so the scripts that
    continue it (bench/anonymize_recipe.py, scripts/device_recipes.py, scripts/device_train.sh) default to its
    own recipe: each setting must parse into the TrainConfig and reach each script."""
    from pathlib import Path

    from g2face import training

    tree: dict = {}
    for setting in training.SHIPPED_RECIPE:
        key, value = setting.split("=", 1)
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = json.loads(value)
    weights = training.train_config_from_dict(tree).weights
    assert (weights.identity_dissimilar, weights.dissimilar_margin, weights.own_identity) == (20, 0.8, 5)
    root = Path(__file__).resolve().parents[2]
    shell = (root / "scripts" / "device_train.sh").read_text()
    assert all(f"--train-set {s}" in shell for s in training.SHIPPED_RECIPE)
    import importlib.util

    def load(path: str):
        spec = importlib.util.spec_from_file_location(Path(path).stem, root / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    assert set(training.SHIPPED_RECIPE) <= set(load("scripts/device_recipes.py").COMMON)
    assert set(training.SHIPPED_RECIPE) <= set(load("bench/anonymize_recipe.py").DEFAULT_COMMON.split(","))
