"""``g2face-pipe audit RUN_DIR``: what a finished run did, as a self-contained HTML report and ``audit.json``.

Sections: coverage (from the public manifests), privacy (identity distances from the manifests; rank-1
re-identification and TAR at FAR=1e-3 need the originals, which are re-read from the inputs listed in
``run.json`` and matched through the private manifest), utility (the paper's Table III from the manifests'
metrics), recovery (with ``--recovery``), figures and an example grid (``--no-examples`` leaves it out).
Every number of the report is in ``audit.json`` (schema: ``schemas/audit.schema.json``). Original sample
keys never appear in either: they often hold names. The figures are drawn in ``pipeline.audit_figures`` and
the page is rendered in ``pipeline.audit_html``; this module reads the run and assembles every number.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch

from g2face.identity import SAME_PERSON_DISTANCE
from schemas import load_json

from g2face.inception import InceptionWeightsError, load_inception

from . import align, payload_readback, storage
from .audit_figures import FIGURE_TITLES, THUMB, example_grid, make_figures
from .audit_html import p_value_text, render_html
from .fid import FORMAT_NOTE, MAX_FID_FACES, SMALL_SAMPLE_NOTE, FidCollector
from .imaging import decode_image
from .metrics_stage import FIELDS, FaceMeasurer, metric_transform
from .privacy_metrics import (  # noqa: F401  (re-exported: the audit's numbers live there, shared with evaluate)
    FAR_TARGET,
    HIST_EDGES,
    bit_balance,
    identity_agreement,
    mean_of,
    pairwise_agreement,
    far_threshold,
    privacy_row,
    psnr_ssim_mae,
    rank1,
    subjects,
    summary,
    utility_row,
    verification,
)
from .shardio import read_parquet, read_webdataset
from .spec import JobSpec, JobSpecError, parse_spec

AUDIT_FORMAT = 1
MAX_EXAMPLES = 6
SECTIONS = ("coverage", "privacy", "utility", "recovery", "figures", "examples", "provenance")
RISKY_SIZE = ("tiny",)
_SIZE_CLASSES = load_json("status.json")["size_class"]


class AuditError(ValueError):
    """The run cannot be audited; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Reading a run.


@dataclass
class Run:
    dir: str
    doc: dict  # run.json
    spec: JobSpec
    public: list[dict]
    private: list[dict] | None  # None when private/ is absent (a copy that left the controller)

    @property
    def method(self) -> str:
        return self.spec.anonymizer.method


def _read_table(url: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(url))).to_pylist()


def load_run(run_dir: str) -> Run:
    run_json = storage.join(run_dir, "run.json")
    if not storage.exists(run_json):
        raise AuditError(f"{run_json} not found: RUN_DIR must be the output.dir of a finished `g2face-pipe run`")
    doc = json.loads(storage.read_bytes(run_json))
    try:
        spec = parse_spec(doc.get("spec"), run_json)
    except JobSpecError as e:
        raise AuditError(f"{run_json} holds a job spec this version cannot read: {e}") from None
    public, private = [], []
    for item in doc.get("inputs", []):
        url = storage.join(run_dir, "manifests", item["shard"] + ".parquet")
        if not storage.exists(url):
            raise AuditError(f"{url} is missing: the run is incomplete; rerun the job (finished shards are skipped)")
        public += _read_table(url)
        purl = storage.join(run_dir, "private", item["shard"] + ".parquet")
        if private is not None and storage.exists(purl):
            private += _read_table(purl)
        else:
            private = None
    return Run(run_dir, doc, spec, public, private)


# ---------------------------------------------------------------------------------------------------------
# Coverage.


