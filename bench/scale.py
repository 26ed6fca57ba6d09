"""Scale benchmark: the demo-sized job with 1 and 2 model actors, next to the model's raw faces/s.

Usage: python bench/scale.py [--copies 4] [--method blur] [--batch 32]

A local Ray is started with 2 *logical* GPUs, so the model stage runs split out in its own actor pool
(exactly as on a GPU cluster) even on a CPU-only machine; with no real GPU the model actors compute on
the CPU. The raw figure is the same anonymizer called in-process on batches of aligned crops, so the
ratio says how much of the model's speed the pipeline delivers. For G2Face's own raw speed (random
weights) see bench/model_speed.py.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def raw_faces_per_s(method: str, resolution: int, batch: int, seconds: float = 3.0) -> float:
    from pipeline.anonymizers import build_anonymizer

    model = build_anonymizer(method, resolution, 0.08, 8, None)
    model.setup(torch.device("cpu"))
    x = torch.rand(batch, 3, resolution, resolution)
    seeds = list(range(batch))
    model.anonymize(x, seeds)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.anonymize(x, seeds)
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--method", default="blur", choices=["blur", "pixelate"])
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import logging

    import ray

    from pipeline.runner import run_job
    from pipeline.spec import parse_spec

    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             _node_ip_address="127.0.0.1")
    tmp = Path(tempfile.mkdtemp(prefix="g2face-scale-"))
    try:
        inp = tmp / "in"
        inp.mkdir()
        for c in range(args.copies):
            for s in sorted(glob.glob(str(ROOT / "data" / "demo" / "nasa-*.tar"))):
                shutil.copy(s, inp / f"c{c:02d}-{Path(s).name}")
        rows = {}
        for actors in (1, 2):
            out = tmp / f"out{actors}"
            spec = parse_spec({
                "dataset": {"id": "scale"},
                "input": {"format": "webdataset", "paths": str(inp / "*.tar")},
                "output": {"dir": str(out), "keys": "keep"},
                "anonymizer": {"method": args.method},
                "runtime": {"executor": "ray", "progress": False},
                "resources": {"detect": {"actors": 2, "num_cpus": 0.5, "batch_size": 8},
                              "anonymize": {"actors": actors, "num_gpus": 1, "num_cpus": 0.5, "batch_size": args.batch}},
            })
            t0 = time.perf_counter()
            run = run_job(spec, echo=lambda *_: None)
            wall = time.perf_counter() - t0
            timing = json.loads((out / "run_timings.json").read_text())
            c = run["counts"]
            rows[actors] = {"images": c["samples"], "faces": c["faces"], "execute_s": timing["execute_seconds"],
                            "images_per_s": round(c["samples"] / timing["execute_seconds"], 2),
                            "faces_per_s": round(c["faces"] / timing["execute_seconds"], 2), "wall_s": round(wall, 2)}
        raw = raw_faces_per_s(args.method, 128, args.batch)
        print(f"demo corpus x{args.copies} ({rows[1]['images']} images), method {args.method}, model stage split out "
              f"(logical GPUs, CPU compute)")
        for actors, r in rows.items():
            print(f"{actors} model actor(s): {r['images_per_s']:.2f} images/s, {r['faces_per_s']:.2f} faces/s "
                  f"(execute {r['execute_s']:.2f} s) = {r['faces_per_s'] / raw:.4f} of the raw model speed")
        print(f"raw {args.method} at batch {args.batch}: {raw:.1f} faces/s; scaling 2 vs 1 actors: "
              f"{rows[2]['faces_per_s'] / rows[1]['faces_per_s']:.2f}x")
        print(json.dumps({"pipeline": rows, "raw_faces_per_s": round(raw, 1)}))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
