"""Filesystem access through fsspec: shard listing, atomic writes, done markers.

Local paths get temp-file + fsync + rename. Object stores have no atomic rename, so there a file is
written in one put and completeness rests on the done marker, which is always written last.
"""
from __future__ import annotations

import os
import posixpath
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem


def url_to_fs(url: str):
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(root: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI root."""
    if "://" in root:
        return posixpath.join(root, *parts)
    return os.path.join(root, *parts)


def list_shards(paths: str | list[str]) -> list[str]:
    """Expand globs / lists / URIs into a sorted, de-duplicated list of shard URLs."""
    items = [paths] if isinstance(paths, str) else list(paths)
    if not items:
        raise FileNotFoundError("input.paths is empty; give the shards' paths or a glob, e.g. data/part-*.tar")
    out: list[str] = []
    for item in items:
        fs, p = url_to_fs(item)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if any(c in p for c in "*?["):
            matches = sorted(fs.glob(p))
        else:
            matches = [p] if fs.exists(p) else []
        if not matches:
            raise FileNotFoundError(f"input.paths: {item!r} matches no file; check the path or glob")
        for m in matches:
            if is_local(fs) and fs.isdir(m):  # (remote: one more request per file; their readers say it)
                raise FileNotFoundError(f"input.paths: {m!r} is a folder, not a shard; give a glob of its shards, "
                                        f"e.g. {item.rstrip('/')}/*.tar (or *.parquet)")
            url = m if is_local(fs) else f"{protocol}://{m}" if "://" not in m else m
            if url not in out:
                out.append(url)
    return sorted(out)


def shard_name(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def read_bytes(url: str) -> bytes:
    fs, p = url_to_fs(url)
    with fs.open(p, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, p = url_to_fs(url)
    return fs.exists(p)


def remove(url: str) -> bool:
    """Delete the file at ``url`` if there is one; True when one was removed."""
    fs, p = url_to_fs(url)
    if not fs.exists(p):
        return False
    fs.rm(p)
    return True


def makedirs(url: str) -> None:
    fs, p = url_to_fs(url)
    fs.makedirs(p, exist_ok=True)


# For files only the data controller or a key holder may read (private manifests, recovered originals):
# on local disks they are never readable by other users, at no point of the write.
PRIVATE_MODE = 0o600


def atomic_write_bytes(url: str, data: bytes, mode: int = 0o644) -> None:
    atomic_write_file(url, lambda f: f.write(data), mode)


def atomic_write_file(url: str, write_fn, mode: int = 0o644) -> None:
    """Call ``write_fn(fileobj)`` and publish the result at ``url`` atomically where the fs allows.
    ``mode`` applies on local disks (object stores have no file modes: their access is set on the bucket)."""
    fs, p = url_to_fs(url)
    if is_local(fs):
        d = os.path.dirname(p) or "."
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(p) + ".", suffix=".tmp", dir=d)
        try:
            with os.fdopen(fd, "wb") as f:
                write_fn(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dir_fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    else:
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
        with fs.open(p, "wb") as f:
            write_fn(f)


def check_writable_without_writing(url: str) -> None:
    """What ``check_writable`` finds, for a dry run, which writes nothing: on local disks, the output root (or
    its nearest existing parent) must be a writable folder. Remote roots are checked when the run starts."""
    fs, p = url_to_fs(url)
    if not is_local(fs):
        return
    path = os.path.abspath(p)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise PermissionError(f"output.dir {url!r} cannot be created: {path} is a file; pick another output.dir")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"output.dir {url!r} is not writable ({path} is not writable by this user); pick "
                              "another output.dir")


def check_writable(url: str) -> None:
    """Fail fast when the output root cannot be written."""
    probe = join(url, ".write-probe")
    try:
        makedirs(url)
        atomic_write_bytes(probe, b"ok")
        fs, p = url_to_fs(probe)
        fs.rm(p)
    except Exception as e:
        raise PermissionError(f"output.dir {url!r} is not writable ({type(e).__name__}: {e}); pick another output.dir") from None