def coverage(public: list[dict]) -> dict:
    def blank() -> dict:
        return {
            "images": 0,
            "published": 0,
            "withheld": 0,
            "errors": 0,
            "no_face": 0,
            "faces": 0,
            "anonymized": 0,
            "fallback": 0,
        }

    total, by_shard = blank(), {}
    sizes = {name: {"faces": 0, "anonymized": 0, "fallback": 0} for name in _SIZE_CLASSES}
    reasons: dict[str, int] = {}
    by_method: dict[str, int] = {}
    risky = low = tiny = redrawn = pushed = warned = scaled = 0
    for r in public:
        warned += bool(r.get("warnings"))  # manifests before version 4 have no warnings and no draws
        sh = by_shard.setdefault(r["shard"], blank())
        for c in (total, sh):
            c["images"] += 1
            c["published"] += bool(r["published"])
            c["withheld"] += r["status"] == "withheld"
            c["errors"] += r["status"] == "error"
            c["no_face"] += r["status"] == "no_face"
            c["faces"] += r["n_faces"]
        for f in r["faces"]:
            size = f["size_class"]  # None only for faces of samples that failed before alignment
            if size in sizes:
                sizes[size]["faces"] += 1
            tiny += size in RISKY_SIZE
            low += f["fallback_reason"] == "low_score"
            risky += size in RISKY_SIZE or f["fallback_reason"] == "low_score"
            if f["fallback_reason"]:
                reasons[f["fallback_reason"]] = reasons.get(f["fallback_reason"], 0) + 1
            if r["published"]:
                by_method[f["method"]] = by_method.get(f["method"], 0) + 1
                redrawn += f["method"] == "g2face" and (f.get("draw") or 0) > 0
                pushed += f["method"] == "g2face" and (f.get("identity_push") or 0) > 0  # manifests from version 5
                scaled += f.get("reinforce_share") is not None and f["reinforce_share"] < 1  # from version 7
                if size in sizes:
                    sizes[size]["anonymized"] += 1
                    sizes[size]["fallback"] += bool(f["fallback_reason"])
                for c in (total, sh):
                    c["anonymized"] += 1
                    c["fallback"] += bool(f["fallback_reason"])
    faces = total["faces"]
    share = risky / faces if faces else 0.0
    tiny_side = _SIZE_CLASSES["tiny"][1]
    statement = (
        f"{risky} of {faces} detected faces ({100 * share:.1f}%) are tiny (box side under {tiny_side} px: {tiny}) or "
        f"low-confidence detections ({low}). These are where privacy leaks: they get the fallback instead of the "
        "model, and faces of the same kind that the detector missed altogether are published unchanged."
        if faces
        else "No face was detected in this run, so nothing was anonymized; check the detector settings."
    )
    return {
        **total,
        "by_shard": [{"shard": k, **v} for k, v in sorted(by_shard.items())],
        "by_size_class": [{"size_class": k, **v} for k, v in sizes.items()],
        "by_method": dict(sorted(by_method.items())),
        "fallback_reasons": dict(sorted(reasons.items())),
        "redrawn_faces": redrawn,
        "pushed_faces": pushed,
        "reinforcement_scaled_faces": scaled,
        "samples_with_warnings": warned,
        "risky_faces": {"tiny": tiny, "low_score": low, "total": risky, "share": share, "statement": statement},
    }


# ---------------------------------------------------------------------------------------------------------
# Faces re-read from inputs and outputs.


@dataclass
class FaceRecord:
    shard: str
    index: int
    face: int
    original_key: str | None
    side: float
    size_class: str | None
    metrics: dict | None
    orig: np.ndarray | None = None  # dlib embeddings, kept in memory only
    anon: np.ndarray | None = None
    recovered: dict | None = None  # psnr / ssim / mae of the recovered face
    method: str | None = None  # the method that made the published face (g2face, or the fallback's)


@dataclass
class Collected:
    faces: list[FaceRecord] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    changed_inputs: int = 0
    unreadable: int = 0
    thumbs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def with_embeddings(self) -> list[FaceRecord]:
        return [f for f in self.faces if f.orig is not None and f.anon is not None]


def _image_bytes(raw) -> bytes | None:
    data = raw.fields.get(raw.image_field) if raw.image_field else None
    return data if isinstance(data, (bytes, bytearray)) and data else None


