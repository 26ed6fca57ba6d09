"""Read the payload bits of published g2face faces back without any key, for the audit's randomness check.

The reading is the verification stage's (``pipeline.verify``): decode the image as written, re-align each face
with the transform stored in the private manifest (no re-detection) and run the model's extractor; a bit is one
where its logit is positive. The model must be the run's own artifact: its sha256 is pinned from ``run.json``
and a checkpoint with another hash is refused. At most ``limit`` faces are read, chosen deterministically (the
faces a pairs file names first, then a seeded shuffle of the rest). Bits stay in memory; callers keep only
aggregate figures (``pipeline.privacy_metrics``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import align, storage
from .imaging import decode_image
from .verify import extract_logits

DEFAULT_LIMIT = 500
SAMPLE_SEED = 0
BATCH = 16


class ReadbackUnavailable(RuntimeError):
    """The bits cannot be read back; the message says why (it goes into the report)."""


@dataclass
class FaceRef:
    shard: str
    index: int  # row of the public manifest
    face: int  # face index in the manifest's face order
    key: str  # as published
    original_key: str | None
    side: float
    payload_mode: str | None
    payload_ber: float | None


@dataclass
class ReadBack:
    faces: list[FaceRef] = field(default_factory=list)  # the faces whose bits were read, row i of bits
    bits: np.ndarray | None = None  # (faces, payload bits) uint8 0/1; never written anywhere
    candidates: int = 0  # published g2face faces in the run
    selected: int = 0  # faces chosen for reading (<= limit)
    unreadable: int = 0  # chosen faces whose image or transform could not be read
    unreachable: list[str] = field(default_factory=list)
    artifact_sha256: str | None = None
    checkpoint: str | None = None


def load_extractor(run_doc: dict, spec, device: str, checkpoint: str | None = None):
    """The run's model (hash-pinned to run.json's payload.artifact_sha256), ready to extract on ``device``."""
    from .g2face_method import G2FaceAnonymizer, G2FaceUnavailable

    sha = (run_doc.get("payload") or {}).get("artifact_sha256")
    if not sha:
        raise ReadbackUnavailable("run.json records no payload artifact sha256, so the run's model cannot be pinned")
    path = checkpoint or spec.anonymizer.checkpoint  # None: the run used the shipped model
    try:
        model = G2FaceAnonymizer(path, spec.anonymizer.resolution, expected_sha256=sha)
    except G2FaceUnavailable as e:
        text = str(e)
        if "is not the expected" in text:
            raise ReadbackUnavailable(
                f"the checkpoint at {path or 'the shipped model'} is not the run's model (its sha256 differs from the run's {sha}); "
                "refusing to read bits with another model"
            ) from None
        raise ReadbackUnavailable(f"the run's model artifact (sha256 {sha}) is unreachable: {text}") from None
    model.model = model.model.to(torch.device(device)).eval()  # only the extractor is needed: no priors
    return model


def select_faces(run, limit: int, pair_keys: list[str] = ()) -> tuple[list[FaceRef], int]:
    """(chosen faces, number of candidates): published g2face faces, pair-named images first, then a seeded
    shuffle; deterministic for a given run."""
    private = {(r["shard"], r["index"]): r for r in run.private}
    refs = []
    for r in sorted(run.public, key=lambda r: (r["shard"], r["index"])):
        if not r["published"]:
            continue
        p = private.get((r["shard"], r["index"]), {})
        for j, f in enumerate(r["faces"]):
            if f.get("method") == "g2face":
                side = float(max(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1])) if f.get("box") else 0.0
                refs.append(FaceRef(r["shard"], r["index"], j, r["key"], p.get("original_key"), side,
                                    f.get("payload_mode"), f.get("payload_ber")))
    order = np.random.default_rng(SAMPLE_SEED).permutation(len(refs))
    rank = {k: i for i, k in enumerate(dict.fromkeys(pair_keys))}
    first = sorted((i for i in order if refs[i].original_key in rank), key=lambda i: rank[refs[i].original_key])
    rest = [i for i in order if refs[i].original_key not in rank]
    chosen = (first + rest)[:limit]
    return [refs[i] for i in sorted(chosen)], len(refs)  # read in shard order


def read_payload_bits(run, device: str = "cpu", limit: int = DEFAULT_LIMIT, pair_keys: list[str] = (),
                      checkpoint: str | None = None) -> ReadBack:
    """Read the chosen faces' bits; raises ReadbackUnavailable when nothing can be read at all."""
    from .audit import _image_bytes, _read_samples

    if run.private is None:
        raise ReadbackUnavailable("the private manifests (private/) are absent: the stored alignment transforms "
                                  "are needed to re-align each face")
    faces, candidates = select_faces(run, limit, pair_keys)
    out = ReadBack(candidates=candidates, selected=len(faces))
    if not faces:
        return out
    model = load_extractor(run.doc, run.spec, device, checkpoint)
    out.artifact_sha256, out.checkpoint = model.artifact_sha256, model.checkpoint
    spec, res = run.spec, run.spec.anonymizer.resolution
    private = {(r["shard"], r["index"]): r for r in run.private}
    by_shard: dict[str, list[FaceRef]] = {}
    for f in faces:
        by_shard.setdefault(f.shard, []).append(f)
    read, crops = [], []
    for shard, refs in by_shard.items():
        url = storage.join(run.dir, "shards", shard)
        try:
            samples = _read_samples(spec, url, output=True)
        except Exception as e:
            out.unreachable.append(f"{url} ({type(e).__name__})")
            out.unreadable += len(refs)
            continue
        current, rgb = None, None  # faces come in sample order: one decoded image at a time
        for f in refs:
            transforms = private.get((shard, f.index), {}).get("transforms") or []
            if f.key != current:
                current, raw = f.key, samples.get(f.key)
                data = _image_bytes(raw) if raw else None
                try:
                    rgb = decode_image(data, spec.input.max_pixels).rgb if data else None
                except Exception:
                    rgb = None
            if rgb is None or f.face >= len(transforms):
                out.unreadable += 1
                continue
            crops.append(align.warp_to_crop(rgb, np.asarray(transforms[f.face], np.float64).reshape(2, 3), res))
            read.append(f)
    if not read:
        raise ReadbackUnavailable("none of the chosen faces could be read back ("
                                  + "; ".join(out.unreachable or ["images or transforms unreadable"]) + ")")
    logits = extract_logits(model, crops, torch.device(device), BATCH)
    out.faces, out.bits = read, (np.stack(logits) > 0).astype(np.uint8)
    return out
