"""Utility and privacy metrics of every published face, measured on the bytes actually written.

For each face the original image and the decoded output are warped with the face's own alignment
transform (scaled to ``metrics.resolution``), so both crops show the face in the same place. On the
pair of aligned crops:

- identity: dlib's ResNet (g2face.identity) on chips cut by ``aligned_to_chip``; Euclidean distance
  (same person below 0.6). Optionally the cosine similarity under a user-supplied ArcFace.
- re-detection: MTCNN and dlib's HOG run on both crops. On the original crop, the detection nearest the
  face's own box (highest IoU, at least ORIGINAL_MATCH_IOU) is the reference; the anonymized crop's face
  is re-detected when a detection reaches ``match_iou`` with it. Box IoU and box distance (mean distance
  of the two corners) compare the two detections; the 5-point distance compares MTCNN's landmarks.
- 68 points and 3D: dlib's predictor runs on both crops in the same box (the original's HOG box, else its
  MTCNN box, else the reference box), so the distance measures how the face changed rather than detector
  jitter (which the box distance reports); the 3DMM (g2face.morphable) is fit to both point sets and
  compared by shape and expression distance (mm) and head rotation angle (degrees).

Pixel distances are in aligned-crop pixels at ``resolution`` (at 256 the template's eye centres are
63 px apart), which makes them comparable across image sizes and with the paper's Table III.
Only numbers reach the manifest: no embedding, landmark or crop leaves this module.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch

from g2face import landmarks as dlib_landmarks
from g2face import metrics as gm
from g2face import morphable
from g2face.identity import aligned_to_chip, load_dlib_face_resnet

from . import align
from .imaging import decode_image
from .stages import Sample, StageError, _Stage

ORIGINAL_MATCH_IOU = 0.3  # the original crop's detection must overlap the face's own box at least this much
# Mean MTCNN box of a template-aligned face, as fractions of the crop side (measured on the demo portraits
# at 256 px: 60.7, 51.7, 196.5, 231.6). The reference box of aligned corpora, whose "box" is the whole image.
ALIGNED_FACE_BOX = (0.237, 0.202, 0.768, 0.905)
# insightface's 112 px ArcFace alignment (eye centres, nose tip, mouth corners), for the optional recognizer.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)

# Manifest field -> meaning; the keys are the manifest's metrics struct (pipeline/manifest.py).
FIELDS = {
    "resolution": "side of the aligned crops the pixel distances are measured in",
    "identity_distance": "dlib descriptor distance original vs anonymized (same person below 0.6)",
    "recognizer_cosine": "cosine similarity under metrics.recognizer_checkpoint (null when none is configured)",
    "mtcnn_original": "MTCNN finds the face in the original aligned crop",
    "mtcnn_redetected": "MTCNN finds it in the anonymized crop (IoU >= metrics.match_iou)",
    "mtcnn_box_iou": "IoU of the two MTCNN boxes",
    "mtcnn_box_distance": "mean distance of the two MTCNN box corners, px",
    "mtcnn_landmark_distance": "mean distance of MTCNN's 5 landmarks, px",
    "hog_original": "dlib HOG finds the face in the original aligned crop",
    "hog_redetected": "dlib HOG finds it in the anonymized crop (IoU >= metrics.match_iou)",
    "hog_box_iou": "IoU of the two HOG boxes",
    "hog_box_distance": "mean distance of the two HOG box corners, px",
    "landmark68_distance": "mean distance of dlib's 68 landmarks (same box on both crops), px",
    "shape_distance": "3DMM identity-shape distance, mm (RMS over the 68 points)",
    "expression_distance": "3DMM expression distance, mm",
    "pose_distance": "head rotation angle between the two fits, degrees",
}


# ---------------------------------------------------------------------------------------------------------
# Plain functions.


def metric_transform(transform: np.ndarray, job_resolution: int, resolution: int) -> np.ndarray:
    """The face's image -> crop transform, rescaled from the job's crop side to the metrics crop side."""
    return np.asarray(transform, np.float64) * (resolution / job_resolution)


def box_in_crop(box: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Axis-aligned bounds (x0, y0, x1, y1) of an image box's corners mapped through m."""
    x0, y0, x1, y1 = np.asarray(box, np.float64)
    pts = align.apply_transform(m, np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]))
    return np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])