def _read_samples(spec: JobSpec, url: str, output: bool) -> dict:
    """key -> raw sample of a shard (inputs in the job's format; outputs as the job wrote them)."""
    inp = spec.input
    if inp.format == "webdataset":
        samples = read_webdataset(url, None if output else inp.image_column)
    else:
        key_col = (inp.key_column or "key") if output else inp.key_column
        _, samples = read_parquet(url, inp.image_column, key_col, storage.shard_name(url).rsplit(".", 1)[0])
    out = {}
    for s in samples:
        if s.shard_error:
            raise OSError(s.read_error)
        if s.key is None or s.duplicate_of is not None:  # never published: the first sample of a key was
            continue
        out[s.key] = s
    return out


def collect_faces(
    run: Run, measurer: FaceMeasurer, thumbs: int = 0, recovery_dir: str | None = None, cache: dict | None = None,
    fid: FidCollector | None = None,
) -> Collected:
    """Re-read inputs and outputs, cut both aligned crops of every published face and embed them.

    ``cache`` maps (input sha256, transform) -> original embedding, shared between runs of the same inputs.
    ``fid``, when given, also receives both crops of the first faces (in run order) for FID.
    """
    out = Collected()
    if run.private is None:
        out.unreachable.append("private manifests (private/) are absent")
        return out
    spec, res = run.spec, measurer.resolution
    job_res = spec.anonymizer.resolution
    cache = {} if cache is None else cache
    private = {(r["shard"], r["index"]): r for r in run.private}
    wanted: dict[str, list[dict]] = {}
    for r in run.public:
        if r["published"] and r["n_faces"]:
            wanted.setdefault(r["shard"], []).append(r)
    pending: list[tuple[FaceRecord, np.ndarray, np.ndarray, tuple]] = []

    def flush() -> None:
        if not pending:
            return
        need = [i for i, p in enumerate(pending) if p[3] not in cache]
        if need:
            emb = measurer.embed(np.stack([pending[i][1] for i in need]))
            for i, e in zip(need, emb):
                cache[pending[i][3]] = e
        anon = measurer.embed(np.stack([p[2] for p in pending]))
        for (rec, _, _, ck), e in zip(pending, anon):
            rec.orig, rec.anon = cache[ck], e
        pending.clear()

    for item in run.doc.get("inputs", []):
        shard, url = item["shard"], item["url"]
        rows = wanted.get(shard)
        if not rows:
            continue
        try:
            inputs = _read_samples(spec, url, output=False)
        except Exception as e:
            out.unreachable.append(f"{url} ({type(e).__name__})")
            continue
        try:
            outputs = _read_samples(spec, storage.join(run.dir, "shards", shard), output=True)
        except Exception as e:
            out.unreachable.append(f"{storage.join(run.dir, 'shards', shard)} ({type(e).__name__})")
            continue
        recovered = _recovered_shard(recovery_dir, shard, spec) if recovery_dir else None
        for r in rows:
            p = private.get((shard, r["index"]))
            raw_in = inputs.get(p["original_key"]) if p else None
            raw_out = outputs.get(p["key"]) if p else None
            data_in, data_out = (_image_bytes(raw_in) if raw_in else None), (_image_bytes(raw_out) if raw_out else None)
            if data_in is None or data_out is None or len(p["transforms"]) != r["n_faces"]:
                out.unreadable += 1
                continue
            if hashlib.sha256(data_in).hexdigest() != p["input_sha256"]:
                out.changed_inputs += 1  # the input changed since the run: comparing would be meaningless
                continue
            try:
                rgb_in = decode_image(data_in, spec.input.max_pixels).rgb
                rgb_out = decode_image(data_out, max(spec.input.max_pixels, rgb_in.shape[0] * rgb_in.shape[1])).rgb
            except Exception:
                out.unreadable += 1
                continue
            if rgb_in.shape != rgb_out.shape:
                out.unreadable += 1
                continue
            rgb_rec = _recovered_image(recovered, p["key"], rgb_in.shape, spec)
            for j, (f, t) in enumerate(zip(r["faces"], p["transforms"])):
                m = metric_transform(np.asarray(t).reshape(2, 3), job_res, res)
                o = align.warp_to_crop(rgb_in, m, res)
                a = align.warp_to_crop(rgb_out, m, res)
                side = float(max(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]))
                rec = FaceRecord(shard, r["index"], j, p["original_key"], side, f["size_class"], f.get("metrics"),
                                 method=f.get("method"))
                if recovery_dir:
                    rec.recovered = (
                        psnr_ssim_mae(align.warp_to_crop(rgb_rec, m, res), o) if rgb_rec is not None else None
                    )
                out.faces.append(rec)
                if len(out.thumbs) < thumbs:
                    small = lambda c: cv2.resize(c, (THUMB, THUMB), interpolation=cv2.INTER_AREA)  # noqa: E731
                    out.thumbs.append((small(o), small(a)))
                key = (p["input_sha256"], tuple(np.round(np.asarray(t, np.float64), 6)), job_res, res)
                pending.append((rec, o, a, key))
                if fid is not None:
                    fid.add(o, a, key)
                if len(pending) >= 64:
                    flush()
    flush()
    return out


