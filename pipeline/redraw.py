"""Redraw: a G2Face output that still shows the person, or that MTCNN no longer finds, is drawn again.

G2Face draws each face's dummy identity and generator noise from the face's seed, and no single draw succeeds
on every face. Draws of one face succeed or fail largely independently (first 200 val faces, shipped model,
draws 0..3: 12.6% of first draws still match their original, 5.5% of faces match in all four; MTCNN finds
75% of first draws and at least one draw of 92% of faces), so a face whose draw fails a check is drawn again
with the next seed of its sequence (``draw_seed``), up to ``draws`` draws. What the later draws buy is
mostly detection (400 other val faces, all 16 draws judged: MTCNN finds none of the first 8 draws of 5.0% of
faces, none of all 16 of 1.8%; no draw gets past the identity check for 6.5% and 5.8%). The first draw that
passes every check is kept; when none does, the best one (see ``DrawJudgement.rank``). The identity guard
then judges what is kept, on the bare crop and by this checker's verdict on the kept draw (``redraw`` returns
it): a kept draw judged not anonymized here gets the guard's fallback. Every kept face is an output of the
model: nothing here edits pixels.

Checks, on the aligned crops, the way ``pipeline.metrics_stage`` later measures the published faces: each draw
is first pasted into its photo as the published image will show it (made 8-bit, warped back to the photo's
scale through the feathered paste-back mask, ``align.paste_back``) and cut out again at the metrics'
resolution, since what is left of the original around the face (hair, jaw line, background) counts for the
recognizer and the detector too, and since MTCNN can miss a face at the photo's scale that it finds in the
bare draw. What the check cannot see, because it happens after it: the photo's other faces are still the
originals in its patch (a neighbour's replacement reaching into this face's crop is not judged), the payload
reinforcement's few grey levels (``identity_margin`` and ``detection_score`` leave room for them), and the
output's lossy quantisation (JPEG, WebP). An image published in grey (a grey input, ``imaging.writes_grey``)
is judged in grey, as it will be written.

- identity: dlib's ResNet descriptor distance to the original is at least ``max_distance``;
- detection: MTCNN (the job's thresholds) on the crop resized to ``check_resolution`` finds a face with IoU
  >= ``match_iou`` against its detection in the original crop (where MTCNN does not find the original: the
  face's own box mapped into the crop, as the metrics stage does).

Identity push (``push``, the job's ``anonymizer.identity_push``; not in the paper): some faces keep the
person through every plain draw (shipped model, all 6000 val images, 16 plain draws: 282 of 6014 faces, 4.7%),
because the encoder carries the original's appearance into every draw. From draw ``push_after`` on, a face that
no draw has yet got past the identity check is drawn with its style code pushed past its dummy's, away from the
original's (``g2face.model.push_from_original``, strength ``push_strength``). That changes which face the
generator draws, never pixels. Faces that a plain draw got past the identity check and that failed only the
detection check keep plain draws: pushed draws are found less often by MTCNN. A face that only a pushed draw
anonymized, and that MTCNN then missed, is drawn on with weaker pushes (``push_hold``, the job's
``anonymizer.identity_push_hold``): each halfway between the strongest weaker push that left it matching (0,
its plain draws, when none did) and the weakest that anonymized it, since the weaker the push, the more often
MTCNN finds the draw; its plain draws all still matched, so going back to them rarely anonymizes it. Each
face's kept push is recorded (manifest ``identity_push``), so that (seed, draw, push) reproduces it.

Recovery is unaffected: a reversible payload never depends on the draw, and the recover pass draws its noise
and placeholder bits from the face's own seed on its own stream (``g2face.model.STREAM_RECOVER``), never from
the anonymize pass's. (An irreversible face hides random bits from its draw's seed; verification reads them
against that seed.)

Embeddings and image patches live in a ``DrawReference`` only while a chunk is judged; only the verdicts (which
draw is kept, and the check's outcome on it: manifest ``draw_check``) leave the anonymize stage.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from schemas import load_json

from . import align
from .imaging import as_written_grey, crops_uint8


# What the check concluded about each published face's kept draw (manifest ``draw_check``, listed in
# schemas/status.json): see ``DrawJudgement.outcomes``; 'unchecked' when the redraw itself failed and the first
# draws were kept.
DRAW_CHECK_OUTCOMES = tuple(load_json("status.json")["draw_check"])


def draw_seed(seed: int, draw: int) -> int:
    """The seed of draw ``draw`` of a face whose own seed is ``seed``; draw 0 is the face's seed itself."""
    if draw == 0:
        return int(seed)
    h = hashlib.sha256(f"redraw\x00{int(seed)}\x00{int(draw)}".encode()).digest()
    return int.from_bytes(h[:8], "big")


