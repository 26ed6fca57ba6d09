"""Regenerate the bundled demo corpus (data/demo/) from the public-domain NASA portraits.

Usage: python scripts/make_demo_corpus.py [--src ../shared/data/public-domain/nasa] [--out data/demo]

The portraits are NASA photographs (U.S. Government works, public domain). They are downscaled to a
longest side of 400 px and split over two WebDataset shards so that the demo exercises 1:1 sharding.
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

MAX_SIDE = 400


def member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
    return ti, io.BytesIO(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="../shared/data/public-domain/nasa")
    ap.add_argument("--out", default="data/demo")
    args = ap.parse_args()
    files = sorted(Path(args.src).glob("*.jpg"))
    if len(files) != 12:
        raise SystemExit(f"expected the 12 NASA portraits in {args.src}, found {len(files)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for shard, chunk in enumerate((files[:6], files[6:])):
        with tarfile.open(out / f"nasa-{shard:06d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for f in chunk:
                img = Image.open(f).convert("RGB")
                img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                person = f.stem.replace("_", " ")
                meta = {"dataset": "nasa-portraits", "person": person, "credit": "NASA", "license": "public domain (U.S. Government work)"}
                key = "nasa_" + f.stem
                tar.addfile(*member(f"{key}.jpg", buf.getvalue()))
                tar.addfile(*member(f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
    print(f"wrote {out}/nasa-000000.tar and nasa-000001.tar")


if __name__ == "__main__":
    main()
