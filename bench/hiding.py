"""How well the payload survives the pipeline: train the hiding path alone, then read it back from PNG and JPEG.

Trains the hiding path of a G2Face model (payload injections, the fusion and synthesis that carry them,
and the extractor) with the image path fixed to the real faces (``g2face.train_step.hiding_warmup_loss``:
each output is the real face plus the generator's payload residual) on the committed NASA portraits, aligned by the pipeline's
MTCNN stages, with the differentiable paste-back / 8-bit / JPEG model of ``g2face.degrade``. Then,
with fresh random payloads, it runs the pipeline's real publishing path on every portrait (paste-back
into the photo, PNG or JPEG encoding with Pillow, decoding, re-alignment with the stored transform) and
reports the bit error rate:

* ``inside``: bits whose extractor position lies where the paste mask is >= 0.5;
* ``all``: every payload bit. Bits outside the paste region are replaced by the original photo when
  the face is pasted back, so with the current layout (bit i read from crop position i) they stay at
  chance whatever the training.

Usage (CPU; about 10 minutes with the defaults on two cores):
    python bench/hiding.py --minutes 10
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
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from g2face import degrade  # noqa: E402
from g2face import train_step as ts  # noqa: E402
from g2face.config import LITE_128  # noqa: E402
from g2face.model import G2Face  # noqa: E402
from pipeline import align  # noqa: E402
from pipeline.imaging import encode_image  # noqa: E402

CONFIGS = {
    "lite-128": LITE_128,
    # lite-128's resolution, payload and layout with narrow features (the configuration of the test).
    "lite-128-narrow": LITE_128.replace(name="lite-128-narrow", channels=(32, 32, 32, 16, 16, 16),
                                        discriminator_channels=(32, 32, 32, 16, 16, 16), extractor_width=32),
}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="lite-128-narrow")
    ap.add_argument("--minutes", type=float, default=10.0, help="training time budget (evaluation comes after)")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--jpeg-probability", type=float, default=0.5, help="share of training batches JPEG-encoded")
    ap.add_argument("--min-psnr", type=float, default=30.0, help="distortion budget of the visible change")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the final figures here")
    args = ap.parse_args()

    cfg = CONFIGS[args.config]
    r = cfg.resolution
    t0 = time.time()
    photos, transforms, crops = aligned_portraits(r)
    faces = to_tensor(crops)
    n = len(faces)
    mask = torch.from_numpy(align.paste_mask(r).copy())
    per_position = F.avg_pool2d(mask[None, None], 2).flatten()
    inside = per_position.repeat(math.ceil(cfg.payload_bits / per_position.numel()))[: cfg.payload_bits] >= 0.5
    print(f"{n} portraits aligned at {r} px in {time.time() - t0:.0f}s; config {cfg.name}; "
          f"{int(inside.sum())} of {cfg.payload_bits} payload bits lie inside the paste region", flush=True)

    torch.manual_seed(args.seed)
    model = G2Face(cfg).requires_grad_(False)
    for p in ts.hiding_parameters(model):
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        w_plus = model.styles(torch.randn(n, cfg.identity_dim, generator=g), torch.randn(n, cfg.geometry_dim, generator=g))

    def evaluate(formats) -> dict:
        model.eval()
        bits = torch.randint(0, 2, (n, cfg.payload_bits), generator=torch.Generator().manual_seed(12345)).float()
        out = {}
        with torch.no_grad():
            image = faces + ts.payload_residual(model, faces, w_plus, bits)
            published = to_uint8(image)
            visible = (mask * (to_tensor(published) - faces)).square().mean().item()
            out["psnr_visible_db"] = round(10 * math.log10(4 / max(visible, 1e-12)), 2)
            for fmt, q in formats:
                wrong = (model.extract_logits(to_tensor(readback(photos, transforms, published, fmt, q))) > 0) != (bits > 0.5)
                name = fmt.lower() + (f"_q{q}" if fmt == "JPEG" else "")
                out[name] = {"ber_inside": round(wrong[:, inside].float().mean().item(), 5),
                             "ber_all": round(wrong.float().mean().item(), 5)}
        model.train()
        return out

    optimizer = torch.optim.Adam(ts.hiding_parameters(model), lr=args.lr, betas=(0.9, 0.999))
    paste = degrade.PasteBackConfig(photo_scale=(1.0, 3.0), max_angle_deg=10.0,
                                    jpeg_probability=args.jpeg_probability, jpeg_quality=(88.0, 96.0))
    budget = args.minutes * 60
    t_train = time.time()
    step = 0
    print(f"start: {json.dumps(evaluate([('PNG', 0)]))}", flush=True)
    while step < args.max_steps:
        elapsed = time.time() - t_train
        if elapsed >= budget:
            break
        # cosine decay over the time budget (the step count is unknown in advance on a shared CPU)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
        idx = torch.randperm(n, generator=g)[: args.batch]
        bits = torch.randint(0, 2, (len(idx), cfg.payload_bits), generator=g).float()
        loss, _, _ = ts.hiding_warmup_loss(model, faces[idx], w_plus[idx], bits, mask, paste, g, min_psnr=args.min_psnr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % args.eval_every == 0:
            print(f"step {step} ({time.time() - t_train:.0f}s): loss {loss.item():.3f} "
                  f"{json.dumps(evaluate([('PNG', 0)]))}", flush=True)

    final = evaluate([("PNG", 0), ("JPEG", 95), ("JPEG", 90)])
    final.update({"config": cfg.name, "steps": step, "batch": args.batch, "train_seconds": round(time.time() - t_train),
                  "bits_inside": int(inside.sum()), "payload_bits": cfg.payload_bits,
                  "jpeg_probability": args.jpeg_probability})
    print("final: " + json.dumps(final), flush=True)
    if args.json:
        args.json.write_text(json.dumps(final, indent=2) + "\n")


if __name__ == "__main__":
    main()
