"""Training warm-up variants side by side: payload size and visibility budget against read-back and image quality.

Each variant trains the full lite-128 width with the training warm-up (``g2face.training._hiding_warmup_step``:
reproduce the input from its own identity and geometry while hiding random bits on the inference path) for
the same steps, batch, learning rate, seed and data order, on prepared training shards. Then, on the
committed NASA portraits (not in any training set), aligned by the pipeline's MTCNN stages, each model's
output goes through the real publishing path (paste-back into the photo, PNG or JPEG q90 with Pillow,
decoding, re-alignment with the stored transform) and the table reports:

- ``ber_png`` / ``ber_jpeg_q90``: bit error rate read back, with fresh random payloads;
- ``payload_psnr_db``: PSNR of the payload's own change, G(x, w, bits) - G(x, w, 0), inside the paste mask
  (how visible the payload is; 8-bit, [-1, 1] scale);
- ``face_psnr_db`` and ``face_change_grey``: output against the original inside the face ellipse (how well
  the warm-up reproduces the face: what full training starts from).

Usage (CPU, two cores, ~10 minutes per 500-step variant with a budget, ~7 without):
    python bench/warmup.py --data /tmp/g2face-prepared/lfw-devtrain/shards --steps 500 \\
        --variant 4096:none --variant 4096:32 --variant 3240:32 --out /tmp/warmup.json
A variant is PAYLOAD_BITS:MIN_PSNR (``none``: no visibility budget, the shipped warm-up's default).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from g2face import training  # noqa: E402
from g2face import train_step as ts  # noqa: E402
from g2face.config import LITE_128  # noqa: E402
from g2face.payload_layout import face_capacity_per_plane  # noqa: E402
from hiding import aligned_portraits, psnr_db, readback, to_tensor, to_uint8  # noqa: E402
from pipeline import align  # noqa: E402

EVAL_SEED = 12345


def parse_variant(text: str) -> tuple[int, float | None]:
    try:
        bits, psnr = text.split(":")
        return int(bits), None if psnr == "none" else float(psnr)
    except ValueError:
        raise SystemExit(f"--variant {text!r}: expected PAYLOAD_BITS:MIN_PSNR, e.g. 3240:32 or 4096:none") from None


def evaluate(model, priors, photos, transforms, crops) -> dict:
    model.eval()
    x = to_tensor(crops)
    n, cfg = len(x), model.config
    bits = torch.randint(0, 2, (n, cfg.payload_bits), generator=torch.Generator().manual_seed(EVAL_SEED)).float()
    mask = torch.from_numpy(align.paste_mask(cfg.resolution).copy())
    inside = mask > 0.5
    with torch.no_grad():
        w = model.styles(priors.identity(x), priors.geometry(x)[0])
        noise = ts.zero_noise(model, n)
        out = model.generate(x, w, bits, noise)
        clean = model.generate(x, w, torch.zeros_like(bits), noise)
    published = to_uint8(out)
    payload = mask * (to_tensor(published) - to_tensor(to_uint8(clean)))
    change = (to_tensor(published) - x).square().mean(dim=1)[:, inside]
    figures = {"payload_psnr_db": psnr_db(payload.square().mean().item()),
               "face_psnr_db": psnr_db(change.mean().item()),
               "face_change_grey": round(float((to_tensor(published) - x).abs().mean(dim=1)[:, inside].mean()) * 127.5, 1)}
    with torch.no_grad():
        for fmt, q, name in (("PNG", 0, "ber_png"), ("JPEG", 90, "ber_jpeg_q90")):
            logits = model.extract_logits(to_tensor(readback(photos, transforms, published, fmt, q)))
            figures[name] = round(((logits > 0) != (bits > 0.5)).float().mean().item(), 5)
    model.train()
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="directory of prepared training shards")
    ap.add_argument("--variant", action="append", default=[], help="PAYLOAD_BITS:MIN_PSNR (repeatable)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant or ["4096:none", "4096:32", "3240:32"]]
    torch.set_num_threads(args.threads)
    r = LITE_128.resolution
    faces = training.read_faces(sorted(Path(args.data).glob("*.tar")))
    priors = training.build_priors(r, align.template(r), align.paste_mask(r))
    photos, transforms, crops = aligned_portraits(r)
    train_config = training.train_config_from_dict({})
    rows = []
    for bits, min_psnr in variants:
        cfg = LITE_128.replace(name=f"lite-128-{bits}", payload_bits=bits)
        state = training.new_state(cfg, train_config, args.seed, "cpu")
        optimizer = training._warmup_optimizer(state, args.lr)
        sampler = training.FaceSampler(faces, args.batch, args.seed)
        t0 = time.time()
        for step in range(1, args.steps + 1):
            m = training._hiding_warmup_step(state, priors, training.collate(sampler.next_faces(), r), optimizer,
                                             None, min_psnr)
            if step % 100 == 0:
                print(f"  {bits} bits, budget {min_psnr}: step {step} loss {m['hiding_warmup/loss']:.3f} "
                      f"training BER {m['hiding_warmup/hiding_ber']:.4f} L1 {m['hiding_warmup/l1']:.3f}", flush=True)
        seconds = time.time() - t0
        row = {"payload_bits": bits, "planes": -(-bits // face_capacity_per_plane(r)), "min_psnr": min_psnr,
               "steps": args.steps, "train_seconds": round(seconds), **evaluate(state.model, priors, photos, transforms, crops)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["payload_bits", "planes", "min_psnr", "ber_png", "ber_jpeg_q90", "payload_psnr_db", "face_psnr_db",
            "face_change_grey", "train_seconds"]
    print("\n" + " | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    if args.out:
        args.out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "out"},
                                        "portraits": len(crops), "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
