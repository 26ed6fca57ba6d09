"""Regenerate schemas/thumbnail_kind2.json: the coding tables of payload format 5's face thumbnail (kind 2).

The tables say, for each coefficient of the 20 x 20 luma grid's DCT (``pipeline.thumbnail``), how many bits it
gets and the step and centre of its quantizer. They come from training faces only (LFW peopleDevTrain,
``../shared/data/train``; none of its people are in the evaluation set): every ``--stride``-th image, detected
and aligned by the pipeline's own MTCNN stages at 128 px, largest face.

- the brightness coefficient (DC, (0, 0); 20 times the region's mean luma, so within [0, 20]): 8 bits over that
  whole range (mean 10, step 20/256), so that no face is too dark or too bright for it;
- mean and sd of every other coefficient over those faces;
- bits: the other 1,008 handed out one at a time, each to the coefficient whose quantization error it lowers most, the
  error of a b-bit quantizer being sd^2 times the Gaussian optimum-uniform-quantizer distortion of b bits
  (Max 1960): what minimises the expected squared error of the luma grid; ties go to the first coefficient in
  row-major order; at most 7 bits each;
- step: sd times the optimum uniform step of the Gaussian for its bits (1.596, 0.9957, 0.5860, ... for 1, 2, 3
  bits).

The file is part of payload format 5: once payloads exist, changing it makes their thumbnails decode wrongly,
so ``pipeline.thumbnail`` pins its sha256. A regenerated table needs a new thumbnail kind and format version.

Usage (about 4 CPU-minutes): python scripts/make_thumbnail_tables.py [--data '../shared/data/train/*.tar'] [--out FILE]
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.imaging import decode_image  # noqa: E402
from pipeline.shardio import RawSample  # noqa: E402
from pipeline.spec import DetectionSpec  # noqa: E402
from pipeline.stages import AlignStage, DetectStage, Sample  # noqa: E402
from pipeline.thumbnail import Y2_BITS, Y2_GRID, _grids, dct_matrix  # noqa: E402

# Gaussian source, optimum uniform quantizer with b levels 2^b: step / sd and mean squared error / sd^2
# (J. Max, "Quantizing for minimum distortion", IRE Trans. Inf. Theory, 1960), b = 0..7
GAUSS_STEP = (0.0, 1.596, 0.9957, 0.5860, 0.3352, 0.1881, 0.1041, 0.0569)
GAUSS_MSE = (1.0, 0.3634, 0.1188, 0.03744, 0.01154, 0.00349, 0.00105, 0.0003)


def training_faces(pattern: str, stride: int, resolution: int = 128) -> torch.Tensor:
    """Aligned crops (N, 3, R, R) in [0, 1] of every ``stride``-th image of the tars, largest face each."""
    samples = []
    n = 0
    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as tf:
            for member in tf:
                if not member.name.endswith(".jpg"):
                    continue
                n += 1
                if n % stride:
                    continue
                s = Sample(RawSample(len(samples), member.name, {"jpg": tf.extractfile(member).read()}, "jpg"))
                s.image = decode_image(s.raw.fields["jpg"], 10**8, False)
                samples.append(s)
    if not samples:
        raise SystemExit(f"--data {pattern!r} matches no tar with .jpg members")
    spec = DetectionSpec()
    detect = DetectStage(spec.min_face_size, spec.stage_thresholds, spec.scale_factor, spec.low_score_threshold,
                         spec.max_side, False, resolution, "cpu")
    detect.setup()
    detect.process(samples)
    samples = [s for s in samples if s.faces]
    for s in samples:
        s.faces = [max(s.faces, key=lambda f: f.box[2] - f.box[0])]
    AlignStage(resolution, "blur", "pixelate", 0, 0.0, 0, "pass").process(samples)
    crops = np.stack([s.faces[0].crop for s in samples])
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255


DC_BITS = 8
DC_RANGE = float(Y2_GRID)  # the DC of a grid of values in [0, 1] under the orthonormal DCT lies in [0, grid]


def tables(coefficients: np.ndarray, budget: int = Y2_BITS) -> dict:
    """Bits, mean and step per coefficient from training coefficients (N, G, G)."""
    mean, sd = coefficients.mean(0), coefficients.std(0)
    bits = np.zeros(mean.shape, np.int64)
    var = (sd**2).ravel()
    var[0] = 0.0  # the DC is coded over its whole range, below
    flat = bits.ravel()
    for _ in range(budget - DC_BITS):
        gain = np.array([var[i] * (GAUSS_MSE[b] - GAUSS_MSE[b + 1]) if b < 7 else -1.0 for i, b in enumerate(flat)])
        flat[int(np.argmax(gain))] += 1  # argmax: the first of equal gains
    step = np.array(GAUSS_STEP)[bits] * sd
    bits[0, 0], mean[0, 0], step[0, 0] = DC_BITS, DC_RANGE / 2, DC_RANGE / 2**DC_BITS

    def rounded(a):
        return [[float(f"{v:.7g}") for v in row] for row in a]

    return {"bits": bits.tolist(), "mean": rounded(mean), "step": rounded(np.where(bits > 0, step, 0.0))}


def render(doc: dict) -> str:
    """The file's text: one key per line, one table row per line."""
    lines = []
    for key, value in doc.items():
        if isinstance(value, list):
            rows = ",\n  ".join(json.dumps(row) for row in value)
            lines.append(f"  {json.dumps(key)}: [\n  {rows}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "train" / "*.tar"))
    ap.add_argument("--stride", type=int, default=8, help="use every stride-th image (default 8: about 1,100 faces)")
    ap.add_argument("--out", type=Path, default=Path("thumbnail_kind2.json"),
                    help="where to write (default ./thumbnail_kind2.json: the shipped file is pinned, never overwritten "
                         "by default; compare with schemas/thumbnail_kind2.json)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    crops = training_faces(args.data, args.stride)
    y, _ = _grids(crops, Y2_GRID)
    d = dct_matrix(Y2_GRID)
    doc = {"kind": 2, "grid": Y2_GRID, "luma_bits": Y2_BITS,
           "source": f"LFW peopleDevTrain, every {args.stride}th image, {len(crops)} faces "
                     "(scripts/make_thumbnail_tables.py)",
           **tables(d @ y @ d.T)}
    text = render(doc)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"{args.out}: {len(crops)} faces, {int(np.sum(doc['bits']))} bits over "
          f"{int(np.count_nonzero(doc['bits']))} coefficients")


if __name__ == "__main__":
    main()
