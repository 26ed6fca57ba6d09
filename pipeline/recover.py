"""`g2face-pipe recover`: restore the original identities of one anonymized shard, for key holders only.

Per reversible face, in the manifest's face order and with the transform stored at anonymization time
(no re-detection): re-align the published image, extract the payload bits, Reed-Solomon-correct,
authenticate and decrypt them under the shard key (the master key or an exported shard key), run the
model's recovery pass with the decrypted identity and the geometry of the anonymized crop, and paste the
recovered face back. Faces are batched across samples (``RECOVERY_BATCH`` crops per extractor and recovery
pass, by device); rows keep the manifest's order. A face that does not open gets its status ("authentication failed:
wrong key or modified image", ...) and no recovered pixels. The model must be the run's artifact (its sha256 is in
run.json); images are written as PNG.

Outputs under ``out_dir``: ``shards/<shard>`` (the recovered images, in the run's shard format, keyed as
published; only samples with at least one recovered face), ``reports/<shard>.parquet`` and ``.json``
(one row per face: key, face index, status, message, raw bit error rate, transform; never the
embedding). Every call appends one line to ``recovery-log.jsonl`` next to the run (or ``log_path``),
also when nothing opens.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import align, storage
from .imaging import crops_uint8, decode_image, encode_image
from .keys import KeyFileError, load_shard_key
from .shardio import read_parquet, read_webdataset, write_parquet, write_webdataset
from .spec import parse_spec
from .stages import face_seed, payload_sample_key, seed_sample_key
from .verify import ShardPayload, crops_tensor, extract_logits, run_payload_job
from .thumbnail import apply_thumbnails

REPORT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),  # as published
        ("index", pa.int32()),  # row of the public manifest
        ("face_index", pa.int32()),
        ("status", pa.string()),  # recovered | authentication_failed | uncorrectable | not_reversible | not_published
        ("message", pa.string()),
        ("raw_ber", pa.float32()),
        ("transform", pa.list_(pa.float64(), 6)),  # image -> aligned crop (2x3, row-major)
    ],
    metadata={"g2face-pipe.report": "recovery", "version": "1"},
)


# Faces are batched across the samples of one slice: decoded photos of a slice stay in memory together.
SAMPLES_PER_BATCH = 16
# Crops per extractor / recovery pass. On the CPU big batches are slower per face (lite-128, 1 thread:
# recovery 123 / 114 / 131 / 295 ms per face at batch 1 / 4 / 16 / 32, extractor 22 / 22 / 68 / 71 ms).
RECOVERY_BATCH = {"cuda": 32, "cpu": 4}


def _recovery_batch(dev: torch.device) -> int:
    return RECOVERY_BATCH.get(dev.type, RECOVERY_BATCH["cpu"])


class RecoveryError(RuntimeError):
    """The shard cannot be recovered at all (bad inputs, wrong key for every face); the message says why."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run_files(shard: str) -> tuple[str, str, str, str]:
    """(run dir, public manifest, private manifest, run.json) of a shard at RUN/shards/NAME."""
    name = storage.shard_name(shard)
    if not storage.exists(shard):
        raise RecoveryError(f"--shard {shard} does not exist; give the path of an output shard, RUN/shards/NAME")
    run_dir = str(Path(shard).resolve().parent.parent) if "://" not in shard else shard.rsplit("/", 2)[0]
    paths = (storage.join(run_dir, "manifests", name + ".parquet"), storage.join(run_dir, "private", name + ".parquet"),
             storage.join(run_dir, "run.json"))
    for p in paths:
        if not storage.exists(p):
            raise RecoveryError(
                f"{p} is missing: recover needs the shard inside its run directory (RUN/shards/{name}) with the run's "
                "manifests/, private/ and run.json"
            )
    return (run_dir, *paths)


def _read_manifest(url: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(url))).to_pylist()


