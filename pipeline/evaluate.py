"""``g2face-pipe evaluate``: every number of the quality issue (#6) for one G2Face model, as JSON.

The corpus goes through the real pipeline (``run_job`` on a generated job: detection, alignment,
anonymization, payload, PNG encoding, the metrics stage) into a scratch folder, once for the model and
once per baseline. The numbers that the privacy audit also reports (share still matching, TAR at FAR,
the utility table) come from the audit's own functions (``pipeline.privacy_metrics`` on the runs read by
``pipeline.audit``), so ``g2face-pipe audit`` on the same runs gives the same values; the rest
(``pipeline.evaluate_faces``, ``pipeline.evaluate_recovery``) are the bars' other routes. The evaluation's
master key is derived from the model's hash: the scratch outputs protect nothing, and the same model on the
same data gives the same numbers. eval.json holds aggregates only: no sample key, embedding or key material.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from g2face.checkpoint import SHIPPED_ARTIFACT
from g2face.identity import SAME_PERSON_DISTANCE
from g2face.inception import InceptionWeightsError, load_inception

from . import storage
from .audit import coverage, collect_faces, fid_section, load_run, read_pairs
from .evaluate_faces import identity_routes, nme_of, published_images
from .evaluate_recovery import payload_figures, recovery_figures
from .fid import MAX_FID_FACES, FidCollector
from .metrics_stage import FaceMeasurer
from .privacy_metrics import FAR_TARGET, privacy_row, utility_row, verification
from .spec import MAX_DRAWS, AnonymizerSpec, JobSpecError, parse_spec

EVAL_FORMAT = 1
BASELINES = ("blur", "pixelate")
DEFAULT_CHECKPOINT = SHIPPED_ARTIFACT
DATASET_ID = "evaluate"

# Issue #6's bars: (value path in the document, comparison, threshold).
BARS = {
    "1_anonymization_port": ("identity.port_aligned.share_still_matching", "<=", 0.05),
    "1_anonymization_dlib_cpp": ("identity.dlib_cpp.share_still_matching", "<=", 0.05),
    "1_anonymization_perturbed": ("identity.perturbed.share_still_matching", "<=", 0.05),
    "2_verification_tar": ("verification.tar_one_side_anonymized", "<=", 0.05),
    "3_recovery_match": ("recovery.share_matching_original", ">=", 0.90),
    "3_recovery_psnr": ("recovery.psnr_db.mean", ">=", 25.0),
    "4_payload_ber_png": ("payload.ber_png", "<", 1e-3),
    "4_payload_decode_jpeg90": ("payload.decode_rate_jpeg_q90", ">=", 0.99),
    "5_utility_mtcnn_redetection": ("utility.model.mtcnn_detection_rate", ">=", 0.98),
    "6_pixel_change": ("pixel_change.mean_abs_grey_levels", ">=", 8.0),
}


class EvaluateError(ValueError):
    """Evaluation cannot start; the message names the option and the fix."""


def resolve_checkpoint(checkpoint: str | None) -> Path:
    path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    if not path.is_file():
        if checkpoint:
            raise EvaluateError(f"--checkpoint {checkpoint} does not exist; pass the path of a G2Face inference artifact")
        raise EvaluateError(
            f"the shipped G2Face model {DEFAULT_CHECKPOINT} is missing from this installation; reinstall, or pass "
            "--checkpoint PATH of an inference artifact (g2face.checkpoint.save_artifact)"
        )
    return path


def write_evaluation_key(path: Path, artifact_sha256: str) -> None:
    """A master key derived from the model hash: deterministic runs; it protects scratch outputs only."""
    from .keys import MASTER_KIND, _write_key_file, key_id

    key = hashlib.sha256(b"g2face-pipe/evaluate/v1/" + artifact_sha256.encode()).digest()
    _write_key_file(
        path,
        {
            "kind": MASTER_KIND,
            "version": 1,
            "key_id": key_id(key),
            "created": "1970-01-01T00:00:00Z",
            "note": "EVALUATION ONLY: derived from a public model hash; never use for real data",
            "key": base64.b64encode(key).decode("ascii"),
        },
    )


def slice_shards(urls: list[str], limit: int | None, out_dir: Path) -> tuple[list[str], int]:
    """The first ``limit`` samples of the shards, in order, as shards of the same names (all when None)."""
    if limit is None:
        n = 0
        for url in urls:
            fs, p = storage.url_to_fs(url)
            with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
                n += len({m.name.split("/")[-1].split(".")[0] for m in tar if m.isfile()})
        return urls, n
    out_dir.mkdir(parents=True, exist_ok=True)
    sliced, taken = [], 0
    for url in urls:
        if taken >= limit:
            break
        dst = out_dir / storage.shard_name(url)
        fs, p = storage.url_to_fs(url)
        keys: list[str] = []
        with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as src, tarfile.open(dst, "w") as tar:
            for m in src:
                if not m.isfile():
                    continue
                key = m.name.rsplit("/", 1)[-1].split(".")[0]
                if not keys or keys[-1] != key:
                    if taken >= limit:
                        break
                    keys.append(key)
                    taken += 1
                tar.addfile(m, src.extractfile(m))
        sliced.append(str(dst))
    return sliced, taken


def job_tree(method: str, shards: list[str], out: Path, key: Path, resolution: int, checkpoint: Path | None,
             device: str, torch_threads: int, seed: int, draws: int | None = None) -> dict:
    anonymizer = {"method": method, "resolution": resolution}
    if checkpoint is not None:
        if draws is not None:
            anonymizer["draws"] = draws
        anonymizer["checkpoint"] = str(checkpoint)
        if "payload" in {f.name for f in dataclasses.fields(AnonymizerSpec)}:
            anonymizer["payload"] = "reversible"
        # Measure the model itself: the guard would swap faces that still match for the fallback.
        anonymizer["identity_guard"] = "off"
    return {
        "dataset": {"id": DATASET_ID},
        "input": {"format": "webdataset", "paths": shards},
        "output": {"dir": str(out), "image_format": "png", "keys": "keep"},
        "anonymizer": anonymizer,
        "keys": {"master": str(key)},
        "metrics": {"enabled": True, "resolution": 256},
        "runtime": {"executor": "local", "progress": True, "torch_threads": torch_threads, "device": device},
        "seed": seed,
    }


def _shard_progress(method: str, started: float, echo: Callable[[str], None]) -> Callable[[str], None]:
    """Pass on only the run's per-shard "done" lines, tagged with the method and the minutes since it started:
    a full evaluation runs for hours on a CPU, and the rest of the run's output is the job's, not evaluate's."""

    def forward(line: str) -> None:
        if line.lstrip().startswith("done "):
            echo(f"evaluate: {method} {line.strip()} ({(time.perf_counter() - started) / 60:.1f} min)")

    return forward


