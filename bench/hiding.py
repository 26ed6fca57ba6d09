"""How well the payload survives the pipeline: train the hiding path alone, then read it back from PNG and JPEG.

Trains the hiding path of a G2Face model (payload injections, the fusion and synthesis that carry them,
and the extractor) with the image path fixed to the real faces (``g2face.train_step.hiding_warmup_loss``:
each output is the real face plus the generator's payload residual) on the committed NASA portraits,
aligned by the pipeline's MTCNN stages, with the differentiable paste-back / 8-bit / JPEG model of
``g2face.degrade``. Every few steps, and at the end, it runs the pipeline's real publishing path with
fresh random payloads on every portrait (paste-back into the photo, PNG or JPEG encoding with Pillow,
decoding, re-alignment with the stored transform) and reports the bit error rate over all payload bits.

The models use the ``face`` payload layout (``g2face.payload_layout``): every bit sits on an extractor
cell inside the paste-back ellipse, as many 64x64 planes as the payload needs (1,620 cells a plane at
128 px), so no bit is replaced by the original photo on paste-back.

Two distortion figures of the visible change (published crop, 8-bit, against the real face, [-1, 1]):
``psnr_crop_db`` is the loss's definition (mask-weighted change averaged over the whole crop, the
budget ``--min-psnr``); ``psnr_face_db`` averages the same change over the ellipse only (stricter).

Usage (CPU, two cores; training time is ``--minutes``, the evaluations come on top):
    python bench/hiding.py --config lite-128-narrow-1plane --minutes 14 --out /tmp/hiding-1plane.json
    python bench/hiding.py --config lite-128-narrow --minutes 5 --out /tmp/hiding-narrow.json
    python bench/hiding.py --config lite-128 --batch 4 --minutes 10   # the full-width lite model
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from g2face import degrade  # noqa: E402
from g2face import train_step as ts  # noqa: E402
from g2face.config import LITE_128  # noqa: E402
from g2face.model import G2Face  # noqa: E402
from g2face.payload_layout import face_capacity_per_plane  # noqa: E402
from pipeline import align  # noqa: E402
from pipeline.imaging import encode_image  # noqa: E402

_NARROW = LITE_128.replace(name="lite-128-narrow", channels=(32, 32, 32, 16, 16, 16),
                           discriminator_channels=(32, 32, 32, 16, 16, 16), extractor_width=32)
CONFIGS = {
    "lite-128": LITE_128,  # full width, 3240 bits on 2 face planes
    "lite-128-narrow": _NARROW,  # narrow features, lite-128's 3240 bits
    # the hiding test's configuration: narrow, one face plane of bits
    "lite-128-narrow-1plane": _NARROW.replace(name="lite-128-narrow-1plane",
                                              payload_bits=face_capacity_per_plane(LITE_128.resolution)),
}
EVAL_SEED = 12345  # the evaluation payloads; never drawn by training


def aligned_portraits(resolution: int):
    """(photos, transforms, crops uint8) of the committed portraits via the pipeline's MTCNN + alignment."""
    from pipeline.imaging import decode_image
    from pipeline.shardio import RawSample
    from pipeline.spec import DetectionSpec
    from pipeline.stages import AlignStage, DetectStage, Sample

    spec = DetectionSpec()
    detect = DetectStage(spec.min_face_size, spec.stage_thresholds, spec.scale_factor, spec.low_score_threshold,
                         spec.max_side, False, resolution, "cpu")
    detect.setup()
    samples = []
    for shard in sorted((ROOT / "data" / "demo").glob("nasa-*.tar")):
        with tarfile.open(shard) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    s = Sample(RawSample(len(samples), member.name[:-4], {"jpg": data}, "jpg"))
                    s.image = decode_image(data, 10**8, False)
                    samples.append(s)
    detect.process(samples)
    for s in samples:
        if not s.faces:
            sys.exit(f"MTCNN found no face in {s.raw.key}")
        s.faces = [max(s.faces, key=lambda f: f.box[2] - f.box[0])]
    AlignStage(resolution, "blur", "pixelate", 0, 0.0, 0, "pass").process(samples)
    return ([s.image.rgb for s in samples], [s.faces[0].transform for s in samples],
            np.stack([s.faces[0].crop for s in samples]))


def readback(photos, transforms, crops: np.ndarray, fmt: str, quality: int) -> np.ndarray:
    """The publishing path: paste each crop into its photo, encode, decode, re-align with the stored transform."""
    out = []
    for photo, m, crop in zip(photos, transforms, crops):
        pasted = photo.copy()
        align.paste_back(pasted, crop, m)
        decoded = np.asarray(Image.open(io.BytesIO(encode_image(pasted, None, "RGB", fmt, quality))).convert("RGB"))
        out.append(align.warp_to_crop(decoded, m, crop.shape[0]))
    return np.stack(out)


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.detach() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr_db(mse: float) -> float:
    return round(10 * math.log10(4 / max(mse, 1e-12)), 2)  # peak-to-peak 2 on the [-1, 1] scale