def _append_log(path: str, entry: dict) -> None:
    line = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)  # one write of one line: concurrent recoveries never interleave within a line
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_model(run: dict, checkpoint: str | None, device: torch.device):
    """The run's own model: its shipped-priors artifact (or ``checkpoint``), or for a run of the official
    weights the files its spec names (``checkpoint`` then replaces the G2Face.pth path); the hash must be
    the one run.json recorded, so payloads are never opened with other weights."""
    from .g2face_method import G2FaceAnonymizer, G2FaceUnavailable

    spec_an = run["spec"]["anonymizer"]
    sha = (run.get("payload") or {}).get("artifact_sha256")
    official = spec_an.get("official") if spec_an.get("weights") == "official" else None
    path = checkpoint or (official["g2face"] if official else spec_an.get("checkpoint"))
    try:
        if official:
            from .official import OfficialG2FaceAnonymizer

            model = OfficialG2FaceAnonymizer(path, official["arcface"], official["deep3d"], official.get("bfm"),
                                             spec_an["resolution"])
            if sha and model.artifact_sha256 != sha:
                raise G2FaceUnavailable(f"{path} has sha256 {model.artifact_sha256}, but the run used {sha}")
        else:
            model = G2FaceAnonymizer(path, spec_an["resolution"], expected_sha256=sha)
    except G2FaceUnavailable as e:
        raise RecoveryError(f"the run's model cannot be loaded ({e}); pass --checkpoint with the run's "
                            f"{'G2Face.pth' if official else 'artifact'} (sha256 {sha})") from None
    model.setup(device)
    return model


def recover_shard(shard: str, key_path: str, out_dir: str, *, samples: list[str] | None = None,
                  user: str | None = None, reason: str | None = None, log_path: str | None = None,
                  checkpoint: str | None = None, device: str = "auto") -> dict:
    """Recover the reversible faces of one anonymized shard. Returns a summary dict:

    ``faces``: one row per face in scope (shard, key as published, original_key, index, face_index, status,
    message, raw_ber, transform (2x3 list), recovered (bool)); ``images``: published key -> PNG bytes of the
    recovered image (faces that did not open stay anonymized); ``recovered_shard`` / ``report``: paths
    written (None when nothing opened); ``counts``; ``key_id``.
    Raises RecoveryError when no face opens (nothing is written then, but the attempt is logged).
    """
    name = storage.shard_name(shard)
    run_dir, public_url, private_url, run_url = _run_files(shard)
    run = json.loads(storage.read_bytes(run_url))
    spec = parse_spec(run["spec"], run_url)
    payload_doc = run.get("payload") or {}
    if payload_doc.get("mode") != "reversible":
        how = (f"anonymizer.payload: {payload_doc['mode']}" if payload_doc.get("mode") else
               f"anonymizer.method: {spec.anonymizer.method}")
        raise RecoveryError(f"run {run_dir} did not hide reversible payloads (it used {how}); nothing in {name} "
                            "can be recovered")
    try:
        key = load_shard_key(key_path, spec.dataset.id, name)
    except KeyFileError as e:
        raise RecoveryError(str(e)) from None
    wanted = set(samples) if samples else None
    public = _read_manifest(public_url)
    private = {r["index"]: r for r in _read_manifest(private_url)}
    if wanted is not None:
        unknown = sorted(wanted - {r["key"] for r in public})
        if unknown:
            raise RecoveryError(f"--samples: {', '.join(unknown[:5])} not in the manifest of {name} (use the keys as published)")

    rows: list[dict] = []
    images: dict[str, bytes] = {}
    try:
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        in_scope = [r for r in public if wanted is None or r["key"] in wanted]
        todo = [r for r in in_scope if any(f["payload_mode"] == "reversible" for f in r["faces"])]
        model = _load_model(run, checkpoint, dev) if todo else None
        sp = None
        if model is not None:
            try:
                sp = ShardPayload(run_payload_job(run, spec.dataset.id, spec.seed, model), key)
            except ValueError as e:
                raise RecoveryError(f"{shard}: {e}") from None
        published = _read_published(spec, shard) if todo else {}
        res = spec.anonymizer.resolution
        for start in range(0, len(in_scope), SAMPLES_PER_BATCH):
            images.update(_recover_samples(in_scope[start : start + SAMPLES_PER_BATCH], private, published, spec,
                                           name, res, model, sp, dev, rows, run.get("face_seeds")))
    finally:
        counts = _counts(rows)
        _append_log(log_path or storage.join(run_dir, "recovery-log.jsonl"), {
            "time": _now(), "key_id": key.key_id, "master_key_id": key.master_key_id, "user": user, "reason": reason,
            "dataset_id": spec.dataset.id, "shard": name, "samples": sorted(wanted) if wanted is not None else "all",
            "counts": counts, "out": str(out_dir),
        })
    reversible = sum(1 for r in rows if r["status"] not in ("not_reversible", "not_published"))
    if counts.get("recovered", 0) == 0:
        if reversible == 0:
            raise RecoveryError(f"shard {name}: no reversible face in scope ({len(rows)} face(s)); nothing to recover")
        raise RecoveryError(
            f"shard {name}: none of its {reversible} reversible face(s) opened with key {key.key_id} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}): authentication failed: wrong key or modified "
            "images; nothing was recovered"
        )
    shard_out, report_out = _write_outputs(spec, name, out_dir, rows, images)
    return {"shard": name, "key_id": key.key_id, "counts": counts, "faces": rows, "images": images,
            "recovered_shard": shard_out, "report": report_out}