def _get(doc: dict, path: str):
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def _reason(doc: dict, path: str) -> str:
    """The nearest stated reason for a missing value: '<leaf>_reason' beside it, else 'reason' up the tree."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        why = _get(doc, f"{parent}.{parts[i]}_reason") or _get(doc, f"{parent}.reason")
        if why:
            return why
    return "no value measured"


def judge_bars(doc: dict) -> dict:
    """Pass/fail per bar with its threshold; a bar whose number is not available is neither."""
    out = {}
    for name, (path, op, threshold) in BARS.items():
        value = _get(doc, path)
        entry = {"value": value, "comparison": op, "threshold": threshold, "source": path}
        if value is None:
            entry["pass"] = None
            entry["reason"] = "not available: " + _reason(doc, path)
        else:
            entry["pass"] = bool({"<=": value <= threshold, ">=": value >= threshold, "<": value < threshold}[op])
        out[name] = entry
    verdicts = [e["pass"] for e in out.values()]
    out["all_pass"] = all(v is True for v in verdicts)
    out["summary"] = f"{sum(v is True for v in verdicts)} pass, {sum(v is False for v in verdicts)} fail, " + (
        f"{sum(v is None for v in verdicts)} not available"
    )
    return out


def evaluate(
    data: str | list[str],
    pairs: str | None,
    out: str | None,
    checkpoint: str | None = None,
    limit: int | None = None,
    baselines: tuple[str, ...] = BASELINES,
    work_dir: str | None = None,
    device: str = "cpu",
    torch_threads: int = 0,
    seed: int = 0,
    echo: Callable[[str], None] = print,
    inception_weights: str | None = None,
    fid_faces: int = MAX_FID_FACES,
    draws: int | None = None,
) -> dict:
    """Run the evaluation and write ``out`` (JSON); returns the document. ``work_dir`` keeps the runs."""
    from g2face.checkpoint import load_artifact

    t0 = time.perf_counter()
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise EvaluateError(f"--baselines {','.join(bad)}: choose from {','.join(BASELINES)}")
    if limit is not None and limit < 1:
        raise EvaluateError(f"--limit {limit}: give a positive number of samples")
    if draws is not None and not 1 <= draws <= MAX_DRAWS:
        raise EvaluateError(f"--draws {draws}: give 1 (first draws only) to {MAX_DRAWS}")
    ckpt = resolve_checkpoint(checkpoint)
    try:
        model = load_artifact(ckpt)
    except (OSError, ValueError) as e:
        raise EvaluateError(f"--checkpoint {ckpt}: {e}") from None
    sha, cfg = model.artifact_sha256, model.config
    del model
    try:
        urls = storage.list_shards(data)
    except (JobSpecError, FileNotFoundError) as e:
        raise EvaluateError(f"--data: {e}") from None
    if not urls:
        raise EvaluateError(f"--data {data}: no shards match; pass WebDataset .tar shards (a glob or a list)")
    not_tar = [u for u in urls if not u.endswith(".tar")]
    if not_tar:
        raise EvaluateError(f"--data: {not_tar[0]} is not a WebDataset .tar shard; evaluate reads .tar shards only")
    pair_list = read_pairs(pairs) if pairs else None
    inception = None
    if inception_weights:  # checked before the runs, so a wrong file fails fast
        try:
            inception = load_inception(inception_weights, device)
        except InceptionWeightsError as e:
            raise EvaluateError(f"--inception-weights: {e}") from None

    scratch = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="g2face-evaluate-"))
    scratch.mkdir(parents=True, exist_ok=True)
    # A full evaluation takes hours on a CPU: one killed in a --work-dir resumes there (its runs skip the shards
    # already done), but only with the settings it started with, which shape every shard it wrote.
    settings = {"artifact_sha256": sha, "data": urls, "limit": limit, "draws": draws, "seed": seed, "device": device}
    marker = scratch / "evaluation.json"
    resumed = marker.exists()
    if resumed:
        started = json.loads(marker.read_text())
        changed = sorted(k for k in settings if started.get(k) != settings[k])
        if changed:
            raise EvaluateError(f"--work-dir {scratch} holds an evaluation started with other {', '.join(changed)}; "
                                "resume it with the same options, or give an empty or new folder")
        echo(f"evaluate: resuming the evaluation in {scratch} (finished shards are kept)")
    elif any((scratch / m).exists() for m in ("g2face", *BASELINES, "evaluation.key", "inputs")):
        raise EvaluateError(f"--work-dir {scratch} already holds an evaluation; give an empty or new folder")
    else:
        storage.atomic_write_bytes(str(marker), (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
    try:
        shards, samples = slice_shards(urls, limit, scratch / "inputs")
        key = scratch / "evaluation.key"
        if not key.exists():
            write_evaluation_key(key, sha)
        timings, runs = {"resumed": resumed}, {}  # resumed: the run timings cover this invocation's shards only
        for method in ("g2face", *baselines):
            echo(f"evaluate: running {method} on {samples} sample(s)")
            t = time.perf_counter()
            tree = job_tree(method, shards, scratch / method, key, cfg.resolution, ckpt if method == "g2face" else None,
                            device, torch_threads, seed, draws)
            from .runner import run_job

            run_job(parse_spec(tree, f"<evaluate {method}>"), echo=_shard_progress(method, t, echo))
            timings[f"pipeline_{method}_seconds"] = round(time.perf_counter() - t, 3)
            runs[method] = load_run(str(scratch / method))

        echo("evaluate: measuring")
        t = time.perf_counter()
        measurer = FaceMeasurer(256, device=device)
        emb_cache, dlib_cache = {}, {}
        label = lambda m: "this run (g2face)" if m == "g2face" else f"baseline {baselines.index(m) + 1} ({m})"  # noqa: E731
        fids = {m: FidCollector(inception, emb_cache, fid_faces) if inception else None for m in runs}
        cols = {m: collect_faces(r, measurer, 0, None, emb_cache, fids[m]) for m, r in runs.items()}
        privacy = {m: privacy_row(label(m), r, cols[m]) for m, r in runs.items()}
        utility = {m: utility_row(label(m), r) for m, r in runs.items()}
        routes, images_by = {}, {}
        for m, r in runs.items():
            images, skipped = published_images(r)
            images_by[m] = images
            originals = {(f.shard, f.index, f.face): f.orig for f in cols[m].with_embeddings}
            routes[m] = identity_routes(r, images, originals, measurer, dlib_cache) | {"images_not_compared": skipped}
        verif = None
        if pair_list is not None:
            verif = verification(pair_list, [(label(m), r, cols[m]) for m, r in runs.items()])
            verif.pop("genuine_original")
            verif.pop("impostor_original")
        timings["measure_seconds"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        model_run = runs["g2face"]
        payload = payload_figures(model_run, key, images_by["g2face"], device)
        recovery = recovery_figures(model_run, key, scratch / "recovery", measurer, images_by["g2face"], device)
        timings["recovery_seconds"] = round(time.perf_counter() - t, 3)
        timings["total_seconds"] = round(time.perf_counter() - t0, 3)
        timings["seconds_per_image"] = round(timings["total_seconds"] / samples, 3) if samples and not resumed else None

        doc = build_document(
            ckpt, sha, cfg, data, urls, samples, limit, pairs, runs, privacy, utility, routes, verif, payload,
            recovery, timings, device, torch_threads,
        )
        doc["utility"]["fid"] = fid_section(
            inception_weights, inception, fid_faces, [(label(m), cols[m], fids[m]) for m in runs]
        )
    finally:
        if not work_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    if out:
        storage.atomic_write_bytes(out, (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
    return doc


def _verification_section(verif: dict | None) -> dict:
    if verif is None:
        return {"computed": False, "reason": "no pairs file given (--pairs CSV with key_a,key_b,same)",
                "tar_one_side_anonymized": None}
    rows = verif["rows"]
    model = next(r for r in rows if r["method"] == "g2face")
    sec = dict(verif)
    sec["tar_one_side_anonymized"] = model["tar"] if verif["computed"] else None
    if not verif["computed"]:
        sec["reason"] = "the pairs file has no usable genuine and impostor pairs among the published faces"
    return sec


def _draws(run) -> dict:
    """The redraw setting of the model's run and which draw each published g2face face kept (pipeline.redraw)."""
    kept: dict[str, int] = {}
    pushed = 0
    for r in run.public:
        for f in r.get("faces") or []:
            if r.get("published") and f.get("method") == "g2face" and f.get("draw") is not None:
                kept[str(f["draw"])] = kept.get(str(f["draw"]), 0) + 1
                pushed += (f.get("identity_push") or 0) > 0
    an = run.doc.get("spec", {}).get("anonymizer", {})
    draws, after = an.get("draws", 1), an.get("identity_push_after")
    # runs from before the identity push have no such fields and pushed nothing; nor do runs with too few draws
    push = an.get("identity_push", 0.0) if after is not None and draws > after else 0.0
    # runs from before push_hold pushed plain draws after a pushed one anonymized (False)
    hold = bool(an.get("identity_push_hold", False)) if push > 0 else None
    return {"draws": draws, "identity_push": push, "identity_push_after": after, "identity_push_hold": hold,
            "faces_pushed": pushed,
            "faces_by_kept_draw": dict(sorted(kept.items(), key=lambda kv: int(kv[0])))}


