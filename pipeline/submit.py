"""Package a job for a Ray cluster: resolve the spec here, stage code + spec + in-project inputs, submit.

The cluster runs exactly the code and the resolved spec that were submitted (the working dir carries
`pipeline/`, `g2face/`, `schemas/` and `job.yaml`); its Python environment must have the project's
dependencies. Inputs and outputs must be cluster storage (absolute shared paths or fsspec URIs);
relative input paths inside the project (the demo corpus) travel with the submission. Key files never
travel: `keys.master` must name a file the cluster can read.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .spec import JobSpec, JobSpecError, load_spec, parse_spec, spec_to_dict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_CODE_DIRS = ("pipeline", "g2face", "schemas")


def _is_uri(path: str) -> bool:
    return "://" in path


def _stage_inputs(paths: str | list[str], stage: Path, cwd: Path) -> str | list[str]:
    items = [paths] if isinstance(paths, str) else list(paths)
    out = []
    for item in items:
        if _is_uri(item) or os.path.isabs(item):
            out.append(item)
            continue
        absolute = (cwd / item).resolve()
        try:
            rel = absolute.relative_to(PROJECT_ROOT)
        except ValueError:
            raise JobSpecError(
                f"input.paths entry {item!r} is relative and outside the project; on a cluster use an absolute "
                "path on shared storage or an fsspec URI (s3://, gs://, file://)"
            ) from None
        import glob

        matches = sorted(glob.glob(str(absolute)))
        if not matches:
            raise FileNotFoundError(f"input.paths: {item!r} matches no file; check the path or glob")
        for m in matches:
            dest = stage / Path(m).relative_to(PROJECT_ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(m, dest)
        out.append(str(rel))
    return out[0] if isinstance(paths, str) else out


def stage_submission(job: Path, overrides: list[str], cwd: Path | None = None) -> tuple[Path, JobSpec]:
    """Make a working dir for Ray Jobs; returns (dir, resolved spec)."""
    cwd = cwd or Path.cwd()
    spec = load_spec(job, overrides)
    if not (_is_uri(spec.output.dir) or os.path.isabs(spec.output.dir)):
        raise JobSpecError(
            f"output.dir {spec.output.dir!r} is relative; a cluster job needs an absolute path on shared storage "
            "or an fsspec URI (--set output.dir=/shared/out or s3://bucket/out)"
        )
    if spec.keys.master and not os.path.isabs(spec.keys.master):  # a URI is refused by the spec already
        raise JobSpecError("keys.master must be an absolute path that the cluster can read (key files are never uploaded)")
    stage = Path(tempfile.mkdtemp(prefix="g2face-submit-"))
    for d in _CODE_DIRS:
        shutil.copytree(PROJECT_ROOT / d, stage / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    tree = spec_to_dict(spec)
    tree["input"]["paths"] = _stage_inputs(spec.input.paths, stage, cwd)
    tree["runtime"]["address"] = None  # inside the job, Ray's RAY_ADDRESS names the cluster
    tree["runtime"]["executor"] = "ray"
    resolved = parse_spec(tree, "submitted job")
    (stage / "job.yaml").write_text(yaml.safe_dump(spec_to_dict(resolved), sort_keys=False), encoding="utf-8")
    return stage, resolved