@dataclass(frozen=True)
class DrawJudgement:
    """Verdicts on N draws, each (N,): identity distance to the original, far enough with the margin, MTCNN
    finds the face (job thresholds), and finds it with the margin score."""

    distance: np.ndarray
    anonymized: np.ndarray
    detected: np.ndarray
    confident: np.ndarray

    @property
    def passed(self) -> np.ndarray:
        return self.anonymized & self.confident

    def outcomes(self) -> np.ndarray:
        """Per draw, what the check concluded (manifest ``draw_check``, one of ``DRAW_CHECK_OUTCOMES``): 'passed'
        (anonymized, found with the margin score), 'weak_detection' (anonymized, found only below that score),
        'not_detected' (anonymized, MTCNN misses it) or 'identity_match' (still within the margin of the person)."""
        out = np.where(self.confident, "passed", np.where(self.detected, "weak_detection", "not_detected"))
        return np.where(self.anonymized, out, "identity_match").astype(object)

    def rank(self) -> np.ndarray:
        """Higher is better: anonymized first, then found by MTCNN, then found with the margin, then distance."""
        return self.anonymized * 8.0 + self.detected * 4.0 + self.confident * 2.0 + np.clip(self.distance, 0, 1.99) / 2


@dataclass(frozen=True)
class DrawReference:
    """The originals' dlib embeddings (N, 128) at the check resolution, the box each draw's detection must
    overlap, in crop pixels (the original's MTCNN detection near the face's box, else that box itself), and per
    face the patch of its image a draw is pasted into (``FacePatch``)."""

    embeddings: torch.Tensor
    boxes: list
    patches: list


@dataclass(frozen=True)
class FacePatch:
    """The part of a face's image that its paste-back and its metrics crop read: ``pixels`` (h, w, 3) uint8, a
    view of the image, never written, and ``transform``, the face's job-resolution transform in patch
    coordinates. The patch reaches past the crop's footprint by enough that pasting and re-cropping it gives
    the pixels that doing so on the whole image gives (the footprint's bilinear neighbours, and the blur that
    ``align.warp_to_crop`` applies before shrinking)."""

    pixels: np.ndarray
    transform: np.ndarray
    grey: bool = False  # the image is published in grey (``imaging.writes_grey``): the draw is judged in grey


def face_patch(rgb: np.ndarray, transform: np.ndarray, resolution: int, check_resolution: int,
               grey: bool = False) -> FacePatch:
    """The ``FacePatch`` of one face: ``transform`` maps ``rgb`` to the ``resolution`` crop; ``grey``: the
    image is published in grey."""
    from .metrics_stage import metric_transform

    h, w = rgb.shape[:2]
    if align.paste_region(transform, resolution, w, h) is None:
        raise ValueError("the face's crop lies outside its image")
    scale = align.transform_scale(metric_transform(transform, resolution, check_resolution))
    # warp_to_crop blurs with sigma 0.25 / scale before shrinking by more than 2x; 4 sigma covers its kernel.
    margin = 4 + (int(np.ceil(4 * 0.25 / scale)) if scale < 0.5 else 0)
    fx0, fy0, fx1, fy1 = align.crop_footprint(transform, resolution)
    x0, x1 = _axis_reach(fx0 - margin, fx1 + margin, w)
    y0, y1 = _axis_reach(fy0 - margin, fy1 + margin, h)
    m = np.array(transform, np.float64, copy=True)
    m[:, 2] += m[:, :2] @ np.array([x0, y0], np.float64)
    return FacePatch(rgb[y0:y1, x0:x1], m, bool(grey))


