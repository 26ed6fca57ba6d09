"""One whole input shard -> one output shard + public and private manifests + done marker.

The worker is Ray-free: the Ray adapter wraps it in an actor, the local executor calls it directly.
Writes are atomic and the done marker is written last, so a killed run leaves either a finished
shard (skipped on resume) or one that is redone from scratch.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import torch

from . import storage
from .anonymizers import anonymizer_for
from .identity_guard import IdentityGuard
from .redraw import DrawChecker
from .imaging import EXT_FORMAT, FORMAT_EXT
from .keys import pseudonymize
from .manifest import PRIVATE_SCHEMA, PUBLIC_SCHEMA, check_status
from .metrics_stage import FaceMeasurer, MetricsStage, recognizer_of
from .payload_reinforce import PayloadReinforcer, ReinforceSettings
from .shardio import RawSample, read_parquet, read_webdataset, write_parquet, write_webdataset
from .spec import JobSpec, reinforcement_applies
from .stages import AlignStage, AnonymizeStage, DecodeStage, DetectStage, PasteEncodeStage, Sample, StageError
from .verify import PayloadJob, ShardPayload, VerifyStage


@dataclass(frozen=True)
class OutputLayout:
    """Where one shard's outputs go under output.dir."""

    root: str

    def shard(self, name: str) -> str:
        return storage.join(self.root, "shards", name)

    def manifest(self, name: str) -> str:
        return storage.join(self.root, "manifests", name + ".parquet")

    def private(self, name: str) -> str:
        return storage.join(self.root, "private", name + ".parquet")

    def done(self, name: str) -> str:
        return storage.join(self.root, "done", name + ".json")


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is visible to this worker; use 'auto' or 'cpu'")
    return requested


def device_label(device: str) -> str:
    """What a done marker records of the device a shard ran on: 'cpu', or 'cuda: <GPU name>'. MTCNN's float
    results, and so which faces are found and how they are aligned, differ slightly between devices."""
    if str(device).startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return str(device)


def output_signature(spec: JobSpec, model_id: str, payload_format: int | None) -> dict:
    """What shaped a shard's bytes beyond the spec's fingerprint: the anonymizer model (its artifact hash:
    the shipped default can change between versions) and the payload format it wrote (``payload_format``: the
    run's layout version, for reversible g2face). Done markers record it, so that a resumed run never mixes
    shards of two models or payload formats under one run.json."""
    an = spec.anonymizer
    reversible = an.method == "g2face" and an.payload == "reversible"
    return {"model_id": model_id, "payload_format": payload_format if reversible else None}


def check_model_id(an, loaded: str, expected: str | None) -> None:
    """Stop when a worker's model is not the one the run started with (run.json, the done markers and every
    payload name the driver's): the weights file was replaced while the run went on."""
    if expected is None or loaded == expected:
        return
    from .models import WeightsError

    where = (f"the {an.method} anonymizer" if an.method != "g2face"
             else f"anonymizer.official.g2face {an.official.g2face}" if getattr(an, "weights", "shipped") == "official"
             else f"anonymizer.checkpoint {an.checkpoint}" if an.checkpoint else "the shipped model")
    raise WeightsError(f"{where} changed after the run started: this worker loaded {loaded}, the run started with "
                       f"{expected}; put the original file back, or start a new run in a new output.dir")


