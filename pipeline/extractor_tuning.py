"""Fine-tune a G2Face model's payload extractor on the pipeline's own publishing channel.

The generator stays frozen, so anonymised faces (and the hidden signal in them) are bit-identical to the
model's; only the extractor, the network that reads the bits back, is trained. Training data is what
the pipeline really does to a face between hiding and reading: the 8-bit crop is pasted back into a
photo through the inverse alignment transform and the feathered mask (``align.paste_back``), the photo
is stored as PNG or re-encoded as JPEG with Pillow, decoded, and re-aligned with the same transform
(``align.warp_to_crop``). None of this needs to be differentiable here, so the real codecs and warps are
used, not the training-time approximations of ``g2face.degrade``.

A "photo" is made from each prepared crop by warping it out through a random similarity transform (face
scale, rotation, sub-pixel position), so every face size the pipeline meets is covered: photos whose
faces are larger than the crop (paste-back upsamples) and smaller (paste-back downsamples, the hard case).

``payload_figures`` measures an extractor on held-out faces through the same channel with fixed draws:
raw bit error rate and the share of real encrypted payloads (``pipeline.payload``, a throw-away key) that
decode and authenticate, for PNG and for JPEG at a given quality.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from . import align, verify
from .imaging import crops_uint8, jpeg_roundtrip


@dataclass(frozen=True)
class ChannelConfig:
    """The random publishing channel.

    Args:
        min_scale, max_scale: crop pixels per photo pixel (log-uniform); above 1 the paste-back shrinks the
            generated crop into fewer photo pixels.
        max_angle_deg: largest in-plane rotation of the face in the photo.
        jpeg_share: share of samples re-encoded as JPEG (the rest stay lossless, as PNG output does).
        jpeg_quality: (lowest, highest) JPEG quality, uniform.
    """

    min_scale: float = 0.3
    max_scale: float = 1.3
    max_angle_deg: float = 15.0
    jpeg_share: float = 0.6
    jpeg_quality: tuple[int, int] = (80, 95)

    def __post_init__(self):
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")
        if not 0 <= self.jpeg_share <= 1:
            raise ValueError(f"jpeg_share must be in [0, 1], got {self.jpeg_share}")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"jpeg_quality must be (low, high) within 1..100, got {self.jpeg_quality}")


def similarity(scale: float, angle_deg: float, photo_center: tuple[float, float], resolution: int) -> np.ndarray:
    """Photo -> crop transform (2, 3): ``scale`` crop px per photo px, rotated, photo_center to the crop centre."""
    a = math.radians(angle_deg)
    rot = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = np.asarray(photo_center, np.float64)
    return np.concatenate([rot, (resolution / 2 - rot @ c)[:, None]], axis=1)


def make_photo(crop: np.ndarray, m: np.ndarray) -> np.ndarray:
    """A photo (uint8) of the size the transform implies, whose aligned crop through ``m`` is ``crop``."""
    res = crop.shape[0]
    side = int(math.ceil(1.6 * res / align.transform_scale(m)))
    return cv2.warpAffine(crop, m, (side, side), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT101)


def publish_and_read(original: np.ndarray, generated: np.ndarray, m: np.ndarray, jpeg_quality: int | None) -> np.ndarray:
    """The crop the pipeline's read-back sees: ``generated`` pasted into a photo of ``original`` through
    ``m``, stored (None: lossless; else JPEG at that quality), decoded and re-aligned with ``m``."""
    photo = make_photo(original, m)
    if align.paste_back(photo, generated, m) is None:
        raise ValueError("the transform puts the crop outside the photo")
    if jpeg_quality is not None:
        photo = jpeg_roundtrip(photo, jpeg_quality)
    return align.warp_to_crop(photo, m, original.shape[0])


def random_channel(originals: np.ndarray, generated: np.ndarray, config: ChannelConfig,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(read-back crops (N, R, R, 3) uint8, JPEG quality per sample, 0 = lossless) with fresh random draws."""
    n, res = generated.shape[:2]
    out = np.empty_like(generated)
    quality = np.zeros(n, np.int64)
    for i in range(n):
        scale = math.exp(rng.uniform(math.log(config.min_scale), math.log(config.max_scale)))
        angle = rng.uniform(-config.max_angle_deg, config.max_angle_deg)
        side = 1.6 * res / scale
        center = (side / 2 + rng.uniform(-0.5, 0.5), side / 2 + rng.uniform(-0.5, 0.5))
        m = similarity(scale, angle, center, res)
        if rng.uniform() < config.jpeg_share:
            quality[i] = rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1)
        out[i] = publish_and_read(originals[i], generated[i], m, int(quality[i]) or None)
    return out, quality


def to_model(crops: np.ndarray, device) -> torch.Tensor:
    """uint8 (N, R, R, 3) -> float (N, 3, R, R) in [-1, 1], the model's training range."""
    return torch.from_numpy(crops).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def hide(model, faces: np.ndarray, identity: np.ndarray, geometry: np.ndarray, bits: np.ndarray,
         seeds: list[int], batch_size: int = 32) -> np.ndarray:
    """The model's anonymised 8-bit crops (N, R, R, 3) hiding ``bits`` (N, payload_bits) 0/1, the pipeline's
    inference path (``G2Face.anonymize``: seeded dummy identity and noise)."""
    out = []
    for s in range(0, len(faces), batch_size):
        x = torch.from_numpy(faces[s:s + batch_size]).permute(0, 3, 1, 2).float() / 255.0
        y = model.anonymize(x, torch.from_numpy(identity[s:s + batch_size]).float(),
                            torch.from_numpy(geometry[s:s + batch_size]).float(),
                            torch.from_numpy(bits[s:s + batch_size]).float(), seeds[s:s + batch_size])
        out.append(crops_uint8(y))
    return np.concatenate(out)


