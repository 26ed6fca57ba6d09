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
