"""`g2face-pipe prepare JOB.yaml`: aligned training shards with geometry, landmarks and identity priors.

The one preparation step for everything that trains (G2Face, the geometry regressor). Per input image:
decode, MTCNN detection and FFHQ-style alignment with the pipeline's own stages (largest face only),
dlib's 68 landmarks on a larger copy of the same aligned crop, the 3DMM fit (g2face/morphable.py), and
dlib's identity descriptor through the PyTorch port (g2face/identity.py). Output: one plain tar per input
shard (same name, `.tar`), readable with `tarfile` and numpy alone, holding per kept face

    <key>.png   the aligned crop, `prepare.resolution` pixels square, RGB
    <key>.npz   geometry (53,) and camera (3,) of the fit (crop pixels; g2face/morphable.py's layout),
                landmarks68 (68,2) dlib's landmarks in crop pixels, fit_landmarks68 (68,2) the fit's
                reprojection, fit_nme () its error over the outer-eye-corner distance, identity (128,) the
                dlib descriptor (only with prepare.identity), person () the person id (when the input has
                one), box (4,) and score () of the MTCNN face in the source image, transform (2,3) source
                image -> crop pixels, resolution ().

Identity descriptors are training scratch: they are written only into these shards, never into reports
or markers, and prepare refuses an output.dir inside the project repository or inside a `run` job's output.

Layout under output.dir: shards/<name>.tar, done/<name>.json (the shard's report: faces kept and dropped
by reason; written last, so a killed run redoes only unfinished shards), report.json (the totals).
Drop reasons: unreadable (decode or read error), no_face (MTCNN found none), too_small (largest face's box
side < prepare.min_face_size), dlib_no_face (dlib's HOG finds no face in the aligned crop), dlib_disagrees
(dlib's eyes/nose/mouth lie far from where MTCNN put them), fit_nme (fit error > prepare.max_fit_nme).

The job file is its own small spec (PrepareSpec below), validated like `run` jobs: unknown keys and bad
values are refused with the dotted key and the fix; `dataset`, `input` and `detection` are the `run` job's
sections. See jobs/prepare-train.yaml.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Literal

import cv2
import numpy as np
import torch
import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from . import align, storage
from .shardio import read_parquet, read_webdataset, write_webdataset
from .spec import DatasetSpec, DetectionSpec, InputSpec, JobSpecError, _format_errors, apply_overrides
from .stages import AlignStage, DecodeStage, DetectStage, Sample

PREPARE_FORMAT = 1  # bump when the shard contents change: done markers of another format are refused
DROP_REASONS = ("unreadable", "no_face", "too_small", "dlib_no_face", "dlib_disagrees", "fit_nme")
_STRICT = ConfigDict(extra="forbid")
_REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(config=_STRICT, frozen=True)
class PrepareOutputSpec:
    dir: str = Field(description="Output root (local path or fsspec URI): shards/, done/, report.json. Scratch: "
                     "it holds identity descriptors, so keep it out of repositories and published outputs.")


@dataclass(config=_STRICT, frozen=True)
class PrepareOptions:
    resolution: Literal[64, 128, 256] = Field(default=128, description="Side of the aligned crop written (pixels).")
    min_face_size: int = Field(default=40, ge=0, description="Largest face's MTCNN box side below this (source "
                               "pixels): dropped as too_small.")
    landmark_resolution: Literal[192, 256, 384] = Field(
        default=256, description="dlib's HOG and 68-point predictor run on the aligned crop warped at this size "
        "(dlib needs faces of ~80 px or more), and identity descriptors are computed from it.")
    max_landmark_offset: float = Field(
        default=0.25, gt=0, description="Mean distance of dlib's 5 points (eye centres, nose tip, mouth corners) "
        "from MTCNN's, over MTCNN's eye distance; above it the face is dropped as dlib_disagrees.")
    max_fit_nme: float = Field(default=0.05, gt=0, description="Fit reprojection error over the outer-eye-corner "
                               "distance; above it the face is dropped as fit_nme.")
    identity: bool = Field(default=True, description="Store dlib identity descriptors (training scratch).")
    person_field: str | None = Field(
        default="json.identity", description="Where the person id is: 'json.<key>' (a key of the JSON member) or a "
        "member extension / column holding text; missing ids are left out of the .npz.")
    batch_size: int = Field(default=32, ge=1, description="Images per detection batch.")


@dataclass(config=_STRICT, frozen=True)
class PrepareRuntime:
    workers: int = Field(default=1, ge=1, description="Shards prepared in parallel (separate processes).")
    torch_threads: int = Field(default=0, ge=0, description="Torch threads per worker; 0 leaves torch's default.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Device of MTCNN and the identity "
                                                   "network (dlib and the fit run on the CPU).")
    progress: bool = Field(default=True, description="Print one report line per shard.")


@dataclass(config=_STRICT, frozen=True)
class PrepareSpec:
    dataset: DatasetSpec
    input: InputSpec
    output: PrepareOutputSpec
    version: Literal[1] = Field(default=1, description="Prepare spec format version.")
    detection: DetectionSpec = Field(default_factory=DetectionSpec)
    prepare: PrepareOptions = Field(default_factory=PrepareOptions)
    runtime: PrepareRuntime = Field(default_factory=PrepareRuntime)


_ADAPTER = TypeAdapter(PrepareSpec)


def parse_prepare_spec(tree, source: str = "<dict>", overrides: list[tuple[str, str]] = ()) -> PrepareSpec:
    if not isinstance(tree, dict):
        raise JobSpecError(f"invalid prepare job {source}: the top level must be a mapping of sections")
    try:
        return _ADAPTER.validate_python(tree)
    except ValidationError as err:
        text = _format_errors(err, source, _ADAPTER, overrides).replace("invalid job spec", "invalid prepare job", 1)
        raise JobSpecError(text.replace("schemas/job.schema.json", "PrepareSpec in pipeline/prepare.py")) from None


def load_prepare_spec(path: str | Path, overrides: list[str] = ()) -> PrepareSpec:
    """Read a YAML prepare job, apply ``key=value`` overrides (YAML values), validate."""
    path = Path(path)
    if not path.is_file():
        raise JobSpecError(f"prepare job {path} does not exist; pass a YAML file like jobs/prepare-train.yaml")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise JobSpecError(f"prepare job {path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise JobSpecError(f"invalid prepare job {path}: the top level must be a mapping of sections")
    applied = apply_overrides(tree, list(overrides), "output.dir=/tmp/prepared")
    return parse_prepare_spec(tree, str(path), applied)


def prepare_fingerprint(spec: PrepareSpec) -> str:
    """Hash of what shapes a shard's contents (not where inputs and outputs live, not the runtime)."""
    d = json.loads(json.dumps(dataclasses.asdict(spec)))
    d.pop("runtime")
    d["output"].pop("dir")
    d["input"].pop("paths")
    d["format"] = PREPARE_FORMAT
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def check_output_dir(url: str) -> None:
    """Prepared shards hold identity descriptors: never inside this repository or a `run` job's output."""
    fs, p = storage.url_to_fs(url)
    if not storage.is_local(fs):
        return
    out = Path(p).resolve()
    if (_REPO_ROOT / "pyproject.toml").is_file() and (out == _REPO_ROOT or _REPO_ROOT in out.parents):
        raise JobSpecError(f"output.dir {url!r} lies inside the repository {_REPO_ROOT}; prepared shards hold "
                           "identity descriptors (training scratch): choose a directory outside it, e.g. /tmp/...")
    for d in (out, *out.parents):
        if (d / "run.json").is_file() and (d / "manifests").is_dir():
            raise JobSpecError(f"output.dir {url!r} lies inside the `run` job output {d}; prepared shards hold "
                               "identity descriptors and must not be published with it: choose another directory")