class ShardWorker:
    """Processes whole shards. ``setup()`` loads the models once; ``process_shard`` is called per shard.

    Args:
        spec: the validated job.
        pseudonym_key: HMAC key for output keys (None when output.keys is 'keep').
        key_id: id of the master key, recorded in done markers (never the key).
        fingerprint: spec fingerprint, recorded in done markers so that a resumed run with another config is refused.
        torch_threads: intra-op threads for this worker (0 leaves torch's default).
        device: overrides runtime.device (the Ray adapter pins GPU-less actors to the CPU).
        remote_anonymizers: method -> anonymizer that runs elsewhere (the Ray adapter's GPU model pool); other
            methods are built locally.
        expected_model_id: the model id the driver loaded and run.json records; a worker that loads another
            (the checkpoint file replaced since the run started) stops instead of writing shards of it.
    """

    def __init__(
        self,
        spec: JobSpec,
        pseudonym_key: bytes | None,
        key_id: str | None,
        fingerprint: str,
        torch_threads: int = 0,
        device: str | None = None,
        remote_anonymizers: dict | None = None,
        expected_model_id: str | None = None,
    ):
        self.spec = spec
        self.expected_model_id = expected_model_id
        self.pseudonym_key = pseudonym_key
        self.key_id = key_id
        self.fingerprint = fingerprint
        self.torch_threads = torch_threads
        self.device = device
        self.remote_anonymizers = remote_anonymizers or {}
        self.layout = OutputLayout(spec.output.dir)
        self.stages = None
        self.device_label = None  # set by setup()

    def setup(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        spec = self.spec
        device = resolve_device(self.device or spec.runtime.device)
        self.device_label = device_label(device)
        fail_fast = spec.policy.on_error == "fail"
        an = spec.anonymizer
        methods = {an.method} | ({an.fallback} if an.fallback != "withhold" else set())
        anonymizers = {
            m: self.remote_anonymizers.get(m) or anonymizer_for(an, m)
            for m in sorted(methods)
        }
        payload_mode = an.payload if an.method == "g2face" else None
        if payload_mode and hasattr(anonymizers["g2face"], "set_payload_mode"):
            anonymizers["g2face"].set_payload_mode(payload_mode)
        self.model_id = anonymizers[an.method].model_id
        check_model_id(an, self.model_id, self.expected_model_id)
        verifier = self._payload_setup(anonymizers, payload_mode)
        det = spec.detection
        draws, draw_checker, *push = self._draws(det)
        self.stages = [
            DecodeStage(spec.input.max_pixels, spec.output.metadata.exif == "keep", fail_fast),
            DetectStage(
                det.min_face_size,
                det.stage_thresholds,
                det.scale_factor,
                det.low_score_threshold,
                det.max_side,
                spec.input.aligned,
                an.resolution,
                device,
                fail_fast,
            ),
            AlignStage(
                an.resolution, an.method, an.fallback, an.min_size, det.score_threshold, spec.seed,
                spec.policy.on_no_face, fail_fast,
            ),
            AnonymizeStage(anonymizers, spec.resources.anonymize.batch_size, device, fail_fast, payload_mode,
                           self._identity_guard(), an.fallback, draws, draw_checker, *push,
                           image_format=spec.output.image_format),
            PasteEncodeStage(spec.output.image_format, spec.output.jpeg_quality, spec.policy.on_no_face, fail_fast,
                             self._reinforcer(anonymizers["g2face"] if payload_mode else None, payload_mode,
                                              draw_checker), device),
        ]
        if payload_mode:  # always on for g2face, whatever metrics.enabled says; before metrics, which measure the final bytes
            self.stages.append(
                VerifyStage(verifier, an.resolution, an.on_unverified, spec.input.max_pixels,
                            spec.resources.anonymize.batch_size, device, fail_fast)
            )
        if spec.metrics.enabled:
            measurer = self._measurer(device)
            self.stages.append(MetricsStage(measurer, an.resolution, spec.input.aligned, spec.input.max_pixels, fail_fast))
        for st in self.stages:
            st.setup()

    def _reinforcer(self, anonymizer, payload_mode: str | None, draw_checker) -> PayloadReinforcer | None:
        an = self.spec.anonymizer
        if not reinforcement_applies(an) or payload_mode != "reversible":
            return None  # irreversible bits are never read
        settings = ReinforceSettings(an.payload_reinforce_steps, an.payload_reinforce_max_change)
        detection = None
        if an.payload_reinforce_keep_detection:  # the redraw's checker when there is one (set up once)
            detection = draw_checker or self._draw_checker(self.spec.detection)
        return PayloadReinforcer(anonymizer, settings, self.spec.resources.anonymize.batch_size, detection)

    def _draw_checker(self, det) -> DrawChecker:
        m = self.spec.metrics  # judged as the metrics stage will measure the published face
        an = self.spec.anonymizer
        return DrawChecker(an.resolution, an.identity_guard_distance, det.stage_thresholds, det.scale_factor,
                           m.match_iou, m.resolution, self.spec.input.aligned)

    def _draws(self, det) -> tuple[int, DrawChecker | None, float, int, bool]:
        an = self.spec.anonymizer
        if an.method != "g2face" or an.draws <= 1:
            return 1, None, 0.0, 1, False
        return (an.draws, self._draw_checker(det), an.identity_push, an.identity_push_after,
                an.identity_push_hold)

    def _identity_guard(self) -> IdentityGuard | None:
        an = self.spec.anonymizer
        if an.method != "g2face" or an.identity_guard == "off":
            return None
        return IdentityGuard(an.resolution, an.identity_guard_distance, an.identity_guard)

    def _payload_setup(self, anonymizers: dict, payload_mode: str | None):
        """Master key (memory only) and payload context for reversible g2face; returns the model that verifies."""
        self.payload_job, self._master = None, None
        if not payload_mode:
            return None
        an = self.spec.anonymizer
        local = anonymizers["g2face"]
        if not hasattr(local, "extract"):  # runs in the GPU model pool: verify with a local copy of the model
            local = anonymizer_for(an)
            local.set_payload_mode(payload_mode)
            check_model_id(an, local.model_id, self.expected_model_id)  # its hash binds the payloads
        if payload_mode == "reversible":
            from .keys import load_master_key
            from .runner import demo_key_path

            path = self.spec.keys.master or str(demo_key_path(self.spec.output.dir))
            master, kid = load_master_key(path)
            if self.key_id is not None and kid != self.key_id:
                raise RuntimeError(f"keys.master {path} now holds key {kid}, but the run started with {self.key_id}")
            self._master = master
            self.payload_job = PayloadJob.of(self.spec.dataset.id, self.spec.seed, local.artifact_sha256,
                                             local.payload_bits, local.identity_dim)
        return local

    def _set_shard_payload(self, shard: str) -> None:
        if self.payload_job is None:
            return
        from .keys import ShardKey

        sp = ShardPayload(self.payload_job, ShardKey.from_master(self._master, self.spec.dataset.id, shard))
        for st in self.stages:
            if isinstance(st, (AnonymizeStage, VerifyStage)):
                st.payload = sp

    def _measurer(self, device: str) -> FaceMeasurer:
        m, det = self.spec.metrics, self.spec.detection
        return FaceMeasurer(
            m.resolution, m.match_iou, m.hog_upsample, m.batch_size, det.stage_thresholds, det.scale_factor, device,
            recognizer_of(m),
        )

    # -- keys and fields ---------------------------------------------------------------------------

    def output_key(self, original: str | None) -> str | None:
        if original is None or self.pseudonym_key is None:
            return original
        return pseudonymize(self.pseudonym_key, original)

    def _allowed_tar_fields(self, raw: RawSample) -> list[tuple[str, bytes]]:
        allow = self.spec.output.metadata.fields
        out = []
        for ext in sorted(raw.fields):
            if ext == raw.image_field:
                continue
            if ext in allow:
                out.append((ext, raw.fields[ext]))
                continue
            subkeys = [a.split(".", 1)[1] for a in allow if a.startswith(ext + ".")]
            if subkeys and ext == "json":
                try:
                    doc = json.loads(raw.fields[ext])
                except ValueError:
                    continue  # unreadable JSON is dropped, never passed through
                kept = {k: doc[k] for k in subkeys if isinstance(doc, dict) and k in doc}
                out.append((ext, json.dumps(kept, sort_keys=True).encode("utf-8")))
        return out

    # -- the shard -----------------------------------------------------------------------------------

    def _samples(self, url: str, name: str):
        inp = self.spec.input
        if inp.format == "webdataset":
            return None, read_webdataset(url, inp.image_column)
        stem = name.rsplit(".", 1)[0]
        return read_parquet(url, inp.image_column, inp.key_column, stem)

    def _run_stages(self, batch: list[Sample]) -> list[Sample]:
        for st in self.stages:
            batch = st.process(batch)
        return batch

    def process_shard(self, url: str) -> dict:
        if self.stages is None:
            self.setup()
        t0 = time.perf_counter()
        name = storage.shard_name(url)
        self._set_shard_payload(name)
        schema, samples = self._samples(url, name)
        self._image_struct = schema is not None and pa.types.is_struct(schema.field(self.spec.input.image_column).type)
        batch_size = self.spec.resources.detect.batch_size
        public_rows: list[dict] = []
        private_rows: list[dict] = []
        records: list[tuple[str, list[tuple[str, bytes]]]] = []
        parquet_rows: list[dict] = []

        def flush(batch: list[Sample]) -> None:
            try:
                done = self._run_stages(batch)
            except StageError as e:  # policy.on_error: fail; say where, and keep the cause for tracebacks
                raise StageError(f"shard {name}, {e} (policy.on_error is 'fail'; 'withhold' records such a sample and goes on)") from e
            for s in done:
                self._collect(s, name, public_rows, private_rows, records, parquet_rows)

        batch: list[Sample] = []
        for raw in samples:
            batch.append(Sample(raw, out_key=self.output_key(raw.key)))
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)

        if self.spec.input.format == "webdataset":
            storage.atomic_write_file(self.layout.shard(name), lambda f: write_webdataset(f, records))
        else:
            out_schema = self._parquet_out_schema(schema)
            if out_schema is not None:
                storage.atomic_write_file(self.layout.shard(name), lambda f: write_parquet(f, parquet_rows, out_schema))
            else:  # unreadable input: no columns to write; an output left by an earlier attempt must not outlive it
                storage.remove(self.layout.shard(name))
        storage.atomic_write_file(self.layout.manifest(name), lambda f: write_parquet(f, public_rows, PUBLIC_SCHEMA))
        storage.atomic_write_file(self.layout.private(name), lambda f: write_parquet(f, private_rows, PRIVATE_SCHEMA),
                                  storage.PRIVATE_MODE)
        counts = shard_counts(public_rows)
        done = {"shard": name, "fingerprint": self.fingerprint, "key_id": self.key_id, "counts": counts,
                # detection, alignment, paste-back and metrics ran here; the anonymizer too unless a pool ran it
                "device": self.device_label, "anonymizer_pool": bool(self.remote_anonymizers),
                **output_signature(self.spec, self.model_id,
                                   self.payload_job.layout.format_version if self.payload_job else None)}
        storage.atomic_write_bytes(self.layout.done(name), (json.dumps(done, indent=2, sort_keys=True) + "\n").encode())
        return {"shard": name, "counts": counts, "seconds": time.perf_counter() - t0, "pid": os.getpid()}

    def _parquet_out_schema(self, in_schema: pa.Schema | None) -> pa.Schema | None:
        if in_schema is None:
            return None
        inp = self.spec.input
        keep = set(self.spec.output.metadata.fields) | {inp.image_column} | ({inp.key_column} if inp.key_column else set())
        fields = [f for f in in_schema if f.name in keep]
        if not inp.key_column:
            fields.insert(0, pa.field("key", pa.string()))
        fields = [pa.field(f.name, pa.string()) if f.name == inp.key_column else f for f in fields]
        return pa.schema(fields)

    def _collect(self, s: Sample, shard: str, public_rows, private_rows, records, parquet_rows) -> None:
        raw = s.raw
        out_key = self.output_key(raw.key)
        published = s.out_bytes is not None
        h, w = (s.image.rgb.shape[:2]) if s.image is not None else (None, None)
        faces = [
            {
                "box": [float(v) for v in f.box],
                "score": f.score,
                "landmarks": [float(v) for v in f.landmarks.reshape(-1)],
                "method": f.method or None,
                "fallback_reason": f.fallback_reason,
                "size_class": f.size_class or None,
                "paste_box": list(f.paste_box) if f.paste_box else None,
                "metrics": f.metrics,
                "payload_mode": f.payload_mode if published else None,
                "payload_ok": f.payload_ok,
                "payload_status": f.payload_status,
                "payload_ber": f.payload_ber,
                "draw": f.draw if f.method == "g2face" else None,
                "identity_push": f.identity_push if f.method == "g2face" else None,
                "draw_check": f.draw_check if f.method == "g2face" else None,
                "reinforce_share": f.reinforce_share if f.method == "g2face" else None,
            }
            for f in s.faces
        ]
        public_rows.append(
            {
                "shard": shard,
                "index": raw.index,
                "key": out_key,
                "status": check_status(s.status),
                "error": s.error,
                "published": published,
                "width": w,
                "height": h,
                "image_format": s.out_format if published else (s.image.format if s.image else None),
                "n_faces": len(s.faces),
                "faces": faces,
                "model_id": self.model_id if s.faces else None,
                "metrics_error": s.metrics_error,
                "payload_reencoded": s.payload_reencoded if published else None,
                "warnings": list(s.warnings),
            }
        )
        private_rows.append(
            {
                "shard": shard,
                "index": raw.index,
                "key": out_key,
                "original_key": raw.key,
                "input_sha256": s.input_sha256,
                "status": s.status,
                "transforms": [[float(v) for v in f.transform.reshape(-1)] for f in s.faces if f.transform is not None],
            }
        )
        if not published:
            return
        if self.spec.input.format == "webdataset":
            in_ext = raw.image_field
            ext = in_ext if EXT_FORMAT.get(in_ext) == s.out_format else FORMAT_EXT[s.out_format]
            records.append((out_key, [(ext, s.out_bytes)] + self._allowed_tar_fields(raw)))
        else:
            inp = self.spec.input
            row = {k: v for k, v in raw.fields.items() if k in self.spec.output.metadata.fields}
            row[inp.image_column] = {"bytes": s.out_bytes, "path": None} if self._image_struct else s.out_bytes
            row[inp.key_column or "key"] = out_key
            parquet_rows.append(row)


