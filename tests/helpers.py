"""Small readers and builders used by several tests."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return path


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def no_face_image(h: int = 240, w: int = 320) -> np.ndarray:
    """A smooth synthetic landscape: sky gradient over green ground, nothing face-like."""
    y = np.linspace(0, 1, h)[:, None]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (90 + 60 * y).astype(np.uint8)
    img[..., 1] = (140 + 80 * y).astype(np.uint8)
    img[..., 2] = (230 - 150 * y).astype(np.uint8)
    img[h * 2 // 3 :] = (40, 120, 50)
    return img


def prepare_small(shard: Path, out: Path, resolution: int = 64) -> Path:
    """Prepared training shards (``pipeline.prepare``) of one shard at ``resolution`` px; returns their folder."""
    import torch

    from pipeline.prepare import prepare

    torch.set_num_threads(1)
    prepare({"dataset": {"id": "nasa"}, "input": {"format": "webdataset", "paths": [str(shard)]},
             "output": {"dir": str(out)}, "detection": {"min_face_size": 40}, "prepare": {"resolution": resolution},
             "runtime": {"progress": False, "torch_threads": 1}}, echo=lambda s: None)
    return out / "shards"


def val_pairs_slice(val: Path, out_tar: Path, per_kind: int) -> tuple[list[dict], Path]:
    """The first ``per_kind`` genuine and ``per_kind`` impostor pairs of val's pairs file, and a shard holding
    just their images: (chosen CSV rows, shard path)."""
    import csv

    rows = list(csv.DictReader((val / "celeba-200id-pairs.csv").open()))
    chosen = [r for r in rows if r["same"] == "1"][:per_kind] + [r for r in rows if r["same"] == "0"][:per_kind]
    keys = {r["key_a"] for r in chosen} | {r["key_b"] for r in chosen}
    members = []
    for shard in sorted(val.glob("celeba-200id-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.split(".")[0] in keys and m.name.endswith(".jpg"):
                    members.append((m.name, tar.extractfile(m).read()))
    assert len(members) == len(keys)
    return chosen, write_tar(out_tar, sorted(members))