def _recovered_shard(recovery_dir: str, shard: str, spec: JobSpec) -> dict | None:
    for url in (storage.join(recovery_dir, "shards", shard), storage.join(recovery_dir, shard)):
        if storage.exists(url):
            try:
                return _read_samples(spec, url, output=True)
            except Exception:
                return None
    return None


def _recovered_image(recovered: dict | None, key: str, shape: tuple, spec: JobSpec) -> np.ndarray | None:
    raw = recovered.get(key) if recovered else None
    data = _image_bytes(raw) if raw else None
    if data is None:
        return None
    try:
        rgb = decode_image(data, max(spec.input.max_pixels, shape[0] * shape[1])).rgb
    except Exception:
        return None
    return rgb if rgb.shape == shape else None


# ---------------------------------------------------------------------------------------------------------
# Privacy numbers.


def read_pairs(path: str) -> list[tuple[str, str, bool]]:
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except (OSError, FileNotFoundError) as e:
        raise AuditError(
            f"--pairs {path}: cannot read it ({type(e).__name__}); pass a CSV with columns key_a,key_b,same"
        ) from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"key_a", "key_b", "same"} <= set(reader.fieldnames):
        raise AuditError(
            f"--pairs {path}: needs the columns key_a,key_b,same (found {reader.fieldnames}); keys are input keys"
        )
    out = []
    for i, row in enumerate(reader, start=2):
        if row["same"] not in ("0", "1"):
            raise AuditError(f"--pairs {path} line {i}: same must be 0 or 1, got {row['same']!r}")
        out.append((row["key_a"], row["key_b"], row["same"] == "1"))
    return out


def payload_section(run: Run, pairs: list[tuple[str, str, bool]] | None = None, device: str = "cpu",
                    limit: int = payload_readback.DEFAULT_LIMIT) -> dict:
    # Manifests from version 3 on carry payload columns for every face; only g2face faces fill them.
    g2 = [f for r in run.public if r["published"] for f in r["faces"] if f.get("method") == "g2face"]
    randomness = payload_randomness(run, pairs, device, limit) if g2 else {
        "computed": False, "reason": f"anonymizer.method is '{run.method}': no face carries a payload"}
    if not any(f.get("payload_mode") == "reversible" or f.get("payload_status") for f in g2):
        why = (
            "the g2face method ran in irreversible mode (uniformly random bits drawn from each face's seed, "
            "no key-gated payload)"
            if g2
            else f"anonymizer.method is '{run.method}', which hides nothing"
        )
        tail = "the bits it hid were still read back and checked below" if g2 else "the randomness check does not apply"
        return {"present": False, "statement": f"No payload in this run: {why}; {tail}.",
                "randomness": randomness}
    ok = sum(bool(f.get("payload_ok")) for f in g2)
    reversible = sum(f.get("payload_mode") == "reversible" for f in g2)
    return {
        "present": True,
        "statement": f"{ok} of {len(g2)} g2face faces carry a payload that verified when written; {reversible} are "
        "published as reversible.",
        "randomness": randomness,
    }


