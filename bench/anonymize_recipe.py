"""Full-objective training variants side by side, from one warm start: which settings change identity.

Each variant here starts from the same warm start (default: the shipped artifact; generator and EMA from it, a
fresh discriminator), trains the same number of full-objective steps (``g2face.train_step.train_step``:
anonymization pass, recovery pass, discriminator) with the same seed and data order, and differs only in its
TrainConfig settings. Then, on held-out faces (prepared shards of people not in training, e.g. the CelebA val
set) with fixed draws, the training weights are measured on the inference path (dummy identity, real geometry,
random payload, 8-bit output):

- ``still_matching``: share of anonymized faces within dlib's 0.6 of their original (PyTorch port on the
  aligned crops: bar 1's first route), and ``mean_distance``;
- ``recovered_matching`` / ``recovered_psnr_db``: the recovery pass with the original identity (bar 3's
  figures, on crops);
- ``ber``: payload bits read back from the 8-bit output (no paste-back);
- ``change_grey``: mean absolute change inside the paste mask (bar 6);
- ``detected``: share of anonymized crops MTCNN's RNet and ONet accept (bar 5's detector, at its box);
- ``keyless_matching``: share that recovery given the anonymized face's own identity (no key) restores.

Usage (CPU: about 16 s per step at batch 8 on two cores, 100 steps in 27 minutes):
    python bench/anonymize_recipe.py --data /tmp/g2face-prepared/lfw2/shards \\
        --held-out /tmp/g2face-prepared/celeba-val5/shards --held-out-faces 160 --steps 100 --batch 8 \\
        --variant shipped: --variant det3:weights.detectability=3 --save-dir /tmp/recipe-weights
A variant is NAME:KEY=VALUE,KEY=VALUE (TrainConfig settings, JSON values; empty: the defaults). Every
variant also gets ``--common`` settings (default: steps_per_epoch=100 and the shipped model's own recipe,
``g2face.training.SHIPPED_RECIPE``; from the shipped model, the official weights soon undo its anonymization).
``--save-dir DIR`` keeps each variant's measured weights as an inference artifact, so that a promising one can
be measured further (``bench/payload_visibility.py --checkpoint DIR/NAME.pt``: MTCNN on pasted-back photos)
without training it again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from g2face import training  # noqa: E402
from g2face import train_step as ts  # noqa: E402
from g2face.checkpoint import SHIPPED_ARTIFACT, load_artifact, save_artifact  # noqa: E402
from pipeline import align  # noqa: E402

DEFAULT_COMMON = ",".join(("steps_per_epoch=100", *training.SHIPPED_RECIPE))


def parse_settings(text: str, where: str) -> dict:
    tree: dict = {}
    for pair in filter(None, text.split(",")):
        if "=" not in pair:
            raise SystemExit(f"{where}: {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        node = tree
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="prepared training shards (directory)")
    ap.add_argument("--held-out", required=True, help="prepared shards of people not in training (directory)")
    ap.add_argument("--held-out-faces", type=int, default=48)
    ap.add_argument("--warm-start", default=str(SHIPPED_ARTIFACT), help="inference artifact or warm_start/ dir")
    ap.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... (repeatable)")
    ap.add_argument("--common", default=DEFAULT_COMMON, help="settings every variant gets")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="JSON file for the table (its folder must exist)")
    ap.add_argument("--save-dir", type=Path, help="write each variant's measured (training) weights here as an "
                    "inference artifact <variant>.pt, for bench/payload_visibility.py or evaluate (scratch: not the repo)")
    args = ap.parse_args()
    # check the outputs before half an hour of training, not after
    if args.out and (args.out.is_dir() or not args.out.parent.is_dir()):
        ap.error(f"--out {args.out}: give a file path in an existing folder (it writes one JSON file)")
    if args.save_dir and args.save_dir.exists() and not args.save_dir.is_dir():
        ap.error(f"--save-dir {args.save_dir}: exists and is not a folder")
    variants = [v.split(":", 1) if ":" in v else (v, "") for v in args.variant or ["official:"]]
    torch.set_num_threads(args.threads)
    config = load_artifact(args.warm_start).config if Path(args.warm_start).is_file() else \
        training.G2FaceConfig.from_dict(json.loads((Path(args.warm_start) / training.META_FILE).read_text())["config"])
    r = config.resolution
    faces = training.read_faces(sorted(Path(args.data).glob("*.tar")))
    held = training.read_faces(sorted(Path(args.held_out).glob("*.tar")))[: args.held_out_faces]
    held_batch = training.collate(held, r)
    # MTCNN's RNet/ONet (facenet-pytorch, a dependency here): weights.detectability and the `detected` figure
    priors = training.build_priors(r, align.template(r), align.paste_mask(r), detector=True)
    common = parse_settings(args.common, "--common")
    rows = []
    start = load_artifact(args.warm_start) if Path(args.warm_start).is_file() else None
    if start is not None:
        rows.append({"variant": "(warm start)", "steps": 0, "train_seconds": 0, **training.held_out_figures(start, priors, held_batch)})
        print(json.dumps(rows[-1]), flush=True)
    for name, text in variants:
        train_config = training.train_config_from_dict(merge(common, parse_settings(text, f"--variant {name}")))
        state = training.new_state(config, train_config, args.seed, "cpu")
        training.load_warm_start(state, args.warm_start)
        sampler = training.FaceSampler(faces, args.batch, args.seed)
        t0 = time.time()
        for step in range(1, args.steps + 1):
            m = ts.train_step(state, training.collate(sampler.next_faces(), r), priors)
            if step % 20 == 0:
                print(f"  {name}: step {step} identity_dissimilar {m['anonymize/identity_dissimilar']:.3f} "
                      f"identity_dummy {m['anonymize/identity_dummy']:.3f} l1 {m.get('anonymize/l1', float('nan')):.3f} "
                      f"BER {m['anonymize/hiding_ber']:.4f}", flush=True)
        rows.append({"variant": name, "settings": text, "steps": args.steps, "train_seconds": round(time.time() - t0),
                     **training.held_out_figures(state.model, priors, held_batch)})
        if args.save_dir:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            rows[-1]["artifact_sha256"] = save_artifact(
                state.model, args.save_dir / f"{name}.pt",
                metadata={"bench": "anonymize_recipe", "variant": name, "settings": text, "steps": args.steps,
                          "common": args.common, "warm_start": str(args.warm_start), "weights": "generator"})
        print(json.dumps(rows[-1]), flush=True)
    cols = ["variant", "steps", "still_matching", "mean_distance", "recovered_matching", "recovered_psnr_db", "ber",
            "change_grey", "detected", "keyless_matching", "train_seconds"]
    print("\n" + " | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c)) for c in cols))
    if args.out:
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                        "held_out_faces": len(held), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