def _seed_key(face_seeds: str | None, public_row: dict, private_row: dict) -> str:
    """The sample name the run derived this sample's face seeds from (stages.seed_sample_key)."""
    if face_seeds == "published_key":
        return seed_sample_key(public_row["key"], private_row.get("original_key"), public_row["index"])
    return private_row.get("original_key") or str(public_row["index"])


@dataclass
class _Candidate:
    """A reversible face of a published sample, waiting for the extractor and, if it opens, recovery."""

    row: dict  # its report row, updated in place
    key: str  # the sample's key as published
    payload_key: str  # the key its payload is bound to
    face_index: int
    transform: np.ndarray  # image -> crop, 2x3
    crop: np.ndarray  # the re-aligned published crop, uint8 (R, R, 3)
    seed: int
    identity: np.ndarray | None = field(default=None, repr=False)  # decrypted; held only while its slice is recovered
    thumbnail: bytes | None = field(default=None, repr=False)  # decrypted (payload versions 4 and 5), likewise
    thumbnail_kind: int | None = None


def _recover_samples(samples: list[dict], private: dict, published: dict, spec, name: str, res: int, model, sp,
                     dev: torch.device, rows: list[dict], face_seeds: str | None) -> dict[str, bytes]:
    """Recover the faces of a few samples, faces batched across samples: extractor passes over every
    reversible face, then recovery passes over every face that opened. Appends one row per face to
    ``rows`` (in manifest order); returns published key -> PNG of each sample with a recovered face.
    ``face_seeds`` is run.json's: "published_key", or None for runs made before seeds left the original key."""
    images: dict[str, bytes] = {}
    pictures: dict[str, np.ndarray] = {}
    candidates: list[_Candidate] = []
    for r in samples:
        p = private.get(r["index"], {})
        transforms = p.get("transforms") or []
        raw = published.get(r["key"])
        rgb = None
        if raw is not None and r["published"]:
            rgb = decode_image(raw.fields[raw.image_field], max(spec.input.max_pixels, 1)).rgb
        for j, f in enumerate(r["faces"]):
            t = transforms[j] if j < len(transforms) else None
            row = {"shard": name, "key": r["key"], "original_key": p.get("original_key"), "index": r["index"],
                   "face_index": j, "raw_ber": None, "transform": t, "recovered": False}
            rows.append(row)
            if not r["published"] or rgb is None or t is None:
                row.update(status="not_published", message="the sample is not in the anonymized shard")
                continue
            if f["payload_mode"] != "reversible":
                row.update(status="not_reversible", message=f"face published as {f['payload_mode'] or f['method']}: "
                           "it carries no payload that any key opens")
                continue
            m = np.asarray(t, np.float64).reshape(2, 3)
            pictures[r["key"]] = rgb
            candidates.append(_Candidate(row, r["key"], payload_sample_key(r["key"], r["index"]), j, m,
                                         align.warp_to_crop(rgb, m, res),
                                         face_seed(spec.seed, _seed_key(face_seeds, r, p), j)))
    if not candidates:
        return images
    batch = _recovery_batch(dev)
    logits = extract_logits(model, [c.crop for c in candidates], dev, batch)
    opened = []
    for c, face_logits in zip(candidates, logits):
        dec = sp.decode(face_logits, c.payload_key, c.face_index)
        c.row["raw_ber"] = dec.raw_ber
        if not dec.ok:
            c.row.update(status=dec.status, message=dec.message)
            continue
        c.identity, c.thumbnail, c.thumbnail_kind = dec.embedding.astype(np.float32), dec.thumbnail, dec.thumbnail_kind
        del dec
        opened.append(c)
        c.row.update(status="recovered", message="ok", recovered=True)
    if not opened:
        return images
    outputs = {}
    for start in range(0, len(opened), batch):
        chunk = opened[start : start + batch]
        x = crops_tensor([c.crop for c in chunk], dev)
        ids = torch.from_numpy(np.stack([c.identity for c in chunk])).to(dev)
        with torch.inference_mode():
            y = model.recover(x, ids, [c.seed for c in chunk])
            for kind in sorted({c.thumbnail_kind for c in chunk if c.thumbnail is not None}):
                # the original face's low frequencies, from the payload (pipeline.thumbnail)
                with_thumb = [i for i, c in enumerate(chunk) if c.thumbnail is not None and c.thumbnail_kind == kind]
                y[with_thumb] = apply_thumbnails(y[with_thumb], [chunk[i].thumbnail for i in with_thumb], kind)
        faces = crops_uint8(y)
        for c, face in zip(chunk, faces):
            out = outputs.setdefault(c.key, pictures[c.key].copy())
            align.paste_back(out, np.ascontiguousarray(face), c.transform)
    for c in opened:
        c.identity = c.thumbnail = None
    for key, out in outputs.items():
        images[key] = encode_image(out, None, "RGB", "PNG", 100)
    return images


