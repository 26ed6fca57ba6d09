"""Redraw side by side: the same corpus through the real pipeline with different ``anonymizer.draws``.

For each ``--draws`` value (and ``--guard`` setting), one reversible g2face run of ``g2face-pipe run``
(identity guard off by default, as ``g2face-pipe evaluate`` runs it, so every face keeps a model output) on
the same slice, model, key and seed:
a face's plain draws are the same in every run, so a larger value adds draws for the faces the smaller one
gave up on (and, with the identity push, grows the push more slowly: ``pipeline.redraw.push_strength``). Per run it prints bar 1's port figure (share of the run's published faces whose written face
is within dlib's 0.6 of the original, from the metrics stage), the same over the g2face faces alone (without
the job's fallback faces, too small or scored too low for the model), bar 5's MTCNN re-detection rate and its
misses by cause (fallback reason, or the redraw check's verdict on the kept draw: ``mtcnn_missed_by``), which
draw the faces kept, and seconds per image of the whole run, metrics stage included (as ``evaluate`` runs it;
a job without metrics spends a larger share of its time on redraws).

With ``--guard fallback`` (repeatable with ``--guard off``) the runs keep the identity guard on, as
production jobs do: the figures are then those of what a job publishes (faces the guard sent to the fallback
count as the fallback's faces), and each line says how many faces the guard replaced.

With ``--push 0 --push 0.5`` the runs differ only in ``anonymizer.identity_push``: faces that pass within
the plain draws are the same in both, so the difference is what the push does to the faces no plain draw
anonymized. ``--keys-from FILE`` restricts the slice to those samples (for example the keys an evaluation
found still matching), where the push is all that changes. ``--push-hold off --push-hold on`` differ only in
what a face gets after a pushed draw anonymized it but MTCNN missed it: plain draws, or weaker pushes.
``--reinforce-steps 0 --reinforce-steps 12`` differ only in payload reinforcement, which runs after the redraw
check: what it changes in bar 5 shows in the misses the check had found (``passed``, ``weak_detection``).
``--keep-detection off --keep-detection on`` differ only in whether a face that reinforcement loses to MTCNN
keeps less of it (``anonymizer.payload_reinforce_keep_detection``; each line counts the faces scaled back).

Usage (CPU, 2 cores: about 0.55 s per image at 8 draws, 0.7 s at 16):
    python bench/redraw.py --data '../shared/data/val/*.tar' --skip 400 --limit 400 --draws 8 --draws 16
    python bench/redraw.py --data '../shared/data/val/*.tar' --limit 400 --draws 16 --guard off --guard fallback
    python bench/redraw.py --data '../shared/data/val/*.tar' --limit 1000 --draws 16 --push 0 --push 0.5
    python bench/redraw.py --data '../shared/data/val/*.tar' --keys-from KEYS --draws 16 --push-hold off --push-hold on
    python bench/redraw.py --data '../shared/data/val/*.tar' --limit 500 --draws 16 --reinforce-steps 0 --reinforce-steps 12
    python bench/redraw.py --data '../shared/data/val/*.tar' --limit 500 --draws 16 --keep-detection off --keep-detection on
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import storage  # noqa: E402
from pipeline.audit import load_run  # noqa: E402
from pipeline.evaluate import job_tree, write_evaluation_key  # noqa: E402
from pipeline.privacy_metrics import privacy_row, utility_row  # noqa: E402
from pipeline.runner import run_job  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402


def slice_samples(urls: list[str], skip: int, limit: int, out: Path, keys: set[str] | None = None) -> int:
    """Samples skip .. skip + limit of the shards (of those whose key is in ``keys``, when given), in order, as
    one WebDataset shard at ``out``; returns how many."""
    seen, taken = 0, 0
    with tarfile.open(out, "w") as dst:
        for url in urls:
            fs, p = storage.url_to_fs(url)
            with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as src:
                last = None
                for m in src:
                    if not m.isfile():
                        continue
                    key = m.name.rsplit("/", 1)[-1].split(".")[0]
                    if keys is not None and key not in keys:
                        continue
                    if key != last:
                        last, seen = key, seen + 1
                        if seen > skip + limit:
                            return taken
                        taken += seen > skip
                    if seen > skip:
                        dst.addfile(m, src.extractfile(m))
    return taken


def run_draws(draws: int, shard: Path, scratch: Path, key: Path, checkpoint: Path, threads: int,
              guard: str = "off", push: float | None = None, hold: bool | None = None,
              reinforce: int | None = None, keep: bool | None = None) -> dict:
    name = (f"draws{draws}-guard-{guard}" + ("" if push is None else f"-push-{push:g}")
            + ("" if hold is None else f"-hold-{'on' if hold else 'off'}")
            + ("" if reinforce is None else f"-reinforce-{reinforce}")
            + ("" if keep is None else f"-keep-detection-{'on' if keep else 'off'}"))
    tree = job_tree("g2face", [str(shard)], scratch / name, key, 128, checkpoint, "cpu", threads, 0, draws)
    tree["anonymizer"]["identity_guard"] = guard
    if push is not None:
        tree["anonymizer"]["identity_push"] = push
    if hold is not None:
        tree["anonymizer"]["identity_push_hold"] = hold
    if reinforce is not None:
        tree["anonymizer"]["payload_reinforce_steps"] = reinforce
    if keep is not None:
        tree["anonymizer"]["payload_reinforce_keep_detection"] = keep
    t = time.perf_counter()
    run_job(parse_spec(tree, f"<bench {name}>"), echo=lambda *_: None)
    seconds = time.perf_counter() - t
    run = load_run(str(scratch / name))
    faces = [f for r in run.public if r["published"] for f in r["faces"] if f.get("metrics")]
    kept = collections.Counter(f.get("draw") for f in faces if f["method"] == "g2face")
    privacy = privacy_row(name, run, None)  # bar 1's port figure, as evaluate computes it
    model = {m["method"]: m for m in privacy["by_method"]}.get("g2face", {})
    guarded = sum(f.get("fallback_reason") in ("identity_match", "identity_unchecked") for f in faces)
    pushed = sum((f.get("identity_push") or 0) > 0 for f in faces)
    g2 = [f for f in faces if f["method"] == "g2face"]
    bers = [f["payload_ber"] for f in g2 if f.get("payload_ber") is not None]
    an = run.doc["spec"]["anonymizer"]
    utility = utility_row(name, run)
    return {"draws": draws, "identity_guard": guard, "identity_push": an.get("identity_push"),
            "identity_push_after": an.get("identity_push_after"),
            "identity_push_hold": an.get("identity_push_hold"),
            "payload_reinforce_steps": an.get("payload_reinforce_steps", 0),
            "payload_reinforce_keep_detection": an.get("payload_reinforce_keep_detection"),
            "faces_reinforcement_scaled": sum(f.get("reinforce_share") is not None and f["reinforce_share"] < 1
                                              for f in faces),
            "faces_pushed": pushed, "faces_guarded": guarded,
            "images": len(run.public), "faces": len(faces), "g2face_faces": model.get("faces", 0),
            "port_share_still_matching": privacy["share_still_matching"],
            "port_share_still_matching_g2face_only": model.get("share_still_matching"),
            "mean_identity_distance": (privacy["identity_distance"] or {}).get("mean"),
            "mtcnn_detection_rate": utility["mtcnn_detection_rate"],
            "mtcnn_missed_by": utility["mtcnn_missed_by"],  # fallback reason or the redraw check's verdict
            # the payload of a pushed draw must read back as well as a plain one's (bar 4)
            "payload_verified_share": sum(bool(f.get("payload_ok")) for f in g2) / max(len(g2), 1),
            "payload_ber_mean": sum(bers) / len(bers) if bers else None,
            "faces_by_kept_draw": {str(k): v for k, v in sorted(kept.items())},
            "seconds": round(seconds, 1), "seconds_per_image": round(seconds / max(len(run.public), 1), 3)}

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="WebDataset shards (glob)")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N samples")
    ap.add_argument("--limit", type=int, default=400, help="then take N samples")
    ap.add_argument("--draws", type=int, action="append", default=[],
                    help="anonymizer.draws (repeatable; default 8 and 16)")
    ap.add_argument("--guard", action="append", default=[], choices=["off", "fallback"],
                    help="anonymizer.identity_guard (repeatable; default off, as evaluate measures the model)")
    ap.add_argument("--push", type=float, action="append", default=[],
                    help="anonymizer.identity_push (repeatable; default: the job default)")
    ap.add_argument("--push-hold", action="append", default=[], choices=["on", "off"],
                    help="anonymizer.identity_push_hold (repeatable; default: the job default)")
    ap.add_argument("--reinforce-steps", type=int, action="append", default=[],
                    help="anonymizer.payload_reinforce_steps (repeatable; default: the job default; 0: off)")
    ap.add_argument("--keep-detection", action="append", default=[], choices=["on", "off"],
                    help="anonymizer.payload_reinforce_keep_detection (repeatable; default: the job default)")
    ap.add_argument("--keys-from", help="take only the samples whose keys are listed in this file (one per line), "
                    "e.g. the faces an evaluation found still matching; --skip and --limit then apply to those")
    ap.add_argument("--checkpoint", default=str(ROOT / "g2face" / "weights" / "g2face-lite-128.pt"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    from g2face.checkpoint import load_artifact

    sha = load_artifact(args.checkpoint).artifact_sha256
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-redraw-") as tmp:
        scratch = Path(tmp)
        shard = scratch / "slice.tar"
        keys = set(Path(args.keys_from).read_text().split()) if args.keys_from else None
        n = slice_samples(storage.list_shards(args.data), args.skip, args.limit, shard, keys)
        key = scratch / "evaluation.key"
        write_evaluation_key(key, sha)
        for d in args.draws or [8, 16]:
            for guard in args.guard or ["off"]:
                for push in args.push or [None]:
                    for hold in [h == "on" for h in args.push_hold] or [None]:
                        for steps in args.reinforce_steps or [None]:
                            for keep in [k == "on" for k in args.keep_detection] or [None]:
                                results.append(run_draws(d, shard, scratch, key, Path(args.checkpoint),
                                                         args.threads, guard, push, hold, steps, keep))
                                print(json.dumps(results[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"samples": n, "skip": args.skip, "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