def extract_logits(model, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Bit logits (N, payload_bits) float32 of read-back crops, read as the verification stage reads them."""
    return np.stack(verify.extract_logits(model, crops, next(model.parameters()).device, batch_size))


def tune_extractor(model, originals: np.ndarray, generated: np.ndarray, bits: np.ndarray, *, epochs: int,
                   config: ChannelConfig, batch_size: int = 32, lr: float = 1e-4, seed: int = 0,
                   log=None) -> list[dict]:
    """Train ``model.extractor`` in place (every other parameter frozen) to read ``bits`` from fresh channel
    draws of ``generated`` each epoch; binary cross-entropy on the payload positions, Adam with a cosine
    schedule. Returns one record per epoch (mean loss, bit error rate of the training reads). The model's
    train/eval modes and requires_grad flags are restored afterwards; seeded by ``seed`` (numpy draws only:
    the batches and channel; Adam and the network are deterministic on CPU)."""
    if len(generated) < 2 or epochs < 1:
        raise ValueError(f"need at least 2 samples and 1 epoch, got {len(generated)} samples, {epochs} epochs")
    rng = np.random.default_rng(seed)
    dev = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    params = list(model.extractor.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * math.ceil(len(generated) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    target_all = torch.from_numpy(bits).float()
    history = []
    try:
        for epoch in range(epochs):
            crops, _ = random_channel(originals, generated, config, rng)
            order = rng.permutation(len(crops))
            model.eval()
            model.extractor.train()  # batch statistics, and the running ones follow the channel's images
            losses, errors = [], []
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                if len(idx) < 2:
                    continue  # batch norm needs two samples
                logits = model.extract_logits(to_model(crops[idx], dev))
                target = target_all[idx].to(dev)
                loss = F.binary_cross_entropy_with_logits(logits.float(), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                errors.append(((logits.detach() > 0) != (target > 0.5)).float().mean().item())
            rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_ber": float(np.mean(errors)),
                   "lr": sched.get_last_lr()[0]}
            history.append(rec)
            if log:
                log(rec)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
    return history


def payload_figures(model, originals: np.ndarray, identity: np.ndarray, geometry: np.ndarray, *,
                    jpeg_quality: int = 90, seed: int = 777, scales: tuple[float, float] = (0.5, 1.25)) -> dict:
    """Bit error rate and real-payload decode rate through the channel, lossless and JPEG, fixed draws.

    Each face hides a real payload (its identity embedding, encrypted and error corrected as the pipeline
    does) under a key and context derived from ``seed`` alone, so two models measured with the same seed
    hide the same bits in the same faces through the same transforms: a paired comparison. The key is a
    measurement key, never a dataset's.
    """
    from .keys import ShardKey
    from .payload import THUMBNAIL_FORMS, THUMBNAIL_FROM_VERSION, PayloadContext, PayloadLayout, decode, encode, writing_version
    from .thumbnail import encode_thumbnails

    rng = np.random.default_rng(seed)
    n, res = len(originals), originals.shape[1]
    cfg = model.config
    layout = PayloadLayout(cfg.payload_bits, identity.shape[1], writing_version(cfg.payload_bits, identity.shape[1]))
    key = ShardKey.from_master(hashlib.sha256(b"g2face-pipe/extractor-tuning/%d" % seed).digest(), "tuning", "held-out")
    contexts = [PayloadContext("tuning", "held-out", f"face-{i}", 0, "measurement", seed) for i in range(n)]
    thumbs = (encode_thumbnails(torch.from_numpy(np.ascontiguousarray(originals)).permute(0, 3, 1, 2).float() / 255,
                                THUMBNAIL_FORMS[layout.format_version][0])
              if layout.format_version >= THUMBNAIL_FROM_VERSION else [None] * n)
    bits = np.stack([encode(identity[i], contexts[i], key, layout, thumbs[i]) for i in range(n)]).astype(np.float32)
    seeds = [int(s) for s in rng.integers(0, 2**62, n)]
    generated = hide(model, originals, identity, geometry, bits, seeds)
    transforms, scale_of = [], []
    for _ in range(n):
        scale = math.exp(rng.uniform(math.log(scales[0]), math.log(scales[1])))
        side = 1.6 * res / scale
        transforms.append(similarity(scale, rng.uniform(-15, 15), (side / 2 + rng.uniform(-0.5, 0.5),
                                                                    side / 2 + rng.uniform(-0.5, 0.5)), res))
        scale_of.append(scale)
    out = {"faces": n}
    for name, quality in (("png", None), (f"jpeg_q{jpeg_quality}", jpeg_quality)):
        crops = np.stack([publish_and_read(originals[i], generated[i], transforms[i], quality) for i in range(n)])
        logits = extract_logits(model, crops)
        wrong = ((logits > 0) != (bits > 0.5)).mean(axis=1)
        opened = np.array([decode(logits[i], contexts[i], key, layout).ok for i in range(n)])
        small = np.asarray(scale_of) > 1.0
        out[name] = {"ber": float(wrong.mean()), "decode_rate": float(opened.mean()),
                     "ber_shrunk_faces": float(wrong[small].mean()) if small.any() else None,
                     "ber_enlarged_faces": float(wrong[~small].mean()) if (~small).any() else None}
    return out
