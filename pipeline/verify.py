"""The g2face payload in the pipeline: what each face hides, and the verification stage of `run`.

``ShardPayload`` binds one shard's key (``pipeline.keys.ShardKey``) to the job's public context (dataset
id, job seed, the model artifact's sha256 and the payload layout) and encodes / decodes the payload of
one face, named by its published sample key and its index in the manifest's face order. The key stays
in memory; nothing here writes it, the plaintext or the embedding anywhere.

``VerifyStage`` runs after paste-back and encoding, always (it does not depend on ``metrics.enabled``):
it decodes the bytes actually written, re-aligns each g2face face with its stored transform (no
re-detection), extracts the bits and decodes and authenticates them. Per face it records ``payload_ok``,
``payload_status`` and the raw bit error rate; a reversible face whose payload does not verify is
handled by ``anonymizer.on_unverified`` and never labelled reversible.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import align
from .imaging import decode_image, encode_image
from .keys import ShardKey
from .payload import THUMBNAIL_FORMS, THUMBNAIL_FROM_VERSION, DecodeResult, PayloadContext, PayloadLayout, decode, encode, writing_version
from .stages import Face, Sample, _Stage, _brief, payload_sample_key
from .thumbnail import THUMBNAIL_KIND2, kind2_tables

EMBEDDING_DIM = 128  # the dlib identity embedding the g2face method hides
ON_UNVERIFIED = ("reencode_lossless", "irreversible", "withhold")


@dataclass(frozen=True)
class PayloadJob:
    """The public half of a job's payload context (no key material)."""

    dataset_id: str
    seed: int
    artifact_sha256: str  # the hiding model; bound into every payload as its model id
    layout: PayloadLayout

    @classmethod
    def of(cls, dataset_id: str, seed: int, artifact_sha256: str, capacity_bits: int,
           embedding_dim: int = EMBEDDING_DIM, format_version: int | None = None) -> "PayloadJob":
        """format_version: the payload format of the run (None, for new runs: ``payload.writing_version``; a
        recovery reads run.json's ``payload.layout.format_version``)."""
        if format_version is None:
            format_version = writing_version(capacity_bits, embedding_dim)
        job = cls(dataset_id, seed, artifact_sha256, PayloadLayout(capacity_bits, embedding_dim, format_version))
        if job.thumbnail_kind == THUMBNAIL_KIND2:
            kind2_tables()  # part of the format: a missing or changed tables file stops the run or recovery here
        return job

    @property
    def carries_thumbnail(self) -> bool:
        return self.layout.format_version >= THUMBNAIL_FROM_VERSION

    @property
    def thumbnail_kind(self) -> int | None:
        """The kind of face thumbnail the run's payloads carry (``pipeline.thumbnail``), None for none."""
        return THUMBNAIL_FORMS[self.layout.format_version][0] if self.carries_thumbnail else None


def run_payload_job(run_doc: dict, dataset_id: str, seed: int, model) -> PayloadJob:
    """The payload job a finished run wrote with: the layout recorded in its run.json (format version,
    capacity, embedding size), checked against the model that will read it."""
    layout = (run_doc.get("payload") or {}).get("layout") or {}
    capacity = layout.get("capacity_bits", model.payload_bits)
    if capacity != model.payload_bits:
        raise ValueError(f"run.json records payloads of {capacity} bits, but the model carries {model.payload_bits}; "
                         "use the run's own model")
    return PayloadJob.of(dataset_id, seed, model.artifact_sha256, capacity,
                         layout.get("embedding_dim", model.identity_dim), layout.get("format_version", 1))


class ShardPayload:
    """Encodes and decodes the payloads of one shard's faces under that shard's key."""

    def __init__(self, job: PayloadJob, key: ShardKey):
        self.job = job
        self.key = key
        self.shard = key.shard

    def context(self, sample_key: str, face_index: int) -> PayloadContext:
        j = self.job
        return PayloadContext(j.dataset_id, self.shard, sample_key, face_index, j.artifact_sha256, j.seed)

    def encode(self, embedding: np.ndarray, sample_key: str, face_index: int, thumbnail: bytes | None = None) -> np.ndarray:
        return encode(np.asarray(embedding, np.float32), self.context(sample_key, face_index), self.key, self.job.layout,
                      thumbnail)

    def decode(self, logits, sample_key: str, face_index: int) -> DecodeResult:
        return decode(logits, self.context(sample_key, face_index), self.key, self.job.layout)