def aligned_reference_box(resolution: int) -> np.ndarray:
    return np.asarray(ALIGNED_FACE_BOX, np.float64) * resolution


def box_distance(a, b) -> np.ndarray:
    """Mean Euclidean distance of the top-left and bottom-right corners of box pairs (N,4) -> (N,)."""
    a = np.atleast_2d(np.asarray(a, np.float64))
    b = np.atleast_2d(np.asarray(b, np.float64))
    return 0.5 * (np.linalg.norm(a[:, :2] - b[:, :2], axis=1) + np.linalg.norm(a[:, 2:] - b[:, 2:], axis=1))


def best_match(boxes: np.ndarray, reference: np.ndarray, min_iou: float) -> int | None:
    """Index of the box with the highest IoU against reference, if it reaches min_iou."""
    if boxes is None or len(boxes) == 0:
        return None
    ious = gm.box_iou(np.asarray(boxes, np.float64), np.repeat(np.asarray(reference, np.float64)[None], len(boxes), 0))
    i = int(np.argmax(ious))
    return i if ious[i] >= min_iou else None


def crop_mtcnn(resolution: int, thresholds, factor: float, device: torch.device):
    """MTCNN (hash-checked facenet-pytorch weights) for aligned crops of side ``resolution``, every detection."""
    from facenet_pytorch import MTCNN

    from .models import verify_mtcnn_weights

    verify_mtcnn_weights()
    # An aligned face spans about half the crop (MTCNN's box ~0.53 of its side): nothing below a quarter of it
    # is looked for, which skips the costly fine levels of the image pyramid.
    return MTCNN(min_face_size=max(12, resolution // 4), thresholds=list(thresholds), factor=factor, keep_all=True,
                 post_process=False, select_largest=False, device=device)


def _number(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------------------
# The models.


def recognizer_of(metrics_spec) -> tuple[str, str, str] | None:
    """(checkpoint, arch, sha256) of the job's optional recognizer (metrics.recognizer_*), or None."""
    m = metrics_spec
    return (m.recognizer_checkpoint, m.recognizer_arch, m.recognizer_sha256) if m.recognizer_checkpoint else None


def metric_model_hashes(recognizer: tuple[str, str, str] | None = None) -> dict[str, str]:
    """Check the metric models' files against their pinned hashes before a run; returns {name: sha256}.

    Raises pipeline.models.WeightsError naming the file and the fix.
    """
    from g2face import dlib_format

    from .models import WeightsError, file_sha256

    try:
        resnet = dlib_format.default_model_path()
        predictor = dlib_landmarks.predictor_path()
    except (FileNotFoundError, dlib_landmarks.LandmarkModelError) as e:
        raise WeightsError(f"metrics models: {e} (or set metrics.enabled: false)") from None
    got = file_sha256(resnet)
    if got != dlib_format.MODEL_SHA256:
        raise WeightsError(
            f"metrics: {resnet} has sha256 {got[:16]}..., expected {dlib_format.MODEL_SHA256[:16]}...; reinstall "
            "face_recognition_models==0.3.0 (or set metrics.enabled: false)"
        )
    out = {f"dlib/{resnet.name}": got, f"dlib/{predictor.name}": dlib_landmarks.PREDICTOR_68_SHA256}
    if recognizer is not None:
        path, _, want = recognizer
        if not Path(path).is_file():
            raise WeightsError(f"metrics.recognizer_checkpoint {path} does not exist; fix the path or remove the key")
        got = file_sha256(Path(path))
        if got != want:
            raise WeightsError(
                f"metrics.recognizer_checkpoint {path} has sha256 {got}, but metrics.recognizer_sha256 is {want}: "
                "the file is not the one the job names"
            )
        out[f"recognizer/{Path(path).name}"] = got
    return out


class FaceMeasurer:
    """Metric models (loaded lazily, hash-checked) and the measurement of aligned crop pairs.

    Args:
        resolution: side of the aligned crops passed in.
        match_iou: IoU a re-detection needs against the original's detection.
        hog_upsample: times dlib's HOG detector doubles each crop.
        batch_size: faces per network pass.
        mtcnn_thresholds, mtcnn_factor: MTCNN P/R/O-net thresholds and pyramid factor (the job's).
        device: torch device of the networks.
        recognizer: optional (checkpoint path, arch, sha256) of an ArcFace IResNet.
    """

    def __init__(
        self,
        resolution: int = 256,
        match_iou: float = 0.5,
        hog_upsample: int = 0,
        batch_size: int = 32,
        mtcnn_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        mtcnn_factor: float = 0.709,
        device: str = "cpu",
        recognizer: tuple[str, str, str] | None = None,
    ):
        self.resolution = resolution
        self.match_iou = match_iou
        self.hog_upsample = hog_upsample
        self.batch_size = batch_size
        self.mtcnn_thresholds = list(mtcnn_thresholds)
        self.mtcnn_factor = mtcnn_factor
        self.device = torch.device(device)
        self.recognizer_spec = recognizer
        self._resnet = self._mtcnn = self._recognizer = None
        self._template = align.template(resolution)

    def setup(self) -> None:
        """Load every model now (the stage does this once per worker; errors name the file)."""
        self.resnet()
        self.mtcnn()
        self.recognizer()
        blank = np.zeros((16, 16, 3), np.uint8)  # loads dlib's detector and the hash-checked 68-point predictor
        dlib_landmarks.detect_faces(blank, 0)
        dlib_landmarks.landmarks_68(blank, np.array([[0, 0, 15, 15]]))
        morphable.load_bases()

    def resnet(self):
        if self._resnet is None:
            self._resnet = load_dlib_face_resnet(device=self.device)
        return self._resnet

    def mtcnn(self):
        if self._mtcnn is None:
            self._mtcnn = crop_mtcnn(self.resolution, self.mtcnn_thresholds, self.mtcnn_factor, self.device)
        return self._mtcnn

    def recognizer(self):
        if self._recognizer is None and self.recognizer_spec is not None:
            from g2face.arcface import load_arcface

            path, arch, sha = self.recognizer_spec
            self._recognizer = load_arcface(path, arch, expected_sha256=sha, device=self.device)
        return self._recognizer

    def _check(self, crops: np.ndarray) -> None:
        r = self.resolution
        assert crops.ndim == 4 and crops.shape[1:] == (r, r, 3) and crops.dtype == np.uint8, (crops.shape, crops.dtype)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """dlib descriptors of aligned crops: (N, R, R, 3) uint8 -> (N, 128) float32."""
        self._check(crops)
        out = []
        with torch.inference_mode():
            for i in range(0, len(crops), self.batch_size):
                x = torch.from_numpy(crops[i : i + self.batch_size]).to(self.device).permute(0, 3, 1, 2).float() / 255.0
                out.append(self.resnet()(aligned_to_chip(x, self._template)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 128), np.float32)

    def embed_recognizer(self, crops: np.ndarray) -> np.ndarray | None:
        """Embeddings of the optional ArcFace (insightface alignment, 112 px), or None when none is configured."""
        from g2face.identity import similarity_fit

        net = self.recognizer()
        if net is None:
            return None
        self._check(crops)
        m = similarity_fit(self._template, ARCFACE_TEMPLATE_112)
        out = []
        with torch.inference_mode():
            for i in range(0, len(crops), self.batch_size):
                faces = np.stack(
                    [cv2.warpAffine(c, m, (112, 112), flags=cv2.INTER_LINEAR) for c in crops[i : i + self.batch_size]]
                )
                x = torch.from_numpy(faces).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                out.append(net(x).float().cpu().numpy())
        return np.concatenate(out)

    def detect_mtcnn(self, crops: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """MTCNN on equal-size crops, batched: per crop ((k,4) boxes, (k,5,2) landmarks)."""
        out = []
        for i in range(0, len(crops), self.batch_size):
            with torch.inference_mode():
                boxes, _, points = self.mtcnn().detect(list(crops[i : i + self.batch_size]), landmarks=True)
            for b, p in zip(boxes, points):
                if b is None:
                    out.append((np.zeros((0, 4)), np.zeros((0, 5, 2))))
                else:
                    out.append((np.asarray(b, np.float64), np.asarray(p, np.float64)))
        return out

    def measure(self, originals: np.ndarray, anonymized: np.ndarray, reference_boxes: np.ndarray) -> list[dict]:
        """Metrics of N face pairs: (N,R,R,3) uint8 crops each, (N,4) reference boxes in crop pixels."""
        self._check(originals)
        self._check(anonymized)
        n = len(originals)
        assert anonymized.shape == originals.shape and np.shape(reference_boxes) == (n, 4), np.shape(reference_boxes)
        if n == 0:
            return []
        both = np.concatenate([originals, anonymized])
        emb = self.embed(both)
        id_dist = np.linalg.norm(emb[:n].astype(np.float64) - emb[n:], axis=1)
        rec = self.embed_recognizer(both)
        rec_cos = gm.identity_cosine(rec[:n], rec[n:]) if rec is not None else [None] * n
        mt = self.detect_mtcnn(both)
        hog = [dlib_landmarks.detect_faces(c, self.hog_upsample) for c in both]

        results, predictor_boxes = [], []
        for i in range(n):
            ref = np.asarray(reference_boxes[i], np.float64)
            r = {
                "resolution": self.resolution,
                "identity_distance": _number(id_dist[i]),
                "recognizer_cosine": None if rec_cos[i] is None else _number(rec_cos[i]),
            }
            (bo, po), (ba, pa) = mt[i], mt[n + i]
            mo = best_match(bo, ref, ORIGINAL_MATCH_IOU)
            ma = best_match(ba, bo[mo] if mo is not None else ref, self.match_iou)
            r["mtcnn_original"], r["mtcnn_redetected"] = mo is not None, ma is not None
            both_found = mo is not None and ma is not None
            r["mtcnn_box_iou"] = _number(gm.box_iou(bo[mo], ba[ma])[0]) if both_found else None
            r["mtcnn_box_distance"] = _number(box_distance(bo[mo], ba[ma])[0]) if both_found else None
            r["mtcnn_landmark_distance"] = _number(gm.landmark_error(po[mo], pa[ma])[0]) if both_found else None
            ho, ha = hog[i], hog[n + i]
            jo = best_match(ho, ref, ORIGINAL_MATCH_IOU)
            ja = best_match(ha, ho[jo] if jo is not None else ref, self.match_iou)
            r["hog_original"], r["hog_redetected"] = jo is not None, ja is not None
            both_found = jo is not None and ja is not None
            r["hog_box_iou"] = _number(gm.box_iou(ho[jo], ha[ja])[0]) if both_found else None
            r["hog_box_distance"] = _number(box_distance(ho[jo], ha[ja])[0]) if both_found else None
            predictor_boxes.append(ho[jo] if jo is not None else bo[mo] if mo is not None else ref)
            results.append(r)

        lm = np.stack([dlib_landmarks.landmarks_68(c, predictor_boxes[i % n][None])[0] for i, c in enumerate(both)])
        lm_dist = gm.landmark_error(lm[:n], lm[n:])
        fit = morphable.fit_landmarks(lm)
        bases = morphable.load_bases()
        shape = gm.shape_distance(fit.geometry[:n], fit.geometry[n:], bases)
        expr = gm.expression_distance(fit.geometry[:n], fit.geometry[n:], bases)
        pose = gm.rotation_angle(fit.geometry[:n, morphable.POSE], fit.geometry[n:, morphable.POSE])
        for i, r in enumerate(results):
            r["landmark68_distance"] = _number(lm_dist[i])
            r["shape_distance"] = _number(shape[i])
            r["expression_distance"] = _number(expr[i])
            r["pose_distance"] = _number(pose[i])
            assert set(r) == set(FIELDS), set(r) ^ set(FIELDS)
        return results


def face_crops(rgb: np.ndarray, transform: np.ndarray, job_resolution: int, resolution: int) -> np.ndarray:
    """One aligned metrics crop of an image under a face's (job-resolution) transform."""
    return align.warp_to_crop(rgb, metric_transform(transform, job_resolution, resolution), resolution)


# ---------------------------------------------------------------------------------------------------------
# The stage.


class MetricsStage(_Stage):
    """After encoding: decode each published image and measure its faces against the original.

    Faces of all images in the batch go through the networks together, ``measurer.batch_size`` at a time.
    A failure here never withholds an image: the sample's faces keep ``metrics`` null and the reason goes to
    the manifest's ``metrics_error`` (with policy.on_error 'fail' it stops the job).

    Args:
        measurer: the metric models.
        job_resolution: the anonymizer's crop side (the transforms' target).
        aligned: the corpus is pre-aligned (faces have no detected box; the canonical box is the reference).
        max_pixels: decode limit for the written image.
    """

    def __init__(
        self, measurer: FaceMeasurer, job_resolution: int, aligned: bool, max_pixels: int, fail_fast: bool = False
    ):
        super().__init__(fail_fast)
        self.measurer = measurer
        self.job_resolution = job_resolution
        self.aligned = aligned
        self.max_pixels = max_pixels

    def setup(self) -> None:
        self.measurer.setup()

    def _metrics_failed(self, s: Sample, reason: str) -> None:
        if self.fail_fast:
            raise StageError(f"sample {s.raw.index}: {reason}")
        s.metrics_error = reason
        for f in s.faces:
            f.metrics = None

    def process(self, batch: list[Sample]) -> list[Sample]:
        res = self.measurer.resolution
        items = []  # (sample, face, original crop, anonymized crop, reference box)
        for s in batch:
            if s.out_bytes is None or not s.faces:
                continue
            try:
                written = decode_image(s.out_bytes, max(self.max_pixels, s.image.rgb.shape[0] * s.image.rgb.shape[1]))
                if written.rgb.shape != s.image.rgb.shape:
                    raise ValueError(f"written image is {written.rgb.shape}, input {s.image.rgb.shape}")
                for f in s.faces:
                    m = metric_transform(f.transform, self.job_resolution, res)
                    ref = aligned_reference_box(res) if self.aligned else box_in_crop(f.box, m)
                    items.append(
                        (s, f, align.warp_to_crop(s.image.rgb, m, res), align.warp_to_crop(written.rgb, m, res), ref)
                    )
            except StageError:
                raise
            except Exception as e:
                self._metrics_failed(s, f"metrics: cannot re-read the written image: {type(e).__name__}: {e}")
        for start in range(0, len(items), self.measurer.batch_size):
            chunk = [it for it in items[start : start + self.measurer.batch_size] if it[0].metrics_error is None]
            if not chunk:
                continue
            try:
                results = self.measurer.measure(
                    np.stack([it[2] for it in chunk]),
                    np.stack([it[3] for it in chunk]),
                    np.stack([it[4] for it in chunk]),
                )
            except Exception as e:
                for it in chunk:
                    self._metrics_failed(it[0], f"metrics failed: {type(e).__name__}: {e}")
                continue
            for (s, f, *_), r in zip(chunk, results):
                f.metrics = r
        return batch
