"""Fine-tune the payload extractor of a G2Face artifact on the pipeline's real publishing channel (CPU is enough).

The generator is frozen (anonymised faces stay bit-identical); only the extractor learns to read the bits
through paste-back, PNG / Pillow JPEG and re-alignment (``pipeline.extractor_tuning``). Faces of the
held-out LFW people of ``scripts/make_gpu_carry.py`` are never trained on: the before/after figures
(bit error rate, decode rate of real encrypted payloads, PNG and JPEG q90) are measured on them, both
models side by side in this one run. The new artifact keeps the old metadata plus an ``extractor_tuning``
record; it is written only with ``--out``.

The held-out figures are paired: every model measured hides the same payloads in the same faces through the
same transforms (``--compare OTHER`` measures another artifact in the same run; ``--epochs 0`` only measures).

Usage (about 30 min on the 2-core machine with the defaults):
    python scripts/finetune_extractor.py --data '/tmp/g2face-prepared/lfw-devtrain/shards/*.tar' \
        --out /tmp/extractor/g2face-lite-128.pt --report /tmp/extractor/report.json
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from g2face.checkpoint import SHIPPED_ARTIFACT, load_artifact, load_torch_file, save_artifact  # noqa: E402
from g2face.training import _decode_png, read_faces  # noqa: E402
from make_gpu_carry import held_out_people, person_of  # noqa: E402
from pipeline.extractor_tuning import ChannelConfig, hide, payload_figures, tune_extractor  # noqa: E402


def arrays(faces, resolution: int):
    """uint8 crops (N, R, R, 3), identity (N, 128), geometry (N, 53) of prepared faces."""
    crops = []
    for f in faces:
        rgb = _decode_png(f.png)
        if rgb.shape[0] != resolution:
            rgb = cv2.resize(rgb, (resolution, resolution), interpolation=cv2.INTER_AREA)
        crops.append(rgb)
    missing = [f.key for f in faces if f.identity is None or f.geometry is None]
    if missing:
        sys.exit(f"prepared faces without identity/geometry priors (e.g. {missing[0]}); re-run `g2face-pipe prepare`")
    return (np.stack(crops), np.stack([f.identity for f in faces]).astype(np.float32),
            np.stack([f.geometry for f in faces]).astype(np.float32))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=str(SHIPPED_ARTIFACT), help="the model whose extractor is tuned")
    ap.add_argument("--data", required=True, help="glob of prepared shards (g2face-pipe prepare)")
    ap.add_argument("--faces", type=int, default=3000, help="training faces (seeded draw, held-out people excluded)")
    ap.add_argument("--held-out-faces", type=int, default=256, help="as make_gpu_carry.py: the people measured on")
    ap.add_argument("--eval-faces", type=int, default=256, help="held-out faces measured (before and after)")
    ap.add_argument("--epochs", type=int, default=6, help="0: only measure --artifact (and each --compare)")
    ap.add_argument("--compare", action="append", default=[], help="another artifact measured on the same draws")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--jpeg-share", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the tuned artifact here")
    ap.add_argument("--report", help="write the figures and training history here (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    paths = sorted(glob.glob(args.data))
    if not paths:
        sys.exit(f"--data {args.data!r} matches no file")
    faces = read_faces(paths)
    held = held_out_people([f.key for f in faces], args.held_out_faces)
    held_faces = [f for f in faces if person_of(f.key) in held][: args.eval_faces]
    pool = [f for f in faces if person_of(f.key) not in held]
    rng = np.random.default_rng(args.seed)
    train_faces = [pool[i] for i in sorted(rng.choice(len(pool), min(args.faces, len(pool)), replace=False))]
    stored = {v.dtype for v in load_torch_file(args.artifact, "G2Face artifact")["state_dict"].values()
              if v.is_floating_point()}
    if args.out and stored != {torch.float16}:
        sys.exit(f"--artifact {args.artifact} stores {sorted(map(str, stored))} weights; the tuned artifact is "
                 "written in fp16, which would round the generator: tune an fp16 artifact")
    model = load_artifact(args.artifact)
    res = model.config.resolution
    print(f"model {model.artifact_sha256[:16]}; {len(train_faces)} training faces, {len(held_faces)} held-out "
          f"({len(held)} people)", flush=True)

    ev = arrays(held_faces, res)
    before = payload_figures(model, *ev)
    print("before", json.dumps(before), f"{time.time() - t0:.0f}s", flush=True)
    compared = {}
    for path in args.compare:
        compared[path] = payload_figures(load_artifact(path), *ev)
        print(path, json.dumps(compared[path]), flush=True)
    if args.epochs == 0:
        if args.report:
            Path(args.report).write_text(json.dumps({"artifact": args.artifact, "figures": before,
                                                     "compare": compared}, indent=1))
        return 0

    crops, identity, geometry = arrays(train_faces, res)
    bits = rng.integers(0, 2, (len(crops), model.config.payload_bits)).astype(np.float32)
    seeds = [int(s) for s in rng.integers(0, 2**62, len(crops))]
    generated = hide(model, crops, identity, geometry, bits, seeds)
    print(f"hid {len(generated)} payloads, {time.time() - t0:.0f}s", flush=True)

    config = ChannelConfig(jpeg_share=args.jpeg_share)
    history = tune_extractor(model, crops, generated, bits, epochs=args.epochs, config=config,
                             batch_size=args.batch, lr=args.lr, seed=args.seed,
                             log=lambda r: print(json.dumps(r), f"{time.time() - t0:.0f}s", flush=True))

    report = {"artifact": args.artifact, "artifact_sha256": model.artifact_sha256, "before": before,
              "training": {"faces": len(train_faces), "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
                           "seed": args.seed, "channel": config.__dict__, "history": history},
              "held_out": {"people": len(held), "faces": len(held_faces)}}
    if args.out:
        metadata = dict(model.artifact_metadata)
        metadata["extractor_tuning"] = {"from": model.artifact_sha256, "faces": len(train_faces),
                                        "epochs": args.epochs, "channel": "paste-back, PNG or Pillow JPEG "
                                        f"q{config.jpeg_quality[0]}-{config.jpeg_quality[1]}, re-alignment"}
        digest = save_artifact(model, args.out, metadata=metadata)
        tuned = load_artifact(args.out)  # measure what was written (fp16), not the fp32 copy in memory
        report["tuned_sha256"] = digest
        report["after"] = payload_figures(tuned, *ev)
        print("after ", json.dumps(report["after"]), flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