def _shard_out_name(url: str) -> str:
    name = storage.shard_name(url)
    return name if name.endswith(".tar") else name.rsplit(".", 1)[0] + ".tar"


def _person(raw_fields: dict, field: str | None) -> str | None:
    if not field:
        return None
    if field.startswith("json.") and "json" in raw_fields:
        try:
            doc = json.loads(raw_fields["json"])
        except ValueError:
            return None
        value = doc.get(field[5:]) if isinstance(doc, dict) else None
    else:
        value = raw_fields.get(field)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _png_bytes(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


class Preparer:
    """Prepares whole shards; models load once in ``setup()``. Ray-free (runs on the device tool's machine).

    Args:
        spec: the validated prepare job.
        fingerprint: prepare_fingerprint(spec), recorded in done markers.
    """

    def __init__(self, spec: PrepareSpec, fingerprint: str):
        self.spec = spec
        self.fingerprint = fingerprint
        self.ready = False

    def setup(self) -> None:
        from g2face import identity, landmarks, morphable

        spec, opt = self.spec, self.spec.prepare
        if spec.runtime.torch_threads:
            torch.set_num_threads(spec.runtime.torch_threads)
        dev = spec.runtime.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        elif dev == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("runtime.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
        self.device = torch.device(dev)
        det = spec.detection
        self.decode = DecodeStage(spec.input.max_pixels, keep_exif=False)
        self.detect = DetectStage(det.min_face_size, det.stage_thresholds, det.scale_factor, det.low_score_threshold,
                                  det.max_side, spec.input.aligned, opt.resolution, dev)
        # Every detected face is aligned (no fallback or withholding): prepare keeps or drops faces itself.
        self.align = AlignStage(opt.resolution, "prepare", "pixelate", 0, det.low_score_threshold, 0, "pass")
        self.detect.setup()
        landmarks.predictor_path()  # hash checks before any work
        morphable.load_bases()
        self.identity_net = identity.load_dlib_face_resnet(device=self.device) if opt.identity else None
        self.ready = True

    # -- one batch of samples -------------------------------------------------------------------------

    def _dlib_landmarks(self, big_crop: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """dlib's 68 points in the landmark crop, or (None, drop reason)."""
        from g2face import landmarks

        size = self.spec.prepare.landmark_resolution
        tmpl = align.template(size)
        boxes = landmarks.detect_faces(big_crop, upsample=0)
        centre = tmpl.mean(0)
        inside = [b for b in boxes if b[0] <= centre[0] <= b[2] and b[1] <= centre[1] <= b[3]]
        if not inside:
            return None, "dlib_no_face"
        box = min(inside, key=lambda b: np.hypot((b[0] + b[2]) / 2 - centre[0], (b[1] + b[3]) / 2 - centre[1]))
        lms = landmarks.landmarks_68(big_crop, box[None])[0]
        # MTCNN's five points land on the template after alignment; dlib's should land near them too.
        offset = np.linalg.norm(landmarks.five_point(lms) - tmpl, axis=-1).mean() / np.linalg.norm(tmpl[1] - tmpl[0])
        if offset > self.spec.prepare.max_landmark_offset:
            return None, "dlib_disagrees"
        return lms, None

    def process_batch(self, batch: list[Sample], drops: Counter) -> list[tuple[str, list[tuple[str, bytes]]]]:
        from g2face import identity, morphable

        opt = self.spec.prepare
        self.decode.process(batch)
        self.detect.process(batch)
        for s in batch:
            if s.live and s.faces:
                # Largest face by box area; the others are ignored.
                s.faces = [max(s.faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))]
        self.align.process(batch)
        kept: list[tuple[Sample, np.ndarray, np.ndarray]] = []  # sample, landmarks in crop px, big crop
        scale = opt.resolution / opt.landmark_resolution
        for s in batch:
            if not s.live:
                drops["unreadable"] += 1
                continue
            if not s.faces:
                drops["no_face"] += 1
                continue
            f = s.faces[0]
            if max(f.box[2] - f.box[0], f.box[3] - f.box[1]) < opt.min_face_size:
                drops["too_small"] += 1
                continue
            big = align.warp_to_crop(s.image.rgb, f.transform / scale, opt.landmark_resolution)
            lms, reason = self._dlib_landmarks(big)
            if reason:
                drops[reason] += 1
                continue
            kept.append((s, lms * scale, big))
        if not kept:
            return []
        fit = morphable.fit_landmarks(np.stack([k[1] for k in kept]))
        good = fit.nme <= opt.max_fit_nme
        drops["fit_nme"] += int((~good).sum())
        emb = None
        if self.identity_net is not None and good.any():
            bigs = np.stack([k[2] for k, g in zip(kept, good) if g])
            x = torch.from_numpy(bigs).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            with torch.inference_mode():
                chips = identity.aligned_to_chip(x, align.template(opt.landmark_resolution))
                emb = self.identity_net(chips).float().cpu().numpy()
        records = []
        j = 0
        for i, (s, lms, _) in enumerate(kept):
            if not good[i]:
                continue
            f = s.faces[0]
            arrays = {
                "geometry": fit.geometry[i], "camera": fit.camera[i],
                "landmarks68": lms.astype(np.float32), "fit_landmarks68": fit.landmarks[i],
                "fit_nme": np.float32(fit.nme[i]),
                "box": f.box.astype(np.float32), "score": np.float32(f.score),
                "transform": f.transform.astype(np.float64), "resolution": np.int32(opt.resolution),
            }
            if emb is not None:
                arrays["identity"] = emb[j]
            j += 1
            person = _person(s.raw.fields, opt.person_field)
            if person is not None:
                arrays["person"] = np.array(person)
            key = s.raw.key if s.raw.key is not None else f"sample{s.raw.index:06d}"
            records.append((key, [("png", _png_bytes(f.crop)), ("npz", _npz_bytes(arrays))]))
        return records

    # -- one shard ----------------------------------------------------------------------------------------

    def process_shard(self, url: str, out_dir: str) -> dict:
        if not self.ready:
            self.setup()
        t0 = time.perf_counter()
        inp = self.spec.input
        name = _shard_out_name(url)
        if inp.format == "webdataset":
            samples = read_webdataset(url, inp.image_column)
        else:
            samples = read_parquet(url, inp.image_column, inp.key_column, name.rsplit(".", 1)[0])[1]
        drops: Counter = Counter()
        records: list = []
        n = 0
        batch: list[Sample] = []
        for raw in samples:
            if raw.key is None and raw.read_error:  # a truncated shard's tail: nothing more to read
                drops["unreadable"] += 1
                n += 1
                continue
            batch.append(Sample(raw))
            n += 1
            if len(batch) >= self.spec.prepare.batch_size:
                records += self.process_batch(batch, drops)
                batch = []
        if batch:
            records += self.process_batch(batch, drops)
        storage.atomic_write_file(storage.join(out_dir, "shards", name), lambda f: write_webdataset(f, records))
        counts = {"samples": n, "kept": len(records),
                  "dropped": {r: drops[r] for r in DROP_REASONS if drops[r]}}
        assert counts["kept"] + sum(counts["dropped"].values()) == n, counts
        seconds = round(time.perf_counter() - t0, 3)
        marker = {"shard": name, "source": storage.shard_name(url), "fingerprint": self.fingerprint,
                  "format": PREPARE_FORMAT, "counts": counts, "seconds": seconds}
        storage.atomic_write_bytes(storage.join(out_dir, "done", name + ".json"),
                                   (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode())
        return marker


# -- process pool ---------------------------------------------------------------------------------------------

_WORKER: Preparer | None = None


def _init_worker(spec_tree: dict, fingerprint: str) -> None:
    global _WORKER
    _WORKER = Preparer(parse_prepare_spec(spec_tree), fingerprint)


def _run_in_worker(url: str, out_dir: str) -> dict:
    return _WORKER.process_shard(url, out_dir)


# -- the job ---------------------------------------------------------------------------------------------------


def _sum(markers: list[dict]) -> dict:
    dropped: Counter = Counter()
    for m in markers:
        dropped.update(m["counts"]["dropped"])
    return {"samples": sum(m["counts"]["samples"] for m in markers),
            "kept": sum(m["counts"]["kept"] for m in markers),
            "dropped": {r: dropped[r] for r in DROP_REASONS if dropped[r]}}


def _line(counts: dict) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items()) or "none"
    return f"{counts['samples']} images, {counts['kept']} faces kept, dropped: {drops}"


def prepare(job: str | Path | PrepareSpec | dict, overrides: list[str] = (), echo: Callable[[str], None] = print,
            max_shards: int | None = None) -> dict:
    """Run a prepare job; returns the report written to output.dir/report.json.

    Args:
        job: a YAML path, a PrepareSpec, or its dict form.
        overrides: ``key=value`` overrides applied to a YAML job (as `--set`).
        echo: where progress and the report lines go.
        max_shards: prepare at most this many pending shards in this call (the rest stay pending: the
            report then counts only finished shards).
    """
    if isinstance(job, PrepareSpec):
        spec = job
    elif isinstance(job, dict):
        spec = parse_prepare_spec(job)
    else:
        spec = load_prepare_spec(job, list(overrides))
    out = spec.output.dir
    check_output_dir(out)
    urls = storage.list_shards(spec.input.paths)
    storage.check_writable(out)
    fingerprint = prepare_fingerprint(spec)
    names: dict[str, str] = {}
    pending, finished = [], []
    for url in urls:
        name = _shard_out_name(url)
        if name in names:
            raise JobSpecError(f"input.paths: shards {names[name]} and {url} both map to output {name}; rename one")
        names[name] = url
        done = storage.join(out, "done", name + ".json")
        if storage.exists(done):
            marker = json.loads(storage.read_bytes(done))
            if marker.get("fingerprint") != fingerprint:
                raise JobSpecError(f"output.dir {out} already holds shard {name} prepared with other settings; use a "
                                   "new output.dir, or delete the old outputs to redo them")
            finished.append(marker)
        else:
            pending.append(url)
    fs, root = storage.url_to_fs(out)
    if storage.is_local(fs):
        for sub in ("shards", "done", ""):
            for tmp in (Path(root) / sub).glob(".*.tmp"):
                tmp.unlink()  # temp files of a killed run, never published
    if max_shards is not None:
        pending = pending[:max_shards]
    echo(f"prepare {spec.dataset.id}: {len(urls)} shard(s), {len(finished)} already done, {len(pending)} to run")
    t0 = time.perf_counter()

    def report(marker: dict) -> None:
        finished.append(marker)
        if spec.runtime.progress:
            echo(f"  {marker['shard']}: {_line(marker['counts'])} ({marker['seconds']:.0f} s)")

    if len(pending) > 1 and spec.runtime.workers > 1:
        import multiprocessing

        tree = json.loads(json.dumps(dataclasses.asdict(spec)))
        with ProcessPoolExecutor(min(spec.runtime.workers, len(pending)), multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(tree, fingerprint)) as pool:
            for marker in pool.map(_run_in_worker, pending, [out] * len(pending)):
                report(marker)
    elif pending:
        worker = Preparer(spec, fingerprint)
        for url in pending:
            report(worker.process_shard(url, out))
    seconds = time.perf_counter() - t0
    run_images = sum(m["counts"]["samples"] for m in finished[len(finished) - len(pending):])
    finished.sort(key=lambda m: m["shard"])
    totals = _sum(finished)
    doc = {"dataset": spec.dataset.id, "fingerprint": fingerprint, "format": PREPARE_FORMAT,
           "spec": json.loads(json.dumps(dataclasses.asdict(spec))),
           "shards": {m["shard"]: m["counts"] for m in finished}, "total": totals,
           "complete": len(finished) == len(urls),
           "this_run": {"shards": len(pending), "images": run_images, "seconds": round(seconds, 3),
                        "images_per_second": round(run_images / seconds, 3) if pending and seconds else None}}
    storage.atomic_write_bytes(storage.join(out, "report.json"), (json.dumps(doc, indent=2) + "\n").encode())
    echo(f"total ({len(finished)}/{len(urls)} shards): {_line(totals)}")
    if pending:
        echo(f"this run: {run_images} images in {seconds:.0f} s ({run_images / max(seconds, 1e-9):.1f} images/s)")
    return doc


def read_prepared(path: str | Path) -> list[dict]:
    """All samples of a prepared shard: [{'key', 'image' (R,R,3) uint8, **npz arrays}], with tarfile + numpy + cv2.

    A reference reader (and what the tests use); training code may equally read the tar with tarfile + numpy
    and decode the PNG with any library.
    """
    import tarfile

    out: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.rsplit(".", 1)
            data = tar.extractfile(m).read()
            item = out.setdefault(key, {"key": key})
            if ext == "png":
                item["image"] = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                                             cv2.COLOR_BGR2RGB)
            elif ext == "npz":
                with np.load(io.BytesIO(data), allow_pickle=False) as z:
                    item.update({k: z[k] for k in z.files})
    return list(out.values())
