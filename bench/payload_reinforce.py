"""Payload reinforcement side by side: the same corpus through the real pipeline with and without it.

For each setting (``--setting STEPS:MAX_CHANGE``, 0 = off), one reversible g2face run of ``g2face-pipe run``
(PNG output unless ``--image-format jpeg``; identity guard off so every face keeps the model's output) on the
same slice of the corpus, the same model and key. Per run it prints bar 4's figures as ``g2face-pipe
evaluate`` computes them (the raw bit error rate the verification stage read back from the written files,
and the decode rate of the real payloads after re-encoding them as JPEG q90), the tail (faces with more than
1% wrong bits), how many images had to be re-encoded as PNG to verify (JPEG output), what reinforcement
changed in the written images against the first setting (where pixels differ: mean and largest absolute
difference; for JPEG output this includes the codec's own response to the change), and seconds per image.

Usage (CPU, about 30 s per setting per 100 images with the default 12 steps, on 2 cores):
    python bench/payload_reinforce.py --data '../shared/data/val/*.tar' --limit 300 --setting 0:6 --setting 12:6
    python bench/payload_reinforce.py --data '../shared/data/val/*.tar' --limit 200 --image-format jpeg
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import storage  # noqa: E402
from pipeline.audit import load_run  # noqa: E402
from pipeline.evaluate import DATASET_ID, job_tree, slice_shards, write_evaluation_key  # noqa: E402
from pipeline.evaluate_faces import published_images  # noqa: E402
from pipeline.evaluate_recovery import payload_figures  # noqa: E402
from pipeline.runner import run_job  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402


def run_setting(steps: int, max_change: int, shards, scratch: Path, key: Path, checkpoint: Path, threads: int,
                image_format: str, jpeg_quality: int) -> dict:
    name = f"steps{steps}-change{max_change:g}"
    tree = job_tree("g2face", shards, scratch / name, key, 128, checkpoint, "cpu", threads, 0)
    tree["anonymizer"] |= {"payload_reinforce_steps": steps, "payload_reinforce_max_change": max_change}
    tree["output"] |= {"image_format": image_format, "jpeg_quality": jpeg_quality}
    t = time.perf_counter()
    run_job(parse_spec(tree, f"<bench {name}>"), echo=lambda *_: None)
    seconds = time.perf_counter() - t
    run = load_run(str(scratch / name))
    images, _ = published_images(run)
    pay = payload_figures(run, key, images, "cpu")
    bers = np.array([f["payload_ber"] for r in run.public if r["published"] for f in r["faces"]
                     if f.get("method") == "g2face" and f.get("payload_ber") is not None])
    published = [r for r in run.public if r["published"]]
    return {"setting": name, "steps": steps, "max_change": max_change, "output": image_format,
            "images_reencoded_as_png": sum(bool(r.get("payload_reencoded")) for r in published),
            "seconds": round(seconds, 1),
            "seconds_per_image": round(seconds / max(len(run.public), 1), 3),
            # the verification stage's figures on the bytes as written (PNG, or the job's JPEG)
            "ber_as_written": pay.get("ber_png"), "payload_ok_rate_as_written": pay.get("payload_ok_rate_png"),
            "decode_rate_jpeg_q90": pay.get("decode_rate_jpeg_q90"),
            "faces": int(bers.size), "faces_ber_above_1pct": int((bers > 0.01).sum()),
            "ber_without_those": float(bers[bers <= 0.01].mean()) if (bers <= 0.01).any() else None,
            "images": {(im.shard, im.public["key"]): im for im in images}}


def change_against(base: dict, other: dict) -> dict:
    """Mean / largest absolute grey-level change between two runs' written images, where they differ."""
    diffs = []
    for k, im in other["images"].items():
        ref = base["images"].get(k)
        if ref is None:
            continue
        a, b = im.written.astype(np.int16), ref.written.astype(np.int16)
        if a.shape == b.shape:
            d = np.abs(a - b)
            diffs.append(d[d.max(axis=2) > 0].ravel() if (d > 0).any() else np.zeros(0, np.int16))
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    return {"changed_pixel_values": int(d.size), "mean_abs_change_where_changed": float(d.mean()) if d.size else 0.0,
            "max_abs_change": int(d.max()) if d.size else 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="WebDataset shards (glob)")
    ap.add_argument("--limit", type=int, default=300, help="first N samples")
    ap.add_argument("--setting", action="append", default=[],
                    help="STEPS:MAX_CHANGE (repeatable; the first is the reference; default 0:6 and 12:6, the job default)")
    ap.add_argument("--checkpoint", default=str(ROOT / "g2face" / "weights" / "g2face-lite-128.pt"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--image-format", default="png", choices=["png", "jpeg"],
                    help="the runs' output format (jpeg: reinforcement reads through the job's own JPEG; a face "
                         "that still fails is re-encoded as PNG, counted in images_reencoded_as_png)")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    settings = [(int(s.split(":")[0]), int(s.split(":")[1])) for s in (args.setting or ["0:6", "12:6"])]
    from g2face.checkpoint import load_artifact

    sha = load_artifact(args.checkpoint).artifact_sha256
    with tempfile.TemporaryDirectory(prefix="bench-reinforce-") as tmp:
        scratch = Path(tmp)
        shards, n = slice_shards(storage.list_shards(args.data), args.limit, scratch / "inputs")
        key = scratch / "evaluation.key"
        write_evaluation_key(key, sha)
        results = [run_setting(s, c, shards, scratch, key, Path(args.checkpoint), args.threads, args.image_format,
                               args.jpeg_quality) for s, c in settings]
        for r in results[1:]:
            r["change_vs_first"] = change_against(results[0], r)
    for r in results:
        r.pop("images")
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps({"samples": n, "dataset": DATASET_ID, "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
