"""Packaged model weights the pipeline uses, with pinned hashes: wrong weights stop the run."""
from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

from g2face.mtcnn import MTCNNWeightsError, verify_weights


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
    """Check facenet-pytorch's MTCNN files against the pinned hashes; returns {'mtcnn/<file>': sha256}."""
    try:
        return {f"mtcnn/{name}": sha for name, sha in verify_weights().items()}
    except MTCNNWeightsError as e:
        raise WeightsError(str(e)) from None
