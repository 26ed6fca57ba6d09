"""A G2Face test artifact whose hiding path is trained, so that payloads survive the pipeline.

Only the hiding path (payload injections, fusion, synthesis, extractor; ``g2face.train_step.hiding_parameters``)
of a narrow lite-128 config trains, briefly, on the committed NASA portraits aligned by the pipeline's own
MTCNN stages. Unlike ``hiding_warmup_loss`` (which fixes the image path to the real face), the loss here runs
the generator exactly as ``G2Face.anonymize`` does (dummy identity, real geometry from the shipped
regressor, seeded noise), so what the extractor learns to read is what the pipeline publishes. The image
itself is not trained to look like anything: this artifact tests the payload plumbing, never quality.

``trained_hiding_artifact()`` returns (artifact path, figures): the artifact named by the environment
variable ``G2FACE_HIDING_ARTIFACT`` (for instance a model trained on a GPU), else one trained in the
session for ``HIDING_TRAIN_SECONDS`` (env, default 0), else the committed fixture
``tests/fixtures/hiding-narrow-128.g2face`` (regenerate it with ``tests/fixtures/make_hiding_fixture.py``,
about 12 CPU-minutes: a reconstruction stage, then hiding on the inference path; training from scratch
inside a test run does not get there: 75 s reached BER 0.50, 7 minutes 0.46).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conftest import DEMO_SHARDS
from helpers import read_tar

_CACHE: dict = {}
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hiding-narrow-128.g2face"
FIXTURE_SHA256 = "0689d55dd054c019a3cbaba6955aac827b473bfa90e074e26e82028115a72cd0"  # file sha256 (not the artifact's content hash)


def narrow_config():
    from g2face.config import LITE_128

    # lite-128's resolution and face layout with narrow features (as tests/g2face/test_train_step.py) and the
    # 4,096 payload bits (three planes) lite-128 had when the committed fixture was made (it now has 3,240).
    return LITE_128.replace(name="lite-128-narrow", channels=(32, 32, 32, 16, 16, 16),
                            discriminator_channels=(32, 32, 32, 16, 16, 16), extractor_width=32, payload_bits=4096)


def aligned_demo_faces(resolution: int = 128):
    """(keys, photos, transforms, crops uint8 (N, R, R, 3)): the largest face of each demo portrait."""
    from pipeline.imaging import decode_image
    from pipeline.shardio import RawSample
    from pipeline.spec import DetectionSpec
    from pipeline.stages import AlignStage, DetectStage, Sample

    spec = DetectionSpec()
    detect = DetectStage(spec.min_face_size, spec.stage_thresholds, spec.scale_factor, spec.low_score_threshold,
                         spec.max_side, False, resolution, "cpu")
    detect.setup()
    samples = []
    for shard in DEMO_SHARDS:
        for key, files in sorted(read_tar(shard).items()):
            s = Sample(RawSample(len(samples), key, {"jpg": files["jpg"]}, "jpg"))
            s.image = decode_image(files["jpg"], 10**8, False)
            samples.append(s)
    detect.process(samples)
    for s in samples:
        assert s.faces, f"MTCNN finds no face in {s.raw.key}"
        s.faces = [max(s.faces, key=lambda f: f.box[2] - f.box[0])]
    AlignStage(resolution, "blur", "pixelate", 0, 0.0, 0, "pass").process(samples)
    return ([s.raw.key for s in samples], [s.image.rgb for s in samples], [s.faces[0].transform for s in samples],
            np.stack([s.faces[0].crop for s in samples]))


def train_hiding(seconds: float, seed: int = 0, batch: int = 2, lr: float = 3e-3, mode: str = "full",
                 reconstruction: float = 1.0, max_steps: int = 10**9, log=None):
    """Train for about ``seconds``; returns (model, figures).

    mode 'full': every generator part trains on the inference path, loss = BCE(bits read back after
    paste-back / 8-bit / JPEG) + reconstruction * L1(output, face); 'residual': the hiding warm-up
    (``hiding_warmup_loss``, image path fixed to the real face)."""
    from g2face import degrade, losses
    from g2face import train_step as ts
    from g2face.geometry_net import load_geometry_net
    from g2face.model import STREAM_ANONYMIZE, G2Face
    from pipeline import align

    cfg = narrow_config()
    _, _, _, crops = aligned_demo_faces(cfg.resolution)
    faces01 = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        geometry = load_geometry_net()(faces01).geometry  # what anonymize() conditions on
    faces = faces01 * 2 - 1
    n = len(faces)
    torch.manual_seed(seed)
    model = G2Face(cfg).requires_grad_(False)
    params = ts.hiding_parameters(model) if mode == "residual" else [
        p for name, p in model.named_parameters() if not name.startswith(("dummy.", "mapper."))]
    for p in params:
        p.requires_grad_(True)
    mask = torch.from_numpy(align.paste_mask(cfg.resolution).copy())
    paste = degrade.PasteBackConfig(photo_scale=(1.0, 3.0), max_angle_deg=10.0, jpeg_probability=0.5,
                                    jpeg_quality=(85.0, 96.0))
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=lr)
    t0, step = time.time(), 0
    while time.time() - t0 < seconds and step < max_steps:
        for group in optimizer.param_groups:  # cosine decay over the time budget
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - t0) / seconds)))
        idx = torch.randperm(n, generator=g)[:batch]
        seeds = [int(s) for s in torch.randint(0, 2**62, (batch,), generator=g)]
        bits = torch.randint(0, 2, (batch, cfg.payload_bits), generator=g).float()
        with torch.no_grad():
            w_plus = model.styles(model.dummy_identities(seeds), geometry[idx])
        if mode == "residual":
            loss, _, _ = ts.hiding_warmup_loss(model, faces[idx], w_plus, bits, mask, paste, g)
        else:
            noise = model.noise_from_seeds(seeds, STREAM_ANONYMIZE)
            image = model.generate(faces[idx], w_plus, bits, noise)
            seen = degrade.random_paste_and_realign(image, faces[idx], mask, paste, g)
            loss = losses.hiding_loss(model.extract_logits(seen), bits) + reconstruction * (image - faces[idx]).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if log is not None and step % 25 == 0:
            log(f"step {step} {time.time() - t0:.0f}s loss {loss.item():.4f}")
    model.requires_grad_(False).eval()
    return model, {"mode": mode, "steps": step, "batch": batch, "seconds": round(time.time() - t0, 1),
                   "final_loss": round(loss.item(), 4)}


def trained_hiding_artifact(seconds: float | None = None) -> tuple[Path, dict] | None:
    """The session's hiding artifact: (path, figures), or None when none is configured (see the module doc)."""
    given = os.environ.get("G2FACE_HIDING_ARTIFACT")
    if given:
        return Path(given), {"source": given, "seconds": 0, "steps": 0}
    seconds = float(os.environ.get("HIDING_TRAIN_SECONDS", 0)) if seconds is None else seconds
    if seconds <= 0:
        if not FIXTURE.is_file():
            return None
        import hashlib

        sha = hashlib.sha256(FIXTURE.read_bytes()).hexdigest()
        assert sha == FIXTURE_SHA256, f"{FIXTURE} has sha256 {sha}; regenerated? update FIXTURE_SHA256"
        return FIXTURE, {"source": FIXTURE.name, "seconds": 0, "steps": 0}
    if "artifact" not in _CACHE:
        from g2face.checkpoint import save_artifact

        torch.set_num_threads(1)
        model, figures = train_hiding(seconds)
        path = Path(tempfile.mkdtemp(prefix="g2face-hiding-")) / "lite-128-narrow-hiding.pt"
        figures["sha256"] = save_artifact(model, path, metadata={"purpose": "test fixture: hiding path only"})
        _CACHE["artifact"] = (path, figures)
    return _CACHE["artifact"]


def inside_paste_region(resolution: int, payload_bits: int) -> torch.Tensor:
    """Payload bits whose extractor position lies where the paste mask is >= 0.5 (diagnostics only)."""
    from pipeline import align

    mask = torch.from_numpy(align.paste_mask(resolution).copy())
    per_position = F.avg_pool2d(mask[None, None], 2).flatten()
    return per_position.repeat(math.ceil(payload_bits / per_position.numel()))[:payload_bits] >= 0.5
