"""Payload and recovery figures of ``g2face-pipe evaluate`` (bars 3 and 4).

They use the pipeline's own payload verification (per-face ``payload_ok`` and raw bit error rate in the
public manifest, and ``pipeline.verify``'s read-back for the JPEG q90 copy) and key-gated recovery
(``pipeline.recover.recover_shard``). Where this version of the pipeline lacks either, the figures say
"not available" and why, instead of a number.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from g2face.identity import SAME_PERSON_DISTANCE

from . import align
from .audit import Run
from .imaging import jpeg_roundtrip
from .metrics_stage import FaceMeasurer, metric_transform
from .privacy_metrics import match_share, psnr_ssim_mae, summary

JPEG_QUALITY = 90
ATTACK_IMAGES_PER_BATCH = 32  # images whose faces the key-less attack re-synthesises in one batch


def _recover_available() -> str | None:
    """None when key-gated recovery is in this version, else the reason it is not."""
    if importlib.util.find_spec("pipeline.recover") is None:
        return "key-gated recovery (pipeline/recover.py) is not in this version of the pipeline"
    return None


def _run_recovery(run_dir: Path, key: Path, out_dir: Path, device: str) -> tuple[list[dict], dict, list[str]]:
    """recover_shard on every shard of the run with the evaluation's master key.

    Returns (face rows, published key -> recovered PNG, per-shard refusals). A shard where no face opens is
    a refusal (recover_shard raises and writes nothing), not an error of the evaluation."""
    from .recover import RecoveryError, recover_shard

    rows, images, refused = [], {}, []
    for shard in sorted((run_dir / "shards").iterdir()):
        try:
            res = recover_shard(str(shard), str(key), str(out_dir), reason="g2face-pipe evaluate",
                                log_path=str(out_dir / "recovery-log.jsonl"), device=device)
        except RecoveryError as e:
            refused.append(str(e))
            continue
        rows += res["faces"]
        images.update({(shard.name, k): v for k, v in res["images"].items()})
    return rows, images, refused


def jpeg_decode_rate(run: Run, key: Path, images: list, device: str = "cpu") -> dict:
    """Share of g2face faces whose payload still opens (decodes and authenticates under the shard key) after
    the written image is re-encoded as JPEG q90: the verification stage's own read-back on that copy."""
    from .g2face_method import G2FaceAnonymizer
    from .keys import ShardKey, load_master_key
    from .stages import payload_sample_key
    from .verify import ShardPayload, extract_logits, run_payload_job

    an, res = run.spec.anonymizer, run.spec.anonymizer.resolution
    model = G2FaceAnonymizer(an.checkpoint, res)
    model.setup(torch.device(device))
    master, _ = load_master_key(key)
    job = run_payload_job(run.doc, run.spec.dataset.id, run.spec.seed, model)
    payloads: dict[str, ShardPayload] = {}
    ok, ok_of_verified = [], []
    for im in images:
        faces = [(i, f) for i, f in enumerate(im.public["faces"]) if f.get("method") == "g2face"]
        if not faces:
            continue
        sp = payloads.setdefault(im.shard, ShardPayload(job, ShardKey.from_master(master, run.spec.dataset.id, im.shard)))
        jpeg = jpeg_roundtrip(im.written, JPEG_QUALITY)
        crops = [align.warp_to_crop(jpeg, np.asarray(im.private["transforms"][i], np.float64).reshape(2, 3), res)
                 for i, _ in faces]
        for (i, f), logits in zip(faces, extract_logits(model, crops, torch.device(device), 16)):
            opened = bool(sp.decode(logits, payload_sample_key(im.public["key"], im.index), i).ok)
            ok.append(opened)
            if f.get("payload_ok"):
                ok_of_verified.append(opened)
    return {
        "decode_rate_jpeg_q90": float(np.mean(ok)) if ok else None,
        "jpeg_q90_faces": len(ok),
        "decode_rate_jpeg_q90_of_png_verified": float(np.mean(ok_of_verified)) if ok_of_verified else None,
    }