def _counts(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def _read_published(spec, shard: str) -> dict:
    inp = spec.input
    if inp.format == "webdataset":
        samples = read_webdataset(shard, None)
    else:
        _, samples = read_parquet(shard, inp.image_column, inp.key_column or "key", storage.shard_name(shard).rsplit(".", 1)[0])
    out = {}
    for s in samples:
        if s.duplicate_of is not None and not s.shard_error:
            continue  # a repeated key (runs made before repeats were refused published both): the first is its row's
        if s.read_error:
            raise RecoveryError(f"{shard}: {s.read_error}")
        out[s.key] = s
    return out


def _write_outputs(spec, name: str, out_dir: str, rows: list[dict], images: dict[str, bytes]) -> tuple[str, str]:
    shard_out = storage.join(out_dir, "shards", name)
    if spec.input.format == "webdataset":
        records = [(k, [("png", images[k])]) for k in sorted(images)]
        storage.atomic_write_file(shard_out, lambda f: write_webdataset(f, records), storage.PRIVATE_MODE)
    else:
        inp = spec.input
        schema = pa.schema([(inp.key_column or "key", pa.string()), (inp.image_column, pa.binary())])
        prows = [{inp.key_column or "key": k, inp.image_column: images[k]} for k in sorted(images)]
        storage.atomic_write_file(shard_out, lambda f: write_parquet(f, prows, schema), storage.PRIVATE_MODE)
    report = [{k: r[k] for k in REPORT_SCHEMA.names} for r in rows]
    report_out = storage.join(out_dir, "reports", name + ".parquet")
    # recovered originals and their report are for the key holder alone
    storage.atomic_write_file(report_out, lambda f: write_parquet(f, report, REPORT_SCHEMA), storage.PRIVATE_MODE)
    storage.atomic_write_bytes(storage.join(out_dir, "reports", name + ".json"),
                               (json.dumps(report, indent=2, sort_keys=True) + "\n").encode(), storage.PRIVATE_MODE)
    return shard_out, report_out
