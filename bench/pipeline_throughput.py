"""Images/s of the Ray pipeline vs a plain single-process loop doing the same stages on the same shards.

Usage: python bench/pipeline_throughput.py [--shards GLOB] [--copies N] [--actors N] [--method blur]

Default input: the bundled demo shards copied N times (the demo portraits, 400 px). Both runs use the
same job (MTCNN detection, alignment, the anonymizer, paste-back, encode, manifests) and write to
fresh temp dirs; the figures are execution time only (Ray start-up is reported separately).
"""
from __future__ import annotations

import argparse
import glob
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=str(ROOT / "data" / "demo" / "nasa-*.tar"))
    ap.add_argument("--copies", type=int, default=4, help="copies of each input shard (more shards, steadier figures)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--method", default="blur", choices=["blur", "pixelate"])
    args = ap.parse_args()

    from pipeline.runner import run_job
    from pipeline.spec import parse_spec

    tmp = Path(tempfile.mkdtemp(prefix="g2face-bench-"))
    try:
        inp = tmp / "in"
        inp.mkdir()
        sources = sorted(glob.glob(args.shards))
        if not sources:
            raise SystemExit(f"--shards {args.shards} matches nothing")
        for c in range(args.copies):
            for s in sources:
                shutil.copy(s, inp / f"c{c:02d}-{Path(s).name}")

        def job(executor: str, out: Path):
            return parse_spec({
                "dataset": {"id": "bench"},
                "input": {"format": "webdataset", "paths": str(inp / "*.tar")},
                "output": {"dir": str(out), "keys": "keep"},
                "anonymizer": {"method": args.method},
                "runtime": {"executor": executor, "progress": False, "num_cpus": 4},
                "resources": {"detect": {"actors": args.actors, "num_cpus": 0.5, "batch_size": 8}},
            })

        results = {}
        from pipeline.ray_adapter import ensure_ray

        t = time.perf_counter()
        ensure_ray(job("ray", tmp / "unused"))
        ray_start = time.perf_counter() - t
        for executor in ("local", "ray"):
            t = time.perf_counter()
            run = run_job(job(executor, tmp / executor), echo=lambda *_: None)
            wall = time.perf_counter() - t
            timing = json.loads((tmp / executor / "run_timings.json").read_text())
            n = run["counts"]["samples"]
            results[executor] = {"images": n, "faces": run["counts"]["faces"], "execute_s": timing["execute_seconds"],
                                 "wall_s": round(wall, 2), "images_per_s": round(n / timing["execute_seconds"], 2)}
        ratio = results["ray"]["images_per_s"] / results["local"]["images_per_s"]
        print(f"input: {len(sources)} shard(s) x {args.copies} copies, method {args.method}, {args.actors} Ray actor(s)")
        for k, v in results.items():
            print(f"{k:6s} {v['images']} images, {v['faces']} faces: {v['images_per_s']:.2f} images/s "
                  f"(execute {v['execute_s']:.2f} s, wall {v['wall_s']:.2f} s)")
        print(f"ratio ray/local: {ratio:.2f}   (Ray start-up, excluded above: {ray_start:.2f} s)")
        print(json.dumps({"results": results, "ratio_ray_over_local": round(ratio, 3), "ray_startup_s": round(ray_start, 2)}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
