"""Speed of the shipped priors in faces/s: identity (dlib ResNet port), 3DMM fit, geometry regressor.

    .venv/bin/python bench/priors_speed.py                 # CPU (and CUDA when a GPU is visible)
    .venv/bin/python bench/priors_speed.py --threads 1 --json runs/priors_speed.json

Inputs are real faces: the committed NASA portraits (data/demo) prepared with `pipeline.prepare` into a
temporary folder (aligned crops, dlib landmarks), repeated to fill a batch. Timed per stage:
- identity: aligned 256 px crop -> differentiable warp to dlib's 150 px chip -> 128-d descriptor;
- fit: dlib's 68 landmarks -> g2face.morphable.fit_landmarks (float64 on the CPU; there is no GPU path);
- regressor: aligned 128 px crop -> g2face.geometry_net (geometry, camera, landmarks).
Each is the median of --repeats timed passes after one warm-up; CUDA timings synchronise the device.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from g2face import geometry_net, identity, morphable
from pipeline import align
from pipeline.prepare import prepare, read_prepared
from pipeline.shardio import read_webdataset
from pipeline.imaging import decode_image

ROOT = Path(__file__).resolve().parents[1]


def demo_faces() -> dict[str, np.ndarray]:
    shards = sorted((ROOT / "data" / "demo").glob("nasa-*.tar"))
    with tempfile.TemporaryDirectory() as tmp:
        job = {"dataset": {"id": "bench"}, "input": {"format": "webdataset", "paths": [str(s) for s in shards]},
               "output": {"dir": tmp}, "prepare": {"identity": False}, "runtime": {"progress": False}}
        prepare(job, echo=lambda s: None)
        items = [it for s in shards for it in read_prepared(Path(tmp) / "shards" / s.name)]
    sources = {raw.key: decode_image(raw.fields["jpg"], 10**8).rgb for s in shards for raw in read_webdataset(str(s), None)}
    big = [align.warp_to_crop(sources[it["key"]], it["transform"] * 2.0, 256) for it in items]
    return {"crop128": np.stack([it["image"] for it in items]), "crop256": np.stack(big),
            "landmarks68": np.stack([it["landmarks68"] for it in items])}


def tile(a: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([a] * (n // len(a) + 1))[:n]


def timed(fn, repeats: int, device: torch.device) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()  # warm-up
    return float(np.median([once() for _ in range(repeats)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="faces per call for the networks")
    ap.add_argument("--fit-batch", type=int, default=256, help="faces per fit call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    faces = demo_faces()
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch, "faces_per_s": {}}

    lms = tile(faces["landmarks68"], args.fit_batch)
    t = timed(lambda: morphable.fit_landmarks(lms), args.repeats, torch.device("cpu"))
    results["faces_per_s"]["fit/cpu"] = round(args.fit_batch / t, 1)

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        tag = dev.type
        if tag == "cuda":
            results["gpu"] = torch.cuda.get_device_name(dev)
        net = identity.load_dlib_face_resnet(device=dev)
        x256 = torch.from_numpy(tile(faces["crop256"], args.batch)).to(dev).permute(0, 3, 1, 2).float().div(255)
        tmpl = align.template(256)

        def run_identity():
            with torch.inference_mode():
                net(identity.aligned_to_chip(x256, tmpl))

        results["faces_per_s"][f"identity/{tag}"] = round(args.batch / timed(run_identity, args.repeats, dev), 1)
        reg = geometry_net.load_geometry_net(device=dev)
        x128 = torch.from_numpy(tile(faces["crop128"], args.batch)).to(dev).permute(0, 3, 1, 2).float().div(255)

        def run_regressor():
            with torch.inference_mode():
                reg(x128)

        results["faces_per_s"][f"regressor/{tag}"] = round(args.batch / timed(run_regressor, args.repeats, dev), 1)
        if tag == "cuda":  # larger batches are where a GPU pays off
            big = x128.repeat(8, 1, 1, 1)

            def run_regressor_big():
                with torch.inference_mode():
                    reg(big)

            results["faces_per_s"]["regressor/cuda/batch512"] = round(512 / timed(run_regressor_big, args.repeats, dev), 1)
    for k, v in results["faces_per_s"].items():
        print(f"{k:>26}: {v:10.1f} faces/s")
    print(f"(torch {results['torch']}, {results['threads']} CPU thread(s), batch {args.batch}, fit batch {args.fit_batch})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