def crops_tensor(crops: list[np.ndarray] | np.ndarray, device) -> torch.Tensor:
    """uint8 crops (N of (R, R, 3)) -> float (N, 3, R, R) in [0, 1] on ``device``."""
    return torch.from_numpy(np.stack(crops)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def extract_logits(model, crops: list[np.ndarray], device, batch_size: int) -> list[np.ndarray]:
    """Bit logits of each uint8 crop, ``batch_size`` crops per pass."""
    out = []
    for start in range(0, len(crops), batch_size):
        with torch.inference_mode():
            logits = model.extract(crops_tensor(crops[start : start + batch_size], device))
        out.extend(logits.float().cpu().numpy())
    return out


class VerifyStage(_Stage):
    """Read every g2face face's payload back from the written bytes and act on failures.

    Args:
        model: the g2face anonymizer (its ``extract`` reads bits from crops in [0, 1]).
        resolution: aligned crop side.
        on_unverified: 'reencode_lossless' | 'irreversible' | 'withhold' (see ``AnonymizerSpec.on_unverified``).
        max_pixels: decode cap for the written images.
        batch_size: crops per extractor pass.
        device: torch device of the extractor.
    The shard worker sets ``payload`` (a ShardPayload, or None in irreversible mode) before each shard.
    """

    def __init__(self, model, resolution: int, on_unverified: str, max_pixels: int, batch_size: int, device: str,
                 fail_fast: bool = False):
        super().__init__(fail_fast)
        if on_unverified not in ON_UNVERIFIED:
            raise ValueError(f"anonymizer.on_unverified must be one of {ON_UNVERIFIED}, got {on_unverified!r}")
        self.model = model
        self.resolution = resolution
        self.on_unverified = on_unverified
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.payload: ShardPayload | None = None

    def setup(self) -> None:
        net = getattr(self.model, "model", None)
        if net is not None:  # a copy built only to verify is still on the CPU
            self.model.model = net.to(self.device)

    def _measure(self, samples: list[Sample]) -> None:
        """Fill payload_ok / payload_status / payload_ber of every g2face face of these samples."""
        items: list[tuple[Sample, int, Face]] = []
        crops: list[np.ndarray] = []
        for s in samples:
            try:
                rgb = decode_image(s.out_bytes, max(self.max_pixels, s.image.rgb.size)).rgb
                for i, f in enumerate(s.faces):
                    if f.method == "g2face":
                        crops.append(align.warp_to_crop(rgb, f.transform, self.resolution))
                        items.append((s, i, f))
            except Exception as e:
                self._record(s, "error", f"payload verification could not read the written image: {type(e).__name__}: {e}")
        if not crops:
            return
        from .g2face_method import irreversible_bits
        from .redraw import draw_seed

        try:
            all_logits = extract_logits(self.model, crops, self.device, self.batch_size)
        except Exception as e:  # a model failure (out of memory, ...) fails these samples, not the shard
            for s in {id(s): s for s, _, _ in items}.values():
                self._unchecked(s, f"payload verification failed: {_brief(e)}")
            return
        for (s, i, f), logits in zip(items, all_logits):
            if not s.live:  # an earlier face of it failed
                continue
            if f.payload_mode == "reversible":
                try:
                    res = self.payload.decode(logits, payload_sample_key(s.out_key, s.raw.index), i)
                except Exception as e:
                    self._unchecked(s, f"payload verification failed on face {i}: {_brief(e)}")
                    continue
                f.payload_ok, f.payload_status = res.ok, res.status
                sent = f.payload_sent
            else:  # irreversible: nothing to open; the error rate against the known random bits is still telling
                # the bits the kept draw hid: drawn from that draw's seed (pipeline.redraw)
                sent = irreversible_bits([draw_seed(f.seed, f.draw or 0)], logits.size)[0].numpy()
                f.payload_ok, f.payload_status = None, None
            # raw BER against the bits actually hidden (exact, also where decoding failed)
            f.payload_ber = float(np.mean((logits > 0) != (np.asarray(sent) > 0.5))) if sent is not None else None

    def _unchecked(self, s: Sample, reason: str) -> None:
        """A sample whose payloads could not be checked is not published (nothing unverified goes out)."""
        for f in s.faces:
            f.payload_mode = None
        self._record(s, "error", reason)

    @staticmethod
    def _unverified(s: Sample) -> list[int]:
        return [i for i, f in enumerate(s.faces) if f.payload_mode == "reversible" and not f.payload_ok]

    def process(self, batch: list[Sample]) -> list[Sample]:
        todo = [s for s in batch if s.live and s.out_bytes is not None and any(f.method == "g2face" for f in s.faces)]
        if any(f.payload_mode == "reversible" for s in todo for f in s.faces) and self.payload is None:
            raise RuntimeError("reversible faces but no shard payload key was set on the verification stage")
        self._measure(todo)
        todo = [s for s in todo if s.live and self._unverified(s)]
        if self.on_unverified == "reencode_lossless":
            retry = [s for s in todo if s.out_format != "PNG" and s.out_rgb is not None]
            for s in retry:
                img = s.image
                s.out_bytes = encode_image(s.out_rgb, img.alpha, img.mode, "PNG", 100, img.icc_profile, img.exif)
                s.out_format = "PNG"
                s.payload_reencoded = True
            self._measure(retry)
        for s in todo:
            if not s.live:
                continue
            bad = self._unverified(s)
            if not bad:
                continue
            if self.on_unverified == "withhold":
                detail = ", ".join(f"face {i}: {s.faces[i].payload_status}" for i in bad)
                for f in s.faces:
                    f.payload_mode = None  # nothing is published
                s.fail("withheld", f"payload does not verify ({detail}) and anonymizer.on_unverified is 'withhold'")
            else:
                for i in bad:
                    s.faces[i].payload_mode = "irreversible"  # published, but no key can open it
        for s in batch:
            s.out_rgb = None  # only kept for the lossless retry
            for f in s.faces:
                f.payload_sent = None
        return batch