def _axis_reach(lo: int, hi: int, size: int) -> tuple[int, int]:
    """The pixels [start, end) of an image axis of ``size`` that reads at positions [lo, hi) touch, with the
    image mirrored at its edges as OpenCV's BORDER_REFLECT101 mirrors it (-x reads x, size - 1 + x reads
    size - 1 - x). A patch starting at 0 mirrors there exactly as the image does, and one that covers every
    mirrored read is never mirrored at its own far side (a face centred outside the image reads past its
    footprint's far end there). Reads that mirror twice (a face wider than the image) give the whole axis."""
    start, end = max(lo, 0), min(hi, size)
    if lo < 0:
        end = max(end, -lo + 1)
    if hi > size:
        start = min(start, 2 * size - 1 - hi)
    return max(start, 0), min(end, size)


class DrawChecker:
    """Judge G2Face draws against their originals (see the module docstring).

    Args:
        resolution: the job's aligned crop side.
        max_distance: a draw closer than this to its original (dlib distance) still shows the person (the
            job's ``identity_guard_distance``).
        mtcnn_thresholds: MTCNN's P/R/O-net thresholds (the job's detection thresholds).
        mtcnn_factor: MTCNN's pyramid scale factor (the job's).
        match_iou: IoU the draw's detection needs against the original's (the job's ``metrics.match_iou``).
        check_resolution: side of the crops judged (the job's ``metrics.resolution``): originals are cut from
            the image at this side, draws resized to it.
        aligned: the corpus is pre-aligned (no detected box: the template's face box is the reference).
        identity_margin: a draw passes the identity check only this far beyond ``max_distance``, and
        detection_score: the detection check only with an MTCNN score at least this (above the job's ONet
            threshold), so that a draw passing here still passes on the published image, which the payload
            reinforcement and the encoder change slightly (first 200 val faces: every draw judged at least 0.02
            beyond 0.6 here was also beyond it on the written image).
    """

    def __init__(self, resolution: int, max_distance: float, mtcnn_thresholds=(0.6, 0.7, 0.7),
                 mtcnn_factor: float = 0.709, match_iou: float = 0.5, check_resolution: int = 256,
                 aligned: bool = False, identity_margin: float = 0.03, detection_score: float = 0.9):
        self.resolution = resolution
        self.max_distance = float(max_distance)
        self.mtcnn_thresholds = [float(t) for t in mtcnn_thresholds]
        self.mtcnn_factor = float(mtcnn_factor)
        self.match_iou = float(match_iou)
        self.check_resolution = check_resolution
        self.aligned = aligned
        self.identity_margin = float(identity_margin)
        self.detection_score = float(detection_score)
        self.net = self.mtcnn = None

    def setup(self, device: torch.device) -> None:
        from g2face.identity import load_dlib_face_resnet  # hash-checked, strict

        from .metrics_stage import crop_mtcnn

        if self.mtcnn is not None:  # shared by the anonymize stage and the payload reinforcement: load once
            assert torch.device(device) == self.device, (device, self.device)
            return
        self.device = torch.device(device)
        self.net = load_dlib_face_resnet(device=self.device)
        self.template = align.template(self.check_resolution)
        self.mtcnn = crop_mtcnn(self.check_resolution, self.mtcnn_thresholds, self.mtcnn_factor, self.device)

    @torch.no_grad()
    def embeddings(self, crops: torch.Tensor) -> torch.Tensor:
        """dlib descriptors (N, 128) of uint8 crops (N, C, C, 3) at the check resolution."""
        from g2face.identity import aligned_to_chip

        x = crops.to(self.device).permute(0, 3, 1, 2).float().div(255.0)
        return self.net(aligned_to_chip(x, self.template)).float()

    def boxes(self, crops: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """MTCNN (boxes (k, 4), scores (k,)) per uint8 crop (N, C, C, 3)."""
        with torch.inference_mode():
            found, scores = self.mtcnn.detect(list(crops.cpu().numpy()))
        return [(np.zeros((0, 4)), np.zeros(0)) if b is None else (np.asarray(b, np.float64), np.asarray(p, np.float64))
                for b, p in zip(found, scores)]

    def reference(self, faces: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                  grey: list[bool] | None = None) -> DrawReference:
        """What draws are judged against, from (image RGB uint8, job-resolution transform, detected box in image
        pixels) per face: the originals' embeddings and MTCNN boxes at the check resolution, and each face's
        patch of its photo that draws are pasted into (``face_patch``; ``grey``, per face: its image is
        published in grey, so its draws are judged in grey)."""
        from .metrics_stage import face_crops

        c = self.check_resolution
        crops = np.stack([face_crops(rgb, m, self.resolution, c) for rgb, m, _ in faces])
        originals = torch.from_numpy(crops).to(self.device)
        boxes = self._reference_boxes(originals, [(m, box) for _, m, box in faces])
        grey = [False] * len(faces) if grey is None else list(grey)
        assert len(grey) == len(faces), (len(grey), len(faces))
        patches = [face_patch(rgb, m, self.resolution, c, g) for (rgb, m, _), g in zip(faces, grey)]
        return DrawReference(self.embeddings(originals), boxes, patches)

    def reference_boxes(self, faces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Only the boxes of ``reference`` (no embeddings, no patches), from the same (image, transform, box)."""
        from .metrics_stage import face_crops

        crops = np.stack([face_crops(rgb, m, self.resolution, self.check_resolution) for rgb, m, _ in faces])
        return self._reference_boxes(torch.from_numpy(crops), [(m, box) for _, m, box in faces])

    def _reference_boxes(self, originals: torch.Tensor, faces: list[tuple[np.ndarray, np.ndarray]]) -> list:
        """The box each face's draws must overlap, in check-crop pixels, as the metrics stage matches them: the
        original's MTCNN detection near the face's own box (``originals``: uint8 check crops), else that box."""
        from .metrics_stage import ORIGINAL_MATCH_IOU, aligned_reference_box, box_in_crop, metric_transform

        c = self.check_resolution
        boxes = []
        for (m, box), (found, _) in zip(faces, self.boxes(originals)):
            near = (aligned_reference_box(c) if self.aligned
                    else box_in_crop(box, metric_transform(m, self.resolution, c)))
            j = _best_iou(found, near, ORIGINAL_MATCH_IOU)
            boxes.append(near if j is None else found[j])
        return boxes

    def found(self, seen: np.ndarray, boxes: list[np.ndarray]) -> np.ndarray:
        """(N,) whether MTCNN (the job's thresholds) finds each uint8 check crop ``seen`` (N, C, C, 3) with IoU
        ``match_iou`` against its reference box: the metrics stage's re-detection, on the crops it will read."""
        assert len(seen) == len(boxes) and seen.shape[1:] == (self.check_resolution, self.check_resolution, 3), \
            (seen.shape, len(boxes))
        if len(seen) == 0:
            return np.zeros(0, bool)
        return np.array([_best_iou(b, ref, self.match_iou) is not None
                         for (b, _), ref in zip(self.boxes(torch.from_numpy(np.ascontiguousarray(seen))), boxes)])

    def as_published(self, draws: torch.Tensor, patches: list[FacePatch]) -> torch.Tensor:
        """``render_as_published`` at this checker's resolutions: uint8 (B, C, C, 3) on its device."""
        seen = render_as_published(draws, patches, self.resolution, self.check_resolution)
        return torch.from_numpy(seen).to(self.device)

    def judge(self, reference: DrawReference, draws: torch.Tensor, rows: np.ndarray) -> DrawJudgement:
        """Verdicts on ``draws`` (B, 3, R, R) in [0, 1], draw i against original ``rows[i]`` of ``reference``."""
        assert draws.shape[0] == len(rows) and draws.shape[1:] == (3, self.resolution, self.resolution), draws.shape
        at = torch.as_tensor(np.asarray(rows), device=self.device)
        seen = self.as_published(draws, [reference.patches[i] for i in rows])
        distance = (self.embeddings(seen) - reference.embeddings[at]).norm(dim=1).cpu().numpy()
        detected, confident = np.zeros(len(rows), bool), np.zeros(len(rows), bool)
        for i, (b, score) in enumerate(self.boxes(seen)):
            ref = reference.boxes[rows[i]]
            detected[i] = _best_iou(b, ref, self.match_iou) is not None
            confident[i] = _best_iou(b[score >= self.detection_score], ref, self.match_iou) is not None
        return DrawJudgement(distance.astype(np.float64), distance >= self.max_distance + self.identity_margin,
                             detected, confident)


def render_as_published(draws: torch.Tensor, patches: list[FacePatch], resolution: int,
                        check_resolution: int) -> np.ndarray:
    """Draws (B, 3, R, R) in [0, 1] as the published image will show them: each made 8-bit as the anonymize
    stage makes it, pasted into its face's patch through the inverse alignment and the feathered mask
    (``align.paste_back``, at the photo's own scale), and cut out again at ``check_resolution`` the way the
    metrics stage cuts the written image: uint8 (B, C, C, 3). Judging the bare draw upsampled into the
    original crop instead passed draws that MTCNN finds there but not once resampled to the photo's scale
    (the 56 val images of shard 0 whose faces an evaluation had not re-detected, run again: 5 of the 25 faces
    whose kept draw passed that check were missed as published; 0 of 24 with this one). The published image
    differs from this rendering only by what comes later (module docstring): neighbouring faces' replacements,
    payload reinforcement and a lossy output encoding. A patch of an image published in grey is made grey as
    the encoder makes it."""
    from .metrics_stage import face_crops

    assert draws.ndim == 4 and draws.shape[1:] == (3, resolution, resolution) and len(patches) == draws.shape[0], \
        (draws.shape, len(patches))
    seen = []
    for crop, patch in zip(crops_uint8(draws), patches):
        pixels = patch.pixels.copy()
        align.paste_back(pixels, np.ascontiguousarray(crop), patch.transform)
        if patch.grey:
            pixels = as_written_grey(pixels)
        seen.append(face_crops(pixels, patch.transform, resolution, check_resolution))
    return np.stack(seen)


def push_strength(draw: int, draws: int, push: float, push_after: int) -> float:
    """Strength of ``g2face.model.push_from_original`` for draw ``draw`` of a face that no earlier draw
    anonymized: none before draw ``push_after``, then rising linearly from ``push`` to nearly ``2 * push``
    over the remaining draws (0 turns it off)."""
    if push <= 0 or draw < push_after:
        return 0.0
    return float(push) * (1.0 + (draw - push_after) / max(draws - push_after, 1))


def _best_iou(boxes: np.ndarray, reference: np.ndarray, min_iou: float) -> int | None:
    from .metrics_stage import best_match

    return best_match(boxes, reference, min_iou)


def redraw(anonymize, checker: DrawChecker, reference: DrawReference, x: torch.Tensor, y: torch.Tensor,
           seeds: list[int], draws: int, push: float = 0.0, push_after: int | None = None,
           push_hold: bool = True, **inputs) -> tuple[torch.Tensor, np.ndarray, DrawJudgement, np.ndarray]:
    """Draw again each face of ``y`` (the draw-0 outputs of ``x`` under ``seeds``) that fails a check against
    ``reference`` (``checker.reference`` of the same faces), up to ``draws`` draws in all.
    ``anonymize(x_subset, seeds_subset, **inputs_subset)`` makes draws; ``inputs`` are per-face tensors (payload
    bits, identity) passed along row-aligned. From draw ``push_after`` on, a face none of whose draws so far got
    past the identity check is drawn with its style code pushed away from the original's (``push_strength``,
    passed to ``anonymize`` as ``identity_push``); faces that only failed detection keep plain draws, which
    the push would make harder to find. A face that a pushed draw anonymized but that failed detection is,
    with ``push_hold``, drawn on with pushes halfway between the strongest weaker one that left it matching
    (0 when none did: its plain draws) and the weakest that anonymized it; without, plainly. Returns (kept
    outputs, index of the kept draw per face, the checker's verdicts on the kept draws: the identity guard
    reads them, see ``AnonymizeStage``; the push strength of each kept draw, 0 for a plain one)."""
    assert x.shape == y.shape and len(seeds) == x.shape[0] == len(reference.boxes), (x.shape, y.shape, len(seeds))
    n = x.shape[0]
    kept, kept_push = np.zeros(n, np.int64), np.zeros(n, np.float64)
    push_after = draws if push_after is None else push_after
    if n == 0:
        none = np.zeros(0, bool)
        return y, kept, DrawJudgement(np.zeros(0), none, none, none), kept_push
    rows = np.arange(n)
    verdict = checker.judge(reference, y, rows)
    best = verdict.rank()
    final = {k: getattr(verdict, k).copy() for k in ("distance", "anonymized", "detected", "confident")}
    plain_anonymized = verdict.anonymized.copy()  # draw 0 is always plain
    held = np.full(n, np.inf)  # weakest push strength that anonymized each face (inf: none did)
    below = np.zeros(n)  # strongest push weaker than ``held`` that did not anonymize it (0: the plain draws)
    pending = np.flatnonzero(~verdict.passed)
    y = y.clone()
    for k in range(1, draws):
        if pending.size == 0:
            break
        idx = torch.as_tensor(pending, device=x.device)
        sub = {name: (v[idx.to(v.device)] if isinstance(v, torch.Tensor) else v) for name, v in inputs.items()}
        strength = np.where(plain_anonymized[pending], 0.0, push_strength(k, draws, push, push_after))
        pushed_through = np.isfinite(held[pending])  # a pushed draw anonymized it, no plain one did
        if push_hold:  # halfway between the strongest weaker push that left it matching and the weakest that did not
            strength = np.where(pushed_through, (below[pending] + held[pending]) / 2, strength)
        else:  # plain draws from then on (before push_hold)
            strength = np.where(pushed_through, 0.0, strength)
        if strength.any():  # else the plain call, bit for bit the paper's draw
            sub["identity_push"] = torch.from_numpy(strength).float()
        cand = anonymize(x[idx], [draw_seed(seeds[j], k) for j in pending], **sub)
        assert cand.shape == (len(pending), *x.shape[1:]), cand.shape
        verdict = checker.judge(reference, cand, pending)
        plain_anonymized[pending] |= verdict.anonymized & (strength == 0)
        held[pending] = np.where(verdict.anonymized & (strength > 0), np.minimum(held[pending], strength),
                                 held[pending])
        still_matching = ~verdict.anonymized & (strength > 0) & (strength < held[pending])
        below[pending] = np.where(still_matching, np.maximum(below[pending], strength), below[pending])
        rank = verdict.rank()
        better = rank > best[pending]
        if better.any():
            take = pending[better]
            chosen = cand[torch.as_tensor(np.flatnonzero(better), device=cand.device)]
            y[torch.as_tensor(take, device=y.device)] = chosen.to(y.device, y.dtype)
            best[take] = rank[better]
            kept[take] = k
            kept_push[take] = strength[better]
            for name, values in final.items():
                values[take] = getattr(verdict, name)[better]
        pending = pending[~verdict.passed]
    return y, kept, DrawJudgement(**final), kept_push