_RANDOMNESS_MEANING = (
    "What this checks: the bits hidden in a published face are ciphertext (reversible mode: the encrypted identity "
    "embedding) or seeded noise (irreversible mode), so anyone holding the public extractor, without a key, should "
    "read what looks like uniformly random bits: every bit position about half ones, two faces agreeing on about "
    "half their bits, and two photos of the same person agreeing no more than two different people. A biased "
    "position or person-correlated bits would leak information about the person to anyone, key or not. The bits "
    "are read through the model's extractor, so its bit errors (mean raw bit error rate at write time shown) add "
    "to what the ciphertext alone would give."
)
P_ALARM = 1e-3  # below this a test says the bits are not fair coins


def payload_randomness(run: Run, pairs: list[tuple[str, str, bool]] | None, device: str, limit: int) -> dict:
    """Read published g2face faces' bits back without a key and test them for uniform randomness."""
    pair_keys = [k for a, b, _ in pairs or () for k in (a, b)]
    try:
        rb = payload_readback.read_payload_bits(run, device, limit, pair_keys)
    except payload_readback.ReadbackUnavailable as e:
        return {"computed": False, "reason": str(e), "meaning": _RANDOMNESS_MEANING}
    if rb.bits is None:
        return {"computed": False, "reason": "no published g2face face to read", "meaning": _RANDOMNESS_MEANING}
    bits = rb.bits
    modes: dict[str, int] = {}
    for f in rb.faces:
        modes[str(f.payload_mode)] = modes.get(str(f.payload_mode), 0) + 1
    out = {
        "computed": True,
        "meaning": _RANDOMNESS_MEANING,
        "artifact_sha256": rb.artifact_sha256,
        "faces_published": rb.candidates,
        "faces_selected": rb.selected,
        "faces_read": len(rb.faces),
        "faces_unreadable": rb.unreadable,
        "unreachable": rb.unreachable,
        "limit": limit,
        "sampling": f"at most {limit} faces: those of images a pairs file names first, then a shuffle seeded with "
        f"{payload_readback.SAMPLE_SEED}; the same run always gives the same sample",
        "payload_modes": dict(sorted(modes.items())),
        "mean_write_ber": mean_of([f.payload_ber for f in rb.faces]),
        "balance": bit_balance(bits),
        "pairwise_agreement": pairwise_agreement(bits),
    }
    if pairs is None:
        out["identity"] = {"computed": False, "reason": "no pairs file given (--pairs CSV with key_a,key_b,same)"}
    else:
        row: dict[str, int] = {}
        for i, f in enumerate(rb.faces):  # an image's largest face is the subject a pairs file names
            k = f.original_key
            if k is not None and (k not in row or f.side > rb.faces[row[k]].side):
                row[k] = i
        idx = [(row[a], row[b], s) for a, b, s in pairs if a in row and b in row and row[a] != row[b]]
        ident = identity_agreement(bits, idx)
        ident["computed"] = bool(ident["same_person"]["pairs"] and ident["different_person"]["pairs"])
        ident["pairs_used"] = len(idx)
        if not ident["computed"]:
            ident["reason"] = "the pairs file has no same-person and different-person pairs among the faces read"
        out["identity"] = ident
    bal, agr, ident = out["balance"], out["pairwise_agreement"], out["identity"]
    alarms = []
    if bal["chi_square"]["p_value"] < P_ALARM:
        alarms.append(f"the per-position shares of ones are not those of fair coins (chi-square "
                      f"{p_value_text(bal['chi_square']['p_value'])})")
    if bal["worst_position"]["bonferroni_p_value"] < P_ALARM:
        alarms.append(f"bit position {bal['worst_position']['position']} is ones in "
                      f"{100 * bal['worst_position']['share']:.1f}% of faces")
    if ident.get("computed") and ident["p_value"] < P_ALARM and ident["difference"] > 0:
        alarms.append("photos of the same person agree on more bits than photos of different people")
    n = out["faces_read"]
    if alarms:
        out["verdict"] = "biased"
        out["statement"] = (f"Over {n} faces read back without a key, the payload does NOT look uniformly random: "
                            + "; ".join(alarms) + ". Such a payload can leak information about the people in it.")
    else:
        out["verdict"] = "consistent_with_random"
        agreement = f", mean pairwise agreement {agr['mean']:.3f}" if agr else ""
        out["statement"] = (f"Over {n} faces read back without a key, the payload looks uniformly random (no test "
                            f"below p = {P_ALARM:g}): share of ones {bal['share_of_ones']:.3f}{agreement}.")
    return out


