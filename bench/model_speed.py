"""Faces per second of G2Face's ``anonymize`` and ``recover`` (speed only: the weights are RANDOM).

Runs lite-128 and paper-256 on the CPU, and on CUDA in fp32 and bf16 autocast when a GPU is present.
Random weights cost exactly what trained ones do; the images they produce mean nothing.

    .venv/bin/python bench/model_speed.py                 # CPU (batch 4) and, if present, CUDA (batch 32)
    .venv/bin/python bench/model_speed.py --cpu-batch 8 --iters 5 --presets lite-128
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from g2face.config import preset
from g2face.model import G2Face


def _time(fn, iters: int, device: torch.device) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(name: str, device: torch.device, precision: str, batch: int, iters: int) -> list[dict]:
    cfg = preset(name)
    torch.manual_seed(0)
    model = G2Face(cfg).to(device).eval()  # random weights: speed only
    r = cfg.resolution
    faces = torch.rand(batch, 3, r, r, device=device)
    identity = torch.randn(batch, cfg.identity_dim, device=device)
    geometry = torch.randn(batch, cfg.geometry_dim, device=device)
    bits = torch.randint(0, 2, (batch, cfg.payload_bits), device=device).float()
    seeds = list(range(batch))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    rows = []
    with autocast:
        anonymized = model.anonymize(faces, identity, geometry, bits, seeds)
        for op, fn in (("anonymize", lambda: model.anonymize(faces, identity, geometry, bits, seeds)),
                       ("recover", lambda: model.recover(anonymized, identity, geometry, seeds))):
            sec = _time(fn, iters, device)
            rows.append({"preset": name, "device": device.type, "precision": precision, "batch": batch, "op": op,
                         "faces_per_s": round(batch / sec, 2), "ms_per_batch": round(sec * 1e3, 1)})
            print(f"{name:10s} {device.type:4s} {precision:4s} batch {batch:3d} {op:9s} "
                  f"{batch / sec:9.2f} faces/s  ({sec * 1e3:8.1f} ms/batch)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["lite-128", "paper-256"])
    ap.add_argument("--cpu-batch", type=int, default=4)
    ap.add_argument("--gpu-batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3, help="timed calls per measurement (median reported)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU runs")
    args = ap.parse_args()
    print(f"G2Face model speed, RANDOM weights (speed only); torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    rows = []
    if not args.no_cpu:
        for name in args.presets:
            rows += bench(name, torch.device("cpu"), "fp32", args.cpu_batch, args.iters)
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name()}")
        for name in args.presets:
            for precision in ("fp32", "bf16"):
                rows += bench(name, torch.device("cuda"), precision, args.gpu_batch, max(args.iters, 10))
    print(json.dumps({"results": rows}))


if __name__ == "__main__":
    main()