def payload_figures(run: Run, key: Path, images: list, device: str = "cpu") -> dict:
    """Bar 4: raw bit error rate of the written PNGs (the verification stage's numbers in the manifest) and the
    decode rate after re-encoding them as JPEG q90."""
    faces = [f for r in run.public if r["published"] for f in r["faces"] if f.get("method") == "g2face"]
    out: dict = {"faces": len(faces), "ber_png": None, "payload_ok_rate_png": None, "decode_rate_jpeg_q90": None}
    if not any("payload_ok" in f for f in faces):
        out["reason"] = (
            "the public manifest has no payload verification fields (payload_ok, payload_ber): the "
            "verification stage is not in this version of the pipeline"
        )
        return out
    bers = [float(f["payload_ber"]) for f in faces if f.get("payload_ber") is not None]
    unknown = len(faces) - len(bers)
    out["payload_ok_rate_png"] = float(np.mean([bool(f.get("payload_ok")) for f in faces])) if faces else None
    out["payload_status_png"] = {s: sum(f.get("payload_status") == s for f in faces)
                                 for s in sorted({str(f.get("payload_status")) for f in faces})}
    out["ber_png_known_faces"] = len(bers)
    out["ber_png_mean_of_known"] = float(np.mean(bers)) if bers else None
    if unknown:
        out["reason"] = (f"{unknown} of {len(faces)} payloads did not decode, so their raw bit error rate is unknown "
                         "(ber_png_mean_of_known averages the others)")
    else:
        out["ber_png"] = out["ber_png_mean_of_known"]
    try:
        out.update(jpeg_decode_rate(run, key, images, device))
    except Exception as e:  # reported in the JSON, never hidden
        out["decode_rate_jpeg_q90_reason"] = f"payload read-back of the JPEG q{JPEG_QUALITY} copy failed: " \
            f"{type(e).__name__}: {e}"
    return out


