"""Pipeline stages: small Ray-free classes with ``setup()`` (load models once) and ``process(batch)``.

A batch is a list of :class:`Sample`; each stage fills in its part and leaves failed samples alone.
A sample that fails gets status ``error`` (or ``withheld``) and a reason; it is never dropped.
Faces are batched across the images of a batch wherever a model runs.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from schemas import load_json

from . import align
from .imaging import DecodedImage, DecodeError, crops_uint8, decode_image, encode_image, output_format, writes_grey
from .redraw import redraw
from .shardio import RawSample
from .thumbnail import encode_thumbnails

_log = logging.getLogger(__name__)
_SIZE_CLASSES = load_json("status.json")["size_class"]


def _brief(e: Exception, limit: int = 200) -> str:
    """An exception as the manifest records it: type and message, cut to ``limit`` characters."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def size_class(side: float) -> str:
    for name, (lo, hi) in _SIZE_CLASSES.items():
        if side >= lo and (hi is None or side < hi):
            return name
    raise AssertionError(side)


def payload_sample_key(published_key: str | None, index: int) -> str:
    """The sample name bound into a payload: the key as published, or '#<row index>' for a sample without one."""
    return published_key if published_key else f"#{index}"


def face_seed(job_seed: int, sample_key: str, face_index: int) -> int:
    """Deterministic per-face seed from (job seed, sample key, face index); ``sample_key`` is seed_sample_key's."""
    h = hashlib.sha256(f"{job_seed}\x00{sample_key}\x00{face_index}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def seed_sample_key(published_key: str | None, original_key: str | None, index: int) -> str:
    """The sample name face seeds derive from: the key as published, else (a sample built without one, as
    `prepare` does) the original key, else the row index. Never the original key of a pseudonymized sample:
    a face's seed fixes its dummy identity and its irreversible payload bits, and the job seed is public
    (run.json), so anyone could test a guessed original key against a published face."""
    if published_key:  # an empty key seeds from the row index, as before this rule
        return published_key
    return original_key or str(index)


@dataclass
class Face:
    box: np.ndarray  # (4,) x1, y1, x2, y2 in image pixels
    score: float
    landmarks: np.ndarray  # (5, 2)
    method: str = ""
    fallback_reason: str | None = None
    size_class: str = ""
    seed: int = 0
    transform: np.ndarray | None = None  # (2, 3) image -> aligned crop
    crop: np.ndarray | None = None  # aligned crop, later the anonymized crop (R, R, 3) uint8
    paste_box: tuple[int, int, int, int] | None = None
    metrics: dict | None = None  # filled by pipeline.metrics_stage: numbers only, never embeddings
    # g2face payload (pipeline.verify): mode as published, and what verification read back from the written bytes
    payload_mode: str | None = None  # 'reversible' | 'irreversible'
    payload_ok: bool | None = None
    payload_status: str | None = None
    payload_ber: float | None = None
    draw: int | None = None  # g2face: which draw of the face's seed sequence is published (pipeline.redraw)
    identity_push: float | None = None  # g2face: that draw's push away from the original (0: the paper's draw)
    draw_check: str | None = None  # g2face with redraws: the check's verdict on the kept draw (redraw.py)
    reinforce_share: float | None = None  # reversible g2face: share of its payload reinforcement kept (1: all)
    payload_sent: np.ndarray | None = None  # the hidden bits (ciphertext + ECC, or random), memory only, until verified


@dataclass
class Sample:
    raw: RawSample
    status: str = "ok"
    error: str | None = None
    input_sha256: str | None = None
    image: DecodedImage | None = None
    faces: list[Face] = field(default_factory=list)
    out_bytes: bytes | None = None
    out_format: str | None = None
    metrics_error: str | None = None  # why this sample's faces have no metrics (the image is still published)
    # what went wrong without stopping the sample (it is still published): reinforcement or redraw skipped
    warnings: list[str] = field(default_factory=list)
    out_key: str | None = None  # the key as published (set by the shard worker); payloads are bound to it
    out_rgb: np.ndarray | None = None  # pasted pixels before encoding, kept until verification (lossless retry)
    payload_reencoded: bool = False  # re-encoded as PNG because a payload did not survive the job's format

    @property
    def live(self) -> bool:
        """Still being processed (not failed, not withheld)."""
        return self.status in ("ok", "no_face") and self.image is not None

    def fail(self, status: str, reason: str) -> None:
        self.status = status
        self.error = reason
        self.out_bytes = None


class StageError(RuntimeError):
    """Raised instead of recording a failure when the job's policy.on_error is 'fail'."""


class _Stage:
    def __init__(self, fail_fast: bool):
        self.fail_fast = fail_fast

    def setup(self) -> None:
        pass

    def _record(self, sample: Sample, status: str, reason: str) -> None:
        if self.fail_fast and status == "error":
            raise StageError(f"sample {sample.raw.index}: {reason}")
        sample.fail(status, reason)


class DecodeStage(_Stage):
    """Bytes -> RGB array (EXIF orientation applied), with input hash for the private manifest.

    Args:
        max_pixels: images with more pixels are errors.
        keep_exif: keep EXIF (minus thumbnail and orientation) for the encoder.
        fail_fast: raise instead of recording errors.
    """

    def __init__(self, max_pixels: int, keep_exif: bool, fail_fast: bool = False):
        super().__init__(fail_fast)
        self.max_pixels = max_pixels
        self.keep_exif = keep_exif

    def process(self, batch: list[Sample]) -> list[Sample]:
        for s in batch:
            raw = s.raw
            if raw.read_error:
                self._record(s, "error", raw.read_error)
                continue
            if raw.image_field is None:
                # Field names are not echoed: with WebDataset's first-dot rule they can hold parts of a name.
                self._record(s, "error", f"no image field in sample ({len(raw.fields)} other member(s); expected "
                             "jpg, jpeg, png or webp, or set input.image_column)")
                continue
            data = raw.fields.get(raw.image_field)
            if not data:
                self._record(s, "error", f"empty image field '{raw.image_field}' (0 bytes)")
                continue
            s.input_sha256 = hashlib.sha256(data).hexdigest()
            try:
                s.image = decode_image(data, self.max_pixels, self.keep_exif)
            except DecodeError as e:
                self._record(s, "error", str(e))
            except Exception as e:  # anything else a hostile file triggers stays this sample's problem
                self._record(s, "error", f"cannot decode image: {type(e).__name__}")
        return batch


class DetectStage(_Stage):
    """MTCNN on every live image; images of equal size run as one batch.

    Args:
        min_face_size, stage_thresholds, scale_factor: MTCNN parameters.
        low_score_threshold: detections below it are discarded.
        max_side: longer images are detected on a downscaled copy.
        aligned: the corpus is already aligned: one face per image under the fixed template.
        resolution: aligned crop side (for the aligned case's synthetic landmarks).
        device: torch device for MTCNN.
    """

    def __init__(
        self,
        min_face_size: int,
        stage_thresholds: tuple[float, float, float],
        scale_factor: float,
        low_score_threshold: float,
        max_side: int,
        aligned: bool,
        resolution: int,
        device: str,
        fail_fast: bool = False,
    ):
        super().__init__(fail_fast)
        self.min_face_size = min_face_size
        self.stage_thresholds = list(stage_thresholds)
        self.scale_factor = scale_factor
        self.low_score_threshold = low_score_threshold
        self.max_side = max_side
        self.aligned = aligned
        self.resolution = resolution
        self.device = device
        self.mtcnn = None

    def setup(self) -> None:
        if self.aligned:
            return
        from facenet_pytorch import MTCNN

        from .models import verify_mtcnn_weights

        verify_mtcnn_weights()
        self.mtcnn = MTCNN(
            min_face_size=self.min_face_size,
            thresholds=self.stage_thresholds,
            factor=self.scale_factor,
            keep_all=True,
            post_process=False,
            select_largest=False,
            device=torch.device(self.device),
        )

    def process(self, batch: list[Sample]) -> list[Sample]:
        live = [s for s in batch if s.live]
        if self.aligned:
            for s in live:
                h, w = s.image.rgb.shape[:2]
                m = align.aligned_image_transform(w, h, self.resolution)
                lms = align.apply_transform(cv2.invertAffineTransform(m), align.template(self.resolution))
                s.faces = [Face(np.array([0, 0, w, h], dtype=np.float64), 1.0, lms, transform=m)]
            return batch
        groups: dict[tuple[int, int], list[tuple[Sample, np.ndarray, float]]] = defaultdict(list)
        for s in live:
            img = s.image.rgb
            h, w = img.shape[:2]
            scale = min(1.0, self.max_side / max(h, w))
            if scale < 1.0:
                img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
            if min(img.shape[:2]) < self.min_face_size:
                s.faces = []  # smaller than the smallest detectable face (MTCNN would raise on it)
                continue
            groups[img.shape[:2]].append((s, img, scale))
        for _, members in sorted(groups.items()):
            try:
                with torch.inference_mode():
                    boxes, probs, points = self.mtcnn.detect([m[1] for m in members], landmarks=True)
            except Exception as e:  # a model failure fails these samples, not the shard
                for s, _, _ in members:
                    self._record(s, "error", f"face detection failed: {type(e).__name__}: {e}")
                continue
            for (s, _, scale), b, p, lm in zip(members, boxes, probs, points):
                faces = []
                if b is not None:
                    for bi, pi, li in zip(b, p, lm):
                        if pi is None or float(pi) < self.low_score_threshold:
                            continue
                        faces.append(
                            Face(np.asarray(bi, np.float64) / scale, float(pi), np.asarray(li, np.float64) / scale)
                        )
                # Stable order: top-to-bottom, left-to-right, so face indices (and seeds) are reproducible.
                faces.sort(key=lambda f: (round(f.box[1], 3), round(f.box[0], 3)))
                s.faces = faces
        return batch


class AlignStage(_Stage):
    """Choose each face's method (job method or fallback) and warp it to the aligned crop.

    Args:
        resolution: aligned crop side.
        method: the job's anonymizer method.
        fallback: method for small / low-score faces, or 'withhold'.
        min_size: faces with a box side below it get the fallback.
        score_threshold: faces scoring below it get the fallback.
        seed: job seed for per-face seeds.
        on_no_face: 'pass' publishes images without faces, 'withhold' withholds them.
    """

    def __init__(
        self,
        resolution: int,
        method: str,
        fallback: str,
        min_size: int,
        score_threshold: float,
        seed: int,
        on_no_face: str,
        fail_fast: bool = False,
    ):
        super().__init__(fail_fast)
        self.resolution = resolution
        self.method = method
        self.fallback = fallback
        self.min_size = min_size
        self.score_threshold = score_threshold
        self.seed = seed
        self.on_no_face = on_no_face

    def process(self, batch: list[Sample]) -> list[Sample]:
        for s in batch:
            if not s.live:
                continue
            if not s.faces:
                s.status = "no_face"
                continue
            needs_fallback = 0
            for i, f in enumerate(s.faces):
                w, h = f.box[2] - f.box[0], f.box[3] - f.box[1]
                side = float(max(w, h))
                f.size_class = size_class(side)
                f.seed = face_seed(self.seed, seed_sample_key(s.out_key, s.raw.key, s.raw.index), i)
                if side < self.min_size:
                    f.fallback_reason = "too_small"
                elif f.score < self.score_threshold:
                    f.fallback_reason = "low_score"
                f.method = self.fallback if f.fallback_reason else self.method
                needs_fallback += f.fallback_reason is not None
            if needs_fallback and self.fallback == "withhold":
                reasons = sorted({f.fallback_reason for f in s.faces if f.fallback_reason})
                s.fail(
                    "withheld",
                    f"{needs_fallback} face(s) need the fallback ({', '.join(reasons)}) and anonymizer.fallback is 'withhold'",
                )
                continue
            try:
                for f in s.faces:
                    if f.transform is None:
                        f.transform = align.landmark_transform(f.landmarks, self.resolution)
                    f.crop = align.warp_to_crop(s.image.rgb, f.transform, self.resolution)
            except Exception as e:
                # A face we cannot align cannot be anonymized: never publish the image as it is.
                self._record(s, "error", f"face alignment failed: {type(e).__name__}: {e}")
        return batch


# What the identity guard found, by the fallback reason it records.
_GUARD_FINDINGS = {
    "identity_match": "the G2Face output still matches the original identity (dlib distance below {} on the "
                      "aligned crop, or within the redraw check's margin of it as published)",
    "identity_unchecked": "the redraw check failed, so nothing confirmed that the G2Face output as published no "
                          "longer matches the original identity",
}


class AnonymizeStage(_Stage):
    """Run each method on all of its faces across the batch, ``batch_size`` faces at a time.

    Args:
        anonymizers: method name -> anonymizer (``pipeline.anonymizers`` interface).
        batch_size: faces per forward pass.
        device: torch device the crops are moved to.
        payload_mode: for method g2face: 'reversible' or 'irreversible' (None for jobs of other methods).
        identity_guard: a ``pipeline.identity_guard.IdentityGuard`` checking every g2face output against its
            original (None: off); a face that still matches gets ``fallback`` (reason ``identity_match``) or,
            with action 'withhold' or fallback 'withhold', its image is withheld. With redraws, a face also
            still matches when the draw checker judged its kept draw, as it will be published, not anonymized
            (``pipeline.redraw``): the bare crop alone missed faces that the published image still shows.
        fallback: the job's fallback method (a key of ``anonymizers``) or 'withhold'.
        draws: g2face draws per face at most; a draw that ``draw_checker`` rejects is drawn again
            (``pipeline.redraw``; 1: every face keeps its first draw).
        draw_checker: a ``pipeline.redraw.DrawChecker`` (needed when ``draws`` > 1).
        identity_push, identity_push_after: from draw ``identity_push_after`` on, faces that no draw anonymized
            yet are drawn pushed away from the original (``pipeline.redraw.push_strength``; 0: never).
        identity_push_hold: a face only a pushed draw anonymized is drawn on with weaker pushes, not plainly
            (``pipeline.redraw.redraw``'s ``push_hold``).
        image_format: the job's ``output.image_format`` ('keep', 'png', 'jpeg'): with it the draw checker
            knows which images are written in grey (``imaging.writes_grey``) and judges their draws in grey.

    Reversible g2face: the shard worker sets ``payload`` (a ``pipeline.verify.ShardPayload``) before each
    shard; each face's identity embedding is encoded into its payload bits here and never kept.
    """

    def __init__(self, anonymizers: dict, batch_size: int, device: str, fail_fast: bool = False,
                 payload_mode: str | None = None, identity_guard=None, fallback: str = "pixelate",
                 draws: int = 1, draw_checker=None, identity_push: float = 0.0, identity_push_after: int = 8,
                 identity_push_hold: bool = True, image_format: str = "keep"):
        super().__init__(fail_fast)
        if draws > 1 and draw_checker is None:
            raise ValueError("draws > 1 needs a draw_checker (pipeline.redraw.DrawChecker)")
        self.anonymizers = anonymizers
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.payload_mode = payload_mode
        self.payload = None
        self.identity_guard = identity_guard
        self.fallback = fallback
        self.draws = draws
        self.draw_checker = draw_checker
        self.identity_push = float(identity_push)
        self.identity_push_after = int(identity_push_after)
        self.identity_push_hold = bool(identity_push_hold)
        self.image_format = image_format

    def _g2face(self, model, x: torch.Tensor, chunk: list) -> tuple[torch.Tensor, np.ndarray | None]:
        """The chunk's outputs and, with redraws, the published-look verdicts for the guard (``_drawn``)."""
        seeds = [f.seed for _, _, f in chunk]
        if self.payload_mode != "reversible":
            # seeded random bits (pipeline.g2face_method.irreversible_bits), drawn again with each draw's seed
            return self._drawn(model, x, chunk, seeds, model.anonymize(x, seeds))
        if self.payload is None:
            raise RuntimeError("reversible g2face without a shard payload key (the shard worker sets it)")
        identity = model.identity_embeddings(x)
        emb = identity.float().cpu().numpy()
        # version 4 and 5 payloads also carry the original face's low frequencies, for the key holder's recovery
        kind = self.payload.job.thumbnail_kind
        thumbs = encode_thumbnails(x, kind) if kind else [None] * len(chunk)
        bits = np.stack([
            self.payload.encode(e, payload_sample_key(s.out_key, s.raw.index), i, t)
            for (s, i, _), e, t in zip(chunk, emb, thumbs)
        ])
        del emb, thumbs
        for (_, _, f), b in zip(chunk, bits):
            f.payload_sent = b
        payload_bits = torch.from_numpy(bits)
        y = model.anonymize(x, seeds, payload_bits=payload_bits, identity=identity)
        return self._drawn(model, x, chunk, seeds, y, payload_bits=payload_bits, identity=identity)

    def _drawn(self, model, x: torch.Tensor, chunk: list, seeds: list[int], y: torch.Tensor,
               **inputs) -> tuple[torch.Tensor, np.ndarray | None]:
        """``y`` with each face that fails the draw checks drawn again (``pipeline.redraw``); records the draw,
        its push and the check's verdict on it.
        Also returns, per face, what the published-look identity check says for the guard (None without
        redraws): 'identity_match' (the kept draw still shows the person), 'identity_unchecked' (the redraw
        failed, so nothing judged it) or '' (anonymized)."""
        kept, pushed = np.zeros(len(chunk), np.int64), np.zeros(len(chunk))
        published, checked = None, [None] * len(chunk)
        if self.draws > 1:
            checker = self.draw_checker
            try:
                reference = checker.reference([(s.image.rgb, f.transform, f.box) for s, _, f in chunk],
                                              [self.published_in_grey(s.image) for s, _, _ in chunk])
                redrawn, kept_now, verdict, pushed_now = redraw(
                    model.anonymize, checker, reference, x, y, seeds, self.draws, self.identity_push,
                    self.identity_push_after, self.identity_push_hold, **inputs)
                published_now = np.where(verdict.anonymized, "", "identity_match")
                checked_now = list(verdict.outcomes())
                del reference, verdict
                # taken together, so that a failure above leaves the first draws and their records
                y, kept, pushed, published, checked = redrawn, kept_now, pushed_now, published_now, checked_now
            except Exception as e:
                # Redrawing only improves on the first draws, which are real outputs: keep them rather than
                # lose the images. Nothing judged how they look as published, so the guard gives them its
                # fallback unless it is off.
                if self.fail_fast:
                    raise
                _log.warning("redraw failed, keeping the first draws of %d face(s): %s: %s", len(chunk),
                             type(e).__name__, e)
                kept, pushed = np.zeros(len(chunk), np.int64), np.zeros(len(chunk))
                published = np.full(len(chunk), "identity_unchecked")
                checked = ["unchecked"] * len(chunk)
                for sample in {id(s): s for s, _, _ in chunk}.values():
                    sample.warnings.append(f"redraw failed, first draws kept: {_brief(e)}")
        for (_, _, f), k, p, c in zip(chunk, kept, pushed, checked):
            f.draw, f.identity_push, f.draw_check = int(k), float(p), c
        return y, published

    def published_in_grey(self, image: DecodedImage) -> bool:
        """The encoder writes this image in grey (``imaging.writes_grey`` under the job's output format)."""
        return writes_grey(image.mode, image.alpha, output_format(image.format, self.image_format))

    def setup(self) -> None:
        for a in self.anonymizers.values():
            a.setup(self.device)
        if self.identity_guard is not None:
            self.identity_guard.setup(self.device)
        if self.draws > 1:
            self.draw_checker.setup(self.device)

    def _guard(self, x: torch.Tensor, y: torch.Tensor, chunk: list, published: np.ndarray | None) -> torch.Tensor:
        """Faces of this g2face chunk that still match their originals get the fallback (or withhold): on the
        bare crops, or as the published image will show them (``published``, from ``_drawn``)."""
        guard = self.identity_guard
        reasons = np.where(guard.still_matches(x, y), "identity_match", "").astype(object)
        if published is not None:
            reasons = np.where(reasons != "", reasons, published)
        idx = np.flatnonzero(reasons != "")
        if idx.size == 0:
            return y
        if guard.action == "withhold" or self.fallback == "withhold":
            why = ("anonymizer.identity_guard is 'withhold'" if guard.action == "withhold"
                   else "anonymizer.fallback is 'withhold'")
            for j in idx:
                s, i, f = chunk[j]
                f.payload_sent = None
                if s.live:
                    finding = _GUARD_FINDINGS[str(reasons[j])].format(guard.max_distance)
                    s.fail("withheld", f"face {i}: {finding} and {why}")
            return y
        y = y.clone()
        y[idx] = self.anonymizers[self.fallback].anonymize(x[idx], [chunk[j][2].seed for j in idx])
        for j in idx:
            f = chunk[j][2]
            f.method, f.fallback_reason, f.payload_sent, f.draw, f.identity_push, f.draw_check = (
                self.fallback, str(reasons[j]), None, None, None, None)
        return y

    def process(self, batch: list[Sample]) -> list[Sample]:
        by_method: dict[str, list[tuple[Sample, int, Face]]] = defaultdict(list)
        for s in batch:
            if s.live:
                for i, f in enumerate(s.faces):
                    by_method[f.method].append((s, i, f))
        for method, items in by_method.items():
            model = self.anonymizers[method]
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                try:
                    crops = np.stack([f.crop for _, _, f in chunk])
                    x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
                    with torch.inference_mode():
                        published = None
                        if method == "g2face":
                            y, published = self._g2face(model, x, chunk)
                        else:
                            y = model.anonymize(x, [f.seed for _, _, f in chunk])
                        if y.shape != x.shape:
                            raise RuntimeError(f"anonymizer returned shape {tuple(y.shape)} for input {tuple(x.shape)}")
                        if method == "g2face" and self.identity_guard is not None:
                            y = self._guard(x, y, chunk, published)
                except Exception as e:
                    if self.fail_fast:
                        raise
                    for s, _, _ in chunk:
                        if s.live:
                            s.fail("withheld", f"anonymizer {method} failed: {type(e).__name__}: {e}")
                    continue
                out = crops_uint8(y)
                for (_, _, f), crop in zip(chunk, out):
                    f.crop = np.ascontiguousarray(crop)
                    if f.method == "g2face":
                        f.payload_mode = self.payload_mode or "irreversible"
        return batch


class PasteEncodeStage(_Stage):
    """Paste anonymized crops back (feathered, inverse transform) and encode the output image.

    Args:
        image_format: 'keep' | 'png' | 'jpeg'.
        jpeg_quality: quality of JPEG/WebP output.
        on_no_face: 'pass' or 'withhold' for images without faces.
        reinforcer: a ``pipeline.payload_reinforce.PayloadReinforcer`` (None: no payload reinforcement).
        device: torch device of the reinforcer's detection check.
    """

    def __init__(self, image_format: str, jpeg_quality: int, on_no_face: str, fail_fast: bool = False,
                 reinforcer=None, device: str = "cpu"):
        super().__init__(fail_fast)
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.on_no_face = on_no_face
        self.reinforcer = reinforcer
        self.device = torch.device(device)

    def setup(self) -> None:
        if self.reinforcer is not None:
            self.reinforcer.setup(self.device)

    def _reinforce(self, batch: list[Sample]) -> None:
        """Payload reinforcement (``pipeline.payload_reinforce``) of the batch's reversible g2face faces."""
        fmt_of = {i: output_format(s.image.format, self.image_format) for i, s in enumerate(batch)
                  if s.live and s.image is not None}
        try:
            self.reinforcer.reinforce(batch, fmt_of, self.jpeg_quality)
            return
        except Exception:
            pass  # one bad image must not cost the batch its reinforcement: retry image by image
        for i in fmt_of:
            try:
                self.reinforcer.reinforce(batch, {i: fmt_of[i]}, self.jpeg_quality)
            except Exception as e:
                if self.fail_fast:
                    raise StageError(f"sample {batch[i].raw.index}: payload reinforcement failed: "
                                     f"{type(e).__name__}: {e}") from e
                # Published unreinforced; verification still decides whether its payload reads back.
                _log.warning("sample %s: payload reinforcement skipped (%s)", batch[i].raw.index, type(e).__name__)
                batch[i].warnings.append(f"payload reinforcement skipped: {_brief(e)}")

    def process(self, batch: list[Sample]) -> list[Sample]:
        if self.reinforcer is not None:
            self._reinforce(batch)
        for s in batch:
            if not s.live:
                continue
            if s.status == "no_face" and self.on_no_face == "withhold":
                s.error = "no face detected and policy.on_no_face is 'withhold'"
                continue
            img = s.image
            rgb = img.rgb.copy()
            try:
                for f in s.faces:
                    f.paste_box = align.paste_back(rgb, f.crop, f.transform)
                    if f.paste_box is None:
                        raise ValueError("face lies outside the image after alignment")
                fmt = output_format(img.format, self.image_format)
                s.out_bytes = encode_image(rgb, img.alpha, img.mode, fmt, self.jpeg_quality, img.icc_profile, img.exif)
                s.out_format = fmt
                if any(f.method == "g2face" for f in s.faces):
                    s.out_rgb = rgb  # for the verification stage's lossless retry
            except Exception as e:
                self._record(s, "error", f"paste-back/encode failed: {type(e).__name__}: {e}")
        return batch
