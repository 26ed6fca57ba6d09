"""Key files and key derivation.

A master key file is a small self-describing JSON document (kind, version, key id, created, key)
written with mode 0600. Everything else derives from it with HKDF-SHA256 and a purpose label, so
no derived key can be turned back into the master key or into another purpose's key. Key material
is never logged or written to outputs; only key ids are.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KIND = "g2face-pipe/master-key"
KEY_BYTES = 32


class KeyFileError(ValueError):
    pass


def _hkdf(master: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master)


def key_id(master: bytes) -> str:
    """Public identifier of a master key (derived, reveals nothing about the key)."""
    return "mk-" + _hkdf(master, b"g2face-pipe/v1/key-id", 8).hex()


def create_master_key(path: str | Path, note: str = "") -> str:
    """Create a new master key file with mode 0600; refuses to overwrite. Returns the key id."""
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key (choose another --out)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(KEY_BYTES)
    doc = {
        "kind": MASTER_KIND,
        "version": 1,
        "key_id": key_id(key),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "note": note,
        "key": base64.b64encode(key).decode("ascii"),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return doc["key_id"]


def load_master_key(path: str | Path) -> tuple[bytes, str]:
    """Read a master key file; returns (key bytes, key id). Errors never echo key material."""
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(
            f"master key file {path} does not exist; create one with `g2face-pipe keys init --out {path}`"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("kind") != MASTER_KIND:
            raise KeyFileError(f"{path} is not a g2face-pipe master key (kind={doc.get('kind')!r})")
        key = base64.b64decode(doc["key"], validate=True)
    except KeyFileError:
        raise
    except Exception:
        raise KeyFileError(f"{path} is not a readable master key file (expected JSON from `keys init`)") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path}: master key must be {KEY_BYTES} bytes")
    kid = key_id(key)
    if doc.get("key_id") != kid:
        raise KeyFileError(f"{path}: key_id does not match the key (file corrupted or edited)")
    return key, kid


def pseudonym_key(master: bytes, dataset_id: str) -> bytes:
    return _hkdf(master, b"g2face-pipe/v1/pseudonym/" + dataset_id.encode("utf-8"))


def pseudonymize(pkey: bytes, original_key: str) -> str:
    """Deterministic keyed pseudonym of a sample key (24 hex chars, 96 bits)."""
    return hmac.new(pkey, original_key.encode("utf-8"), hashlib.sha256).hexdigest()[:24]