def _reinforcement(run) -> dict:
    """The payload reinforcement settings the model's run used (bar 4 depends on them)."""
    an = run.doc.get("spec", {}).get("anonymizer", {})
    steps = an.get("payload_reinforce_steps", 0)
    # runs from before payload_reinforce_keep_detection kept every face's whole reinforcement (False)
    keep = bool(an.get("payload_reinforce_keep_detection", False)) if steps else None
    return {"steps": steps, "max_change_grey_levels": an.get("payload_reinforce_max_change"), "keep_detection": keep}


def _payload_format(run) -> int | None:
    """The payload format the model's run wrote (bar 3 depends on it: format 5 carries the face thumbnail)."""
    return ((run.doc.get("payload") or {}).get("layout") or {}).get("format_version")


def build_document(ckpt, sha, cfg, data, urls, samples, limit, pairs, runs, privacy, utility, routes, verif,
                   payload, recovery, timings, device, torch_threads) -> dict:
    from .runner import package_versions

    model = privacy["g2face"]
    doc = {
        "eval_format": EVAL_FORMAT,
        "model": {
            "checkpoint": str(ckpt),
            "artifact_sha256": sha,
            "config": cfg.name,
            "resolution": cfg.resolution,
            "payload_bits": cfg.payload_bits,
            "model_id": runs["g2face"].doc.get("anonymizer_model_id"),
            "redraw": _draws(runs["g2face"]),
        },
        "data": {
            "paths": data if isinstance(data, list) else [data],
            "shards": [storage.shard_name(u) for u in urls],
            "samples": samples,
            "limit": limit,
            "pairs_file": str(pairs) if pairs else None,
            "pairs_sha256": hashlib.sha256(storage.read_bytes(pairs)).hexdigest() if pairs else None,
        },
        "counts": {m: {k: v for k, v in coverage(r.public).items() if isinstance(v, int)} for m, r in runs.items()},
        "threshold": SAME_PERSON_DISTANCE,
        "identity": {
            "port_aligned": {
                "faces": model["faces"],
                "share_still_matching": model["share_still_matching"],
                "identity_distance": model["identity_distance"],
                "mean_identity_distance": (model["identity_distance"] or {}).get("mean"),
                "rank1": model["rank1"],
                "method": "PyTorch dlib port on the pipeline's aligned 256 px crops of the original and the written "
                "PNG (the metrics stage's distances, as the audit reports them)",
            },
            "dlib_cpp": routes["g2face"]["dlib_cpp"],
            "perturbed": routes["g2face"]["perturbed"],
            "baselines": {
                m: {
                    "port_aligned_share": privacy[m]["share_still_matching"],
                    "port_aligned_mean_distance": (privacy[m]["identity_distance"] or {}).get("mean"),
                    "dlib_cpp_share": routes[m]["dlib_cpp"]["share_still_matching"],
                    "perturbed_share": routes[m]["perturbed"]["share_still_matching"],
                }
                for m in runs
                if m != "g2face"
            },
        },
        "privacy_rows": [privacy[m] for m in runs],
        "verification": _verification_section(verif) | {"far_target": FAR_TARGET},
        "recovery": recovery,
        "payload": payload | {"reinforcement": _reinforcement(runs["g2face"]),
                              "format_version": _payload_format(runs["g2face"])},
        "utility": {
            m: utility[m] | {k: v for k, v in nme_of(r, 256).items()} for m, r in runs.items()
        }
        | {"rows": [utility[m] for m in runs]},
        "pixel_change": routes["g2face"]["pixel_change"]
        | {"baselines": {m: routes[m]["pixel_change"]["mean_abs_grey_levels"] for m in runs if m != "g2face"}},
        "timing": timings | {"device": device, "torch_threads": torch_threads or torch.get_num_threads()},
        "versions": package_versions(),
    }
    doc["utility"]["model"] = doc["utility"].pop("g2face")
    doc["bars"] = judge_bars(doc)
    return doc