def _pair_distances(measurer: FaceMeasurer, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """dlib port distance of each (original crop, other crop) pair, embedded in one pass."""
    if not pairs:
        return []
    emb = measurer.embed(np.stack([c for p in pairs for c in p])).astype(np.float64)
    return [float(x) for x in np.linalg.norm(emb[0::2] - emb[1::2], axis=1)]


def recovery_figures(run: Run, key: Path, scratch: Path, measurer: FaceMeasurer, images: list,
                     device: str = "cpu") -> dict:
    """Bar 3: faces recovered with the right key (``recover_shard``) against their originals, on aligned metrics
    crops. The share counts every g2face face: one whose payload did not open is not recovered.

    images: the run's ``evaluate_faces.ImagePair`` list (originals and written images)."""
    attempted = sum(1 for r in run.public if r["published"] for f in r["faces"] if f.get("method") == "g2face")
    empty = {"faces": attempted, "recovered": 0, "share_matching_original": None, "psnr_db": None, "ssim": None}
    why = _recover_available()
    if why:
        return empty | {"reason": why}
    scratch.mkdir(parents=True, exist_ok=True)
    rows, recovered, refused = _run_recovery(Path(run.dir), key, scratch, device)
    by_key = {(im.shard, im.public["key"]): im for im in images}
    job_res, res = run.spec.anonymizer.resolution, measurer.resolution
    pairs = []
    for row in rows:
        im = by_key.get((row["shard"], row["key"]))
        png = recovered.get((row["shard"], row["key"]))
        if not row.get("recovered") or im is None or png is None:
            continue
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        if rgb.shape != im.original.shape:
            continue
        m = metric_transform(np.asarray(row["transform"], np.float64).reshape(2, 3), job_res, res)
        pairs.append((align.warp_to_crop(im.original, m, res), align.warp_to_crop(rgb, m, res)))
    dist = _pair_distances(measurer, pairs)
    quality = [psnr_ssim_mae(rec, orig) for orig, rec in pairs]
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    matching = sum(d < SAME_PERSON_DISTANCE for d in dist)
    out = {
        "faces": attempted,
        "recovered": len(pairs),
        "status": dict(sorted(statuses.items())),
        "shards_refused": refused,
        "share_matching_original": matching / attempted if attempted else None,
        "share_matching_of_recovered": match_share(dist),
        "identity_distance": summary(dist),
        "psnr_db": summary([q["psnr"] for q in quality]),
        "ssim": summary([q["ssim"] for q in quality]),
        "threshold": SAME_PERSON_DISTANCE,
        "method": "recover_shard with the evaluation key; recovered and original faces as aligned "
        f"{res} px crops; PyTorch dlib port distances; PSNR/SSIM as the audit computes them. The share counts "
        "every g2face face of the run (a face whose payload did not open is not recovered).",
    }
    if not pairs:
        out["reason"] = "no face was recovered" + (": " + "; ".join(refused) if refused else "")
    out["without_key"] = keyless_figures(run, measurer, images, attempted, device)
    return out


def keyless_figures(run: Run, measurer: FaceMeasurer, images: list, attempted: int, device: str = "cpu") -> dict:
    """The key-less re-synthesis attack (``pipeline.resynthesis``) with the run's own model (hash-checked, as
    ``recover`` loads it) on the g2face faces of ``images``, measured as the key holder's recovery is: how
    often does someone without the key restore the person? The share is over the faces attacked (faces of
    images that could not be compared are not attacked, and do not count as failed attacks)."""
    from .recover import RecoveryError, _load_model
    from .resynthesis import ATTACKER_IDENTITY, attack_targets, attacked_images

    empty = {"faces": attempted, "attacked": 0, "share_matching_original": None}
    if run.doc.get("face_seeds") != "published_key" and run.spec.output.keys != "keep":
        return empty | {"reason": "the run derived face seeds from original keys (run.json face_seeds), which a "
                                  "key-less attacker of its pseudonymized output does not have"}
    try:
        model = _load_model(run.doc, None, torch.device(device))
    except RecoveryError as e:
        return empty | {"reason": str(e)}
    job_res, res = run.spec.anonymizer.resolution, measurer.resolution
    todo = [(im, attack_targets(im.public, run.spec.seed, job_res, run.spec.input.aligned)) for im in images]
    todo = [(im, targets) for im, targets in todo if targets]
    dist = []
    for start in range(0, len(todo), ATTACK_IMAGES_PER_BATCH):
        chunk = todo[start : start + ATTACK_IMAGES_PER_BATCH]
        pairs = []
        for (im, targets), attacked in zip(chunk, attacked_images(model, [(im.written, t) for im, t in chunk], job_res)):
            for t in targets:  # measured on the crops the key holder's recovery is measured on
                m = metric_transform(np.asarray(im.private["transforms"][t.face_index], np.float64).reshape(2, 3),
                                     job_res, res)
                pairs.append((align.warp_to_crop(im.original, m, res), align.warp_to_crop(attacked, m, res)))
        dist += _pair_distances(measurer, pairs)
    if not dist:
        return empty | {"reason": "no g2face face of the run could be compared with its original"}
    return {
        "faces": attempted,
        "attacked": len(dist),
        "share_matching_original": match_share(dist),
        "identity_distance": summary(dist),
        "threshold": SAME_PERSON_DISTANCE,
        "method": "the model's recover pass run without the key, on public material only (pipeline.resynthesis): "
        f"published crop re-aligned from the public landmarks, seed from run.json, identity: {ATTACKER_IDENTITY}; "
        "measured as the key holder's recovery is, over the faces attacked. A share near the key holder's means "
        "the key adds little: the model restores the person from the anonymized face itself.",
    }
