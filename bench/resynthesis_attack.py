"""Key-less re-synthesis attack next to the key holder's recovery, on a finished reversible g2face run.

Runs ``evaluate``'s recovery figures (bar 3: ``recover_shard`` with the right key) and, on the same faces and
crops, the attack of ``pipeline.resynthesis``: the model's recover pass run by someone without the key, on
public material only. Prints both shares of faces matching their original (dlib port, 0.6), the published
faces' own share, and the identity distances. A key-less share near the key holder's means the key adds
little: the model restores the person from the anonymized face itself.

Usage (the g2face run of an ``evaluate`` work dir, whose key is evaluation.key beside it):
    python bench/resynthesis_attack.py --run /tmp/g2face-eval-push/g2face --key /tmp/g2face-eval-push/evaluation.key
    python bench/resynthesis_attack.py --run DIR --key KEY --shards 2      # the first two shards only
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from g2face.identity import SAME_PERSON_DISTANCE  # noqa: E402
from pipeline.audit import load_run  # noqa: E402
from pipeline.evaluate_faces import published_images  # noqa: E402
from pipeline.evaluate_recovery import recovery_figures  # noqa: E402
from pipeline.metrics_stage import FaceMeasurer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="output.dir of a finished reversible g2face run (with metrics)")
    ap.add_argument("--key", required=True, help="the run's master key (for the key holder's side)")
    ap.add_argument("--shards", type=int, default=0, help="only the first N shards of the run (0: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)

    run = load_run(args.run)
    with tempfile.TemporaryDirectory(prefix="bench-resynthesis-") as tmp:
        if args.shards:  # a run dir holding only the first N shards, so the key holder's recovery covers the same
            keep = [item["shard"] for item in run.doc["inputs"]][: args.shards]
            sub = Path(tmp) / "run"
            for part in ("shards", "manifests", "private", "done"):
                (sub / part).mkdir(parents=True)
                for name in keep:
                    for p in (Path(args.run) / part).iterdir():
                        if p.name == name or p.name.startswith(name + "."):
                            shutil.copy(p, sub / part / p.name)
            doc = {**run.doc, "inputs": [i for i in run.doc["inputs"] if i["shard"] in keep]}
            (sub / "run.json").write_text(json.dumps(doc))
            run = load_run(str(sub))
        t = time.perf_counter()
        images, skipped = published_images(run)
        measurer = FaceMeasurer(256, device=args.device)
        rec = recovery_figures(run, Path(args.key), Path(tmp) / "recovery", measurer, images, args.device)
        seconds = time.perf_counter() - t
    published = [f["metrics"]["identity_distance"] for r in run.public if r["published"] for f in r["faces"]
                 if f.get("method") == "g2face" and (f.get("metrics") or {}).get("identity_distance") is not None]
    if "without_key" not in rec:
        raise SystemExit(f"recovery figures not available: {rec.get('reason')}")
    keyless = rec["without_key"]
    figures = {
        "run": args.run, "shards": len(run.doc["inputs"]), "images_not_compared": skipped,
        "g2face_faces": rec["faces"],
        "published_share_matching": float(np.mean(np.asarray(published) < SAME_PERSON_DISTANCE)) if published else None,
        "key_holder_share_matching": rec["share_matching_original"],
        "key_holder_identity_distance": (rec.get("identity_distance") or {}).get("mean"),
        "without_key_share_matching": keyless["share_matching_original"],
        "without_key_identity_distance": (keyless.get("identity_distance") or {}).get("mean"),
        "without_key_attacked": keyless["attacked"],
        "seconds": round(seconds, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({**figures, "recovery": rec}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
