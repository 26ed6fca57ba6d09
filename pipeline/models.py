"""Packaged model weights the pipeline uses, with pinned hashes: wrong weights stop the run."""
from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

# facenet-pytorch 2.5.3 ships MTCNN's three networks inside the wheel; the pins live with the model library.
from g2face.metrics import MTCNN_SHA256


class WeightsError(RuntimeError):
    pass


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {package} is not installed; run `make install` (or pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=None)
def verify_mtcnn_weights() -> dict[str, str]:
    """Check facenet-pytorch's MTCNN files against the pinned hashes; returns {file: sha256}."""
    data = package_dir("facenet_pytorch") / "data"
    found = {}
    for name, want in MTCNN_SHA256.items():
        path = data / name
        if not path.is_file():
            raise WeightsError(f"MTCNN weights {path} are missing; reinstall facenet-pytorch==2.5.3")
        got = file_sha256(path)
        if got != want:
            raise WeightsError(
                f"MTCNN weights {path} have sha256 {got[:16]}..., expected {want[:16]}... "
                "(a different facenet-pytorch release or a modified file); install facenet-pytorch==2.5.3"
            )
        found[f"mtcnn/{name}"] = got
    return found