def shard_counts(public_rows: list[dict]) -> dict:
    status = Counter(r["status"] for r in public_rows)
    faces_method: Counter = Counter()
    faces_size: Counter = Counter()
    fallback: Counter = Counter()
    payload: Counter = Counter()
    for r in public_rows:
        for f in r["faces"]:
            if f["payload_mode"]:
                payload[f["payload_mode"]] += 1
            if f["payload_ok"] is False:
                payload["unverified"] += 1
            faces_method[f["method"] or "none"] += 1
            faces_size[f["size_class"] or "unknown"] += 1
            if f["fallback_reason"]:
                fallback[f["fallback_reason"]] += 1
    return {
        "samples": len(public_rows),
        "published": sum(1 for r in public_rows if r["published"]),
        "status": dict(sorted(status.items())),
        "faces": sum(r["n_faces"] for r in public_rows),
        "faces_anonymized": sum(r["n_faces"] for r in public_rows if r["published"]),
        "faces_by_method": dict(sorted(faces_method.items())),
        "faces_by_size": dict(sorted(faces_size.items())),
        "fallback_reasons": dict(sorted(fallback.items())),
        # published g2face faces by payload mode, and reversible payloads that did not verify (whatever happened next)
        "faces_by_payload": dict(sorted(payload.items())),
    }