# ---------------------------------------------------------------------------------------------------------
# The audit document.

_FID_REASON = (
    "FID needs the Inception-v3 weights of the reference implementation, which this project cannot ship; "
    "pass --inception-weights PATH to supply them."
)


def fid_section(
    weights: str | None, inception, max_faces: int, runs: list[tuple[str, Collected, FidCollector | None]]
) -> dict:
    """audit.json's FID part: per run, FID between the original and the anonymized aligned crops."""
    if inception is None:
        return {"computed": False, "reason": _FID_REASON}
    rows = []
    for label, col, collector in runs:
        if col.unreachable or not col.faces:
            why = "; ".join(col.unreachable) or "no published face could be matched to its input"
            rows.append({"label": label, "faces": 0, "value": None, "reason": f"the originals are unreachable: {why}"})
        else:
            rows.append(collector.result(label))
    if all(r["value"] is None for r in rows):
        return {"computed": False, "reason": "FID could not be computed: " + rows[0]["reason"]}
    fmt = inception.weights_format
    note = FORMAT_NOTE["reference" if inception.is_fid_reference else fmt]
    return {
        "computed": True,
        "weights": str(weights),
        "weights_sha256": inception.sha256,
        "weights_format": fmt,
        "comparable_with_published": inception.is_fid_reference,
        "max_faces": max_faces,
        "rows": rows,
        "statement": (
            f"FID between the aligned crops of the original faces and the same crops of the images as "
            f"written, over the first {max_faces} faces of each run in run order (fewer where the run has fewer), "
            f"on Inception-v3 pool3 features (crops resized bilinearly to 299 px). Weights: {note} "
            + SMALL_SAMPLE_NOTE
        ),
    }


KEYLESS_MAX_IMAGES = 2000  # the audit attacks the faces of at most this many images (run order), in memory at once


def keyless_section(run: Run, measurer: FaceMeasurer, reachable: bool, device: str) -> dict:
    """The key-less re-synthesis attack (``pipeline.resynthesis``) on this run's g2face faces: how often someone
    with the published data and the model, but no key, restores the person."""
    if run.method != "g2face":
        return {"computed": False, "reason": f"a {run.method} run has no recover pass to run without the key"}
    if not reachable:
        return {"computed": False, "reason": "the originals are unreachable, so nothing can be compared with them"}
    from .evaluate_faces import published_images
    from .evaluate_recovery import keyless_figures

    attempted = sum(1 for r in run.public if r["published"] for f in r["faces"] if f.get("method") == "g2face")
    if not attempted:
        return {"computed": False, "reason": "no face of this run was published as a g2face face"}
    images, skipped = published_images(run, KEYLESS_MAX_IMAGES)
    figures = keyless_figures(run, measurer, images, attempted, device)
    if len(images) == KEYLESS_MAX_IMAGES:
        figures["method"] += f" Attacked: the faces of the run's first {KEYLESS_MAX_IMAGES} comparable images."
    return {"computed": figures["share_matching_original"] is not None, "images_not_compared": skipped, **figures}


