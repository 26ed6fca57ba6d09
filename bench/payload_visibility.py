"""How much of what MTCNN misses is the hidden payload: the same draws with and without its signal.

The shipped lite-128 model hides 3,240 bits in every face; encrypted, they are random, and the hiding layers
turn them into a fine coloured speckle over the face. Bar 5 (MTCNN re-detection of anonymized faces) is the
one bar the model misses. This diagnostic renders each held-out face with one dummy identity, one set of noise
maps and its real geometry, and only the payload bits differing:

- ``random``: random bits, as every real (encrypted) payload looks;
- ``random_other``: other random bits (the change between the two is the payload's own signal);
- ``neutral``: 0.5 on every bit, the hiding layers' midpoint: no payload signal. Not a setting anyone can
  publish with (it carries nothing); it shows what the generator draws under the speckle.

Per setting: ``mtcnn_found`` (facenet-pytorch MTCNN, the job's default thresholds, on the 8-bit crop resized
to 256 px, bilinear, where the metrics stage cuts it from the photo; IoU >= 0.5 with its detection in the
original crop, among faces whose original it finds), ``detected`` (MTCNN's RNet and ONet at the aligned face
box, as training's ``held_out_figures``), ``still_matching`` (dlib port distance below 0.6) and
``change_grey`` (mean absolute difference to the ``neutral`` rendering inside the paste mask, in grey levels).
Bare first draws on aligned crops: no redraw, no paste-back, no payload reinforcement.

Usage (CPU, about 1 s per face on 2 cores; the held-out faces prepared from one CelebA val shard first):
    g2face-pipe prepare jobs/prepare-train.yaml --set dataset.id=celeba-val5 \
        --set input.paths=../shared/data/val/celeba-200id-000005.tar --set output.dir=/tmp/g2face-prepared/celeba-val5
    python bench/payload_visibility.py --held-out /tmp/g2face-prepared/celeba-val5/shards --faces 160
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from g2face import training  # noqa: E402
from g2face.checkpoint import SHIPPED_ARTIFACT, load_artifact  # noqa: E402
from g2face.identity import SAME_PERSON_DISTANCE, identity_distance  # noqa: E402
from pipeline import align  # noqa: E402
from pipeline.metrics_stage import ORIGINAL_MATCH_IOU, aligned_reference_box, best_match, crop_mtcnn  # noqa: E402

SETTINGS = ("random", "random_other", "neutral")
CHECK_SIDE = 256


def mtcnn_boxes(mtcnn, crops: torch.Tensor) -> list[np.ndarray]:
    """MTCNN boxes per crop ((B, 3, R, R) in [-1, 1], made 8-bit and resized to CHECK_SIDE as the metrics do)."""
    up = F.interpolate((crops + 1) * 127.5, size=(CHECK_SIDE, CHECK_SIDE), mode="bilinear", align_corners=False)
    pixels = up.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    found, _ = mtcnn.detect(list(pixels))
    return [np.zeros((0, 4)) if b is None else np.asarray(b, np.float64) for b in found]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--held-out", required=True, help="prepared shards (directory) of people not in training")
    ap.add_argument("--faces", type=int, default=160)
    ap.add_argument("--checkpoint", default=str(SHIPPED_ARTIFACT), help="inference artifact")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_artifact(args.checkpoint).float().eval()
    cfg = model.config
    r = cfg.resolution
    faces = training.read_faces(sorted(Path(args.held_out).glob("*.tar")))[: args.faces]
    if not faces:
        raise SystemExit(f"--held-out {args.held_out}: no prepared faces there")
    batch = training.collate(faces, r)
    priors = training.build_priors(r, align.template(r), align.paste_mask(r), detector=True)
    mtcnn = crop_mtcnn(CHECK_SIDE, (0.6, 0.7, 0.7), 0.709, torch.device("cpu"))
    inside = priors.paste_mask > 0.5
    template_box = aligned_reference_box(CHECK_SIDE)
    g = torch.Generator().manual_seed(args.seed)
    found = {s: [] for s in SETTINGS}
    detected = {s: [] for s in SETTINGS}
    matching = {s: [] for s in SETTINGS}
    change = {s: [] for s in SETTINGS}
    original_found = []
    with torch.no_grad():
        for x in batch.image.split(args.chunk):
            b = x.shape[0]
            noise = [torch.randn(b, 1, s, s, generator=g) for s in model.synthesis.noise_sizes]
            dummy = model.dummy(torch.randn(b, cfg.dummy_noise_dim, generator=g))
            w = model.styles(dummy, priors.geometry(x)[0])
            bits = {"random": torch.randint(0, 2, (b, cfg.payload_bits), generator=g).float(),
                    "random_other": torch.randint(0, 2, (b, cfg.payload_bits), generator=g).float(),
                    "neutral": torch.full((b, cfg.payload_bits), 0.5)}
            out = {s: model.generate(x, w, bits[s], noise).clamp(-1, 1) for s in SETTINGS}
            out = {s: (y * 127.5 + 127.5).round() / 127.5 - 1 for s, y in out.items()}  # 8-bit, as published
            identity = priors.identity(x)
            originals = []
            for box in mtcnn_boxes(mtcnn, x):
                j = best_match(box, template_box, ORIGINAL_MATCH_IOU)
                originals.append(None if j is None else box[j])
            original_found += [o is not None for o in originals]
            for s, y in out.items():
                for o, boxes in zip(originals, mtcnn_boxes(mtcnn, y)):
                    if o is not None:
                        found[s].append(best_match(boxes, o, 0.5) is not None)
                z_r, z_o = priors.detector(y)
                detected[s] += ((z_r.sigmoid() > 0.7) & (z_o.sigmoid() > 0.7)).tolist()
                matching[s] += (identity_distance(identity, priors.identity(y)) < SAME_PERSON_DISTANCE).tolist()
                change[s] += ((y - out["neutral"]).abs().mean(dim=1)[:, inside].mean(1) * 127.5).tolist()
    rows = [{"setting": s, "faces": len(batch.image), "original_found": int(sum(original_found)),
             "mtcnn_found": round(float(np.mean(found[s])), 4), "detected": round(float(np.mean(detected[s])), 4),
             "still_matching": round(float(np.mean(matching[s])), 4),
             "change_grey": round(float(np.mean(change[s])), 2)} for s in SETTINGS]
    cols = list(rows[0])
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    if args.out:
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                       indent=1))


if __name__ == "__main__":
    main()