def fmt_name(fmt: str, quality: int) -> str:
    return "png" if fmt == "PNG" else f"jpeg_q{quality}"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="lite-128-narrow-1plane")
    ap.add_argument("--minutes", type=float, default=10.0, help="training time budget (evaluations not counted)")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, cosine-decayed over --minutes")
    ap.add_argument("--jpeg-probability", type=float, default=0.25, help="share of training batches JPEG-encoded")
    ap.add_argument("--min-psnr", type=float, default=30.0, help="distortion budget of the visible change (dB)")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between progress lines (PNG BER)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the figures (final and the BER curve) here as JSON")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    if cfg.payload_region != "face":
        sys.exit(f"config {cfg.name} has payload_region={cfg.payload_region!r}; this bench measures the face layout")
    r = cfg.resolution
    t0 = time.time()
    photos, transforms, crops = aligned_portraits(r)
    faces = to_tensor(crops)
    n = len(faces)
    mask = torch.from_numpy(align.paste_mask(r).copy())
    inside = mask > 0
    per_plane = face_capacity_per_plane(r)
    planes = math.ceil(cfg.payload_bits / per_plane)
    print(f"{n} portraits aligned at {r} px in {time.time() - t0:.0f}s; config {cfg.name}: {cfg.payload_bits} "
          f"payload bits on {planes} face plane(s) of {per_plane} cells", flush=True)

    torch.manual_seed(args.seed)
    model = G2Face(cfg).requires_grad_(False)
    params = ts.hiding_parameters(model)
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        w_plus = model.styles(torch.randn(n, cfg.identity_dim, generator=g), torch.randn(n, cfg.geometry_dim, generator=g))
    eval_bits = torch.randint(0, 2, (n, cfg.payload_bits), generator=torch.Generator().manual_seed(EVAL_SEED)).float()

    def evaluate(formats) -> dict:
        model.eval()
        out = {}
        with torch.no_grad():
            published = to_uint8(faces + ts.payload_residual(model, faces, w_plus, eval_bits))
            change = mask * (to_tensor(published) - faces)  # what paste-back shows of the change
            out["psnr_crop_db"] = psnr_db(change.square().mean().item())
            out["psnr_face_db"] = psnr_db(change.square().mean(dim=1)[:, inside].mean().item())
            for fmt, q in formats:
                logits = model.extract_logits(to_tensor(readback(photos, transforms, published, fmt, q)))
                wrong = ((logits > 0) != (eval_bits > 0.5)).float()
                out[f"ber_{fmt_name(fmt, q)}"] = round(wrong.mean().item(), 5)
                if planes > 1:  # bit i lies on face plane i // per_plane
                    out[f"ber_{fmt_name(fmt, q)}_per_plane"] = [round(c.mean().item(), 5) for c in wrong.split(per_plane, 1)]
        model.train()
        return out

    optimizer = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999))
    paste = degrade.PasteBackConfig(photo_scale=(1.0, 3.0), max_angle_deg=10.0,
                                    jpeg_probability=args.jpeg_probability, jpeg_quality=(88.0, 96.0))
    budget = args.minutes * 60
    curve = []
    eval_seconds = 0.0

    def progress(step: int, train_seconds: float, loss: float | None) -> None:
        nonlocal eval_seconds
        t = time.time()
        figures = evaluate([("PNG", 0)])
        eval_seconds += time.time() - t
        curve.append({"step": step, "train_seconds": round(train_seconds, 1), **figures})
        print(f"step {step:5d} ({train_seconds:4.0f}s train): loss {'-' if loss is None else f'{loss:.3f}'} "
              f"BER png {figures['ber_png']:.4f} psnr crop {figures['psnr_crop_db']:.1f} dB "
              f"face {figures['psnr_face_db']:.1f} dB"
              + (f" per plane {figures['ber_png_per_plane']}" if planes > 1 else ""), flush=True)

    progress(0, 0.0, None)
    train_seconds = 0.0
    step = 0
    while step < args.max_steps and train_seconds < budget:
        t = time.time()
        # cosine decay over the time budget (the step count is unknown in advance on a shared CPU)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, train_seconds / budget)))
        idx = torch.randperm(n, generator=g)[: args.batch]
        bits = torch.randint(0, 2, (len(idx), cfg.payload_bits), generator=g).float()
        loss, _, _ = ts.hiding_warmup_loss(model, faces[idx], w_plus[idx], bits, mask, paste, g, min_psnr=args.min_psnr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        train_seconds += time.time() - t
        if step % args.eval_every == 0:
            progress(step, train_seconds, loss.item())

    t = time.time()
    final = evaluate([("PNG", 0), ("JPEG", 95), ("JPEG", 90)])
    eval_seconds += time.time() - t
    result = {"config": cfg.name, "payload_bits": cfg.payload_bits, "portraits": n, "steps": step,
              "batch": args.batch, "lr": args.lr, "jpeg_probability": args.jpeg_probability,
              "min_psnr": args.min_psnr, "threads": args.threads, "seed": args.seed,
              "train_seconds": round(train_seconds), "eval_seconds": round(eval_seconds),
              "wall_seconds": round(time.time() - t0), "final": final, "curve": curve}
    print("final: " + json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