def build_audit(
    run_dir: str,
    pairs: str | None = None,
    recovery: str | None = None,
    baselines: list[str] = (),
    examples: bool = True,
    inception_weights: str | None = None,
    device: str = "auto",
    fid_faces: int = MAX_FID_FACES,
) -> tuple[dict, dict[str, bytes], bytes | None]:
    """Everything the report shows: (audit document, figures as PNG bytes, example grid PNG or None)."""
    t0 = time.time()
    run = load_run(run_dir)
    base_runs = [load_run(b) for b in baselines]
    # Label rows by method, or by model id where two runs share a method (e.g. two blur strengths).
    clash = len({r.method for r in [run] + base_runs}) < 1 + len(base_runs)
    name = lambda r: (r.doc.get("anonymizer_model_id") or r.method) if clash else r.method  # noqa: E731
    label = f"this run ({name(run)})"
    others = [(f"baseline {i + 1} ({name(r)})", r) for i, r in enumerate(base_runs)]
    pair_list = read_pairs(pairs) if pairs else None
    if device not in ("auto", "cpu", "cuda"):
        raise AuditError(f"--device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise AuditError("--device cuda: no CUDA device is visible; use auto or cpu")
    device = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    inception = None
    if inception_weights:
        if fid_faces < 2:
            raise AuditError(f"--fid-faces {fid_faces}: FID needs at least 2 faces per side; use 2 or more")
        try:  # before the long re-read, so a wrong file fails fast
            inception = load_inception(inception_weights, device)
        except InceptionWeightsError as e:
            raise AuditError(f"--inception-weights: {e}") from e
    measurer = FaceMeasurer(run.spec.metrics.resolution, device=device)
    cache: dict = {}
    fid_of = lambda: FidCollector(inception, cache, fid_faces) if inception else None  # noqa: E731
    fid_run = fid_of()
    col = collect_faces(run, measurer, MAX_EXAMPLES if examples else 0, recovery, cache, fid_run)
    cols, fid_cols = [], []
    for lbl, r in others:
        fid_cols.append(fid_of())
        cols.append((lbl, r, collect_faces(r, measurer, 0, None, cache, fid_cols[-1])))
    reachable = not col.unreachable and bool(col.with_embeddings)

    privacy_rows = [privacy_row(label, run, col)] + [privacy_row(lbl, r, c) for lbl, r, c in cols]
    if reachable:
        reid = (
            "Rank-1 re-identification: each anonymized face is searched among the "
            f"{len(col.with_embeddings)} original faces of this run (dlib descriptors, nearest by Euclidean "
            "distance); a hit means its own original is nearest."
        )
    else:
        reid = (
            "Rank-1 re-identification was not computed: the originals could not be re-read ("
            + "; ".join(col.unreachable or ["no published face could be matched to its input"])
            + ")."
        )
    verif_values = None
    if pair_list is None:
        verif = {"computed": False, "reason": "no pairs file given (--pairs CSV with key_a,key_b,same)"}
    elif not reachable:
        verif = {"computed": False, "reason": "the originals are unreachable: " + "; ".join(col.unreachable)}
    else:
        verif = verification(pair_list, [(label, run, col)] + cols)
        verif_values = {
            "genuine, both original": verif.pop("genuine_original"),
            "impostor, both original": verif.pop("impostor_original"),
        }
        subj = subjects(col)
        verif_values["genuine, one side anonymized"] = [
            float(np.linalg.norm(subj[a].orig.astype(np.float64) - subj[b].anon))
            for a, b, s in pair_list
            if s and a in subj and b in subj
        ]
        verif["pairs_file"] = str(pairs)
        if not verif["computed"]:
            verif["reason"] = "the pairs file has no usable genuine and impostor pairs among this run's published faces"

    util_rows = [utility_row(label, run)] + [utility_row(lbl, r) for lbl, r in others]
    util_values = {
        lbl.split(" (")[0]: {
            k: [f["metrics"][k] for row in r.public if row["published"] for f in row["faces"] if f.get("metrics")]
            for k in FIELDS
        }
        for lbl, r in [(label, run)] + others
    }
    fid = fid_section(inception_weights, inception, fid_faces, [(label, col, fid_run)]
                      + [(lbl, c, f) for (lbl, _, c), f in zip(cols, fid_cols)])

    if recovery is None:
        rec = {
            "run": False,
            "statement": "Recovery was not checked (run audit with --recovery RECOVERED_DIR to check it).",
        }
    else:
        expected = [f for f in col.faces]
        got = [f.recovered for f in expected if f.recovered is not None]
        rec = {
            "run": True,
            "dir": str(recovery),
            "faces_expected": len(expected),
            "faces_recovered": len(got),
            "decode_rate": len(got) / len(expected) if expected else None,
            "psnr": summary([g["psnr"] for g in got]),
            "ssim": summary([g["ssim"] for g in got]),
            "mae": summary([g["mae"] for g in got]),
            "identical_faces": sum(g["psnr"] is None for g in got),
            "statement": "Recovered faces are compared with the originals on aligned crops; PSNR in dB "
            "(identical crops "
            "are counted apart, their PSNR is unbounded), SSIM on grey levels, MAE on a 0..1 scale.",
        }

    doc = {
        "audit_format": AUDIT_FORMAT,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "run_dir": str(run_dir),
        "run": {
            "dataset_id": run.spec.dataset.id,
            "method": run.method,
            "anonymizer_model_id": run.doc.get("anonymizer_model_id"),
            "fingerprint": run.doc.get("fingerprint"),
            "key_id": run.doc.get("key_id"),
            "shards": len(run.doc.get("inputs", [])),
            "devices": run.doc.get("devices", ["not recorded"]),
            "metrics_enabled": any(f.get("metrics") for r in run.public for f in r["faces"]),
            "baselines": [{"label": lbl, "run_dir": str(r.dir), "method": r.method} for lbl, r in others],
        },
        "inputs": {
            "reachable": reachable,
            "unreachable": col.unreachable,
            "changed_since_run": col.changed_inputs,
            "unreadable_samples": col.unreadable,
            "faces_reread": len(col.with_embeddings),
            "statement": (
                "The originals were re-read from the inputs listed in run.json and checked against the input "
                "hashes of the private manifest."
                if reachable
                else reid
            ),
        },
        "coverage": coverage(run.public),
        "privacy": {
            "threshold": SAME_PERSON_DISTANCE,
            "rows": privacy_rows,
            "reidentification": reid,
            "verification": verif,
            "payload": payload_section(run, pair_list, device),
            "keyless_resynthesis": keyless_section(run, measurer, reachable, device),
        },
        "utility": {"rows": util_rows, "fid": fid, "resolution": run.spec.metrics.resolution},
        "recovery": rec,
        "examples": {"included": bool(examples and col.thumbs), "faces": len(col.thumbs) if examples else 0},
        "figures": [],
    }
    if not examples:
        doc["examples"]["statement"] = "Example faces were left out (--no-examples)."
    elif not col.thumbs:
        doc["examples"]["statement"] = "No example faces: the originals could not be re-read."
    else:
        doc["examples"]["statement"] = (
            "Aligned faces of the first published images: originals (top) and as published "
            "(bottom). Remove with --no-examples before a report leaves the organisation."
        )
    figures = make_figures(doc, util_values, verif_values)
    doc["figures"] = [{"name": k, "title": FIGURE_TITLES[k]} for k in figures]
    grid = example_grid(col.thumbs) if examples and col.thumbs else None
    return doc, figures, grid


def write_audit(run_dir: str, out: str | None = None, **kwargs) -> tuple[Path, Path]:
    """Build and write report.html and audit.json (beside it); returns both paths."""
    if out is None:
        if "://" in run_dir:
            raise AuditError(f"{run_dir} is not a local folder: pass --out report.html")
        out = str(Path(run_dir) / "report.html")
    out_path = Path(out)
    doc, figures, grid = build_audit(run_dir, **kwargs)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    json_path = out_path.with_name("audit.json")
    storage.atomic_write_bytes(str(json_path), (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
    # example faces show the originals beside their anonymized versions: such a report is the data controller's
    storage.atomic_write_bytes(str(out_path), render_html(doc, figures, grid).encode("utf-8"),
                               storage.PRIVATE_MODE if grid is not None else 0o644)
    return out_path, json_path
