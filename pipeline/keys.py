"""Key files and key derivation.

A master key file is a small self-describing JSON document (kind, version, key id, created, key)
written with mode 0600. Everything else derives from it with HKDF-SHA256 and a purpose label, so
no derived key can be turned back into the master key or into another purpose's key. Key material
is never logged or written to outputs; only key ids are.

Per-shard keys derive from the master key and (dataset id, shard name). A shard key can be exported
to its own file (kind ``g2face-pipe/shard-key``) for a user who may recover that one shard only; the
payload keys of every face in the shard derive from it (see ``pipeline/payload.py``).
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
import os
import posixpath
import re
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KIND = "g2face-pipe/master-key"
SHARD_KIND = "g2face-pipe/shard-key"
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
    if path.is_dir():
        raise KeyFileError(f"{path} is a folder; give the path of the key file to create, e.g. {path / 'master.key'}")
    if path.exists():
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key (choose another --out)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KeyFileError(f"cannot create the folder of {path} ({e.strerror or type(e).__name__}); choose another "
                           "path") from None
    key = os.urandom(KEY_BYTES)
    doc = {
        "kind": MASTER_KIND,
        "version": 1,
        "key_id": key_id(key),
        "created": _now(),
        "note": note,
        "key": base64.b64encode(key).decode("ascii"),
    }
    _write_key_file(path, doc)
    return doc["key_id"]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_key_file(path: Path, doc: dict) -> None:
    # O_EXCL: never overwrite; 0600 is applied at creation, so the key is never readable by others
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key (choose another --out)") from None
    except OSError as e:
        raise KeyFileError(f"cannot write the key file {path} ({e.strerror or type(e).__name__}); choose another "
                           "path") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# Some file systems cannot hold a private mode (CIFS, WSL's /mnt/c, vfat report 0777 whatever chmod does) and a
# Kubernetes secret mounted with fsGroup gains group read: there, after checking who can read the file, set this.
ALLOW_SHARED_KEY_ENV = "G2FACE_PIPE_ALLOW_SHARED_KEY_FILE"


def _check_private(path: Path) -> None:
    """Refuse a key file other users may read or write (as ssh refuses private keys): whoever reads the master
    key opens every payload and reverses the pseudonyms. Checked after the contents, so errors about a
    malformed file come first."""
    if os.name != "posix" or os.environ.get(ALLOW_SHARED_KEY_ENV) == "1":
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(
            f"{path} has mode {mode:04o}: other users can read or change this key; make it private with "
            f"`chmod 600 {path}`. Where the file system cannot (CIFS, WSL /mnt/c; a Kubernetes secret mounted "
            f"with fsGroup gains group read), check who can read it, then set {ALLOW_SHARED_KEY_ENV}=1"
        )


def load_master_key(path: str | Path) -> tuple[bytes, str]:
    """Read a master key file; returns (key bytes, key id). Errors never echo key material."""
    path = Path(path)
    if path.is_dir():
        raise KeyFileError(f"master key file {path} is a folder; give the path of the key file in it")
    if not path.is_file():
        raise KeyFileError(
            f"master key file {path} does not exist; create one with `g2face-pipe keys init --out {path}`"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and doc.get("kind") == SHARD_KIND:
            raise KeyFileError(
                f"{path} is a shard key (dataset {doc.get('dataset_id')!r}, shard {doc.get('shard')!r}), "
                "not a master key; this step needs the master key file from `g2face-pipe keys init`"
            )
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
    _check_private(path)
    return key, kid


def pseudonym_key(master: bytes, dataset_id: str) -> bytes:
    return _hkdf(master, b"g2face-pipe/v1/pseudonym/" + dataset_id.encode("utf-8"))


def pseudonymize(pkey: bytes, original_key: str) -> str:
    """Deterministic keyed pseudonym of a sample key (24 hex chars, 96 bits)."""
    return hmac.new(pkey, original_key.encode("utf-8"), hashlib.sha256).hexdigest()[:24]


# --- per-shard keys --------------------------------------------------------------------------------------

_NAME_MAX = 255


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _NAME_MAX or any(ord(c) < 32 for c in value):
        raise KeyFileError(f"{what} must be a non-empty string of at most {_NAME_MAX} printable characters, got {value!r}")
    return value


def _lp(text: str) -> bytes:
    # length-prefixed UTF-8, so that ("ab", "c") and ("a", "bc") never derive the same key
    raw = text.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def derive_shard_key(master: bytes, dataset_id: str, shard: str) -> bytes:
    """The 32-byte key of one shard: HKDF-SHA256(master, info = label | dataset id | shard name)."""
    _check_name("dataset id", dataset_id)
    _check_name("shard name", shard)
    return _hkdf(master, b"g2face-pipe/v1/shard-key" + _lp(dataset_id) + _lp(shard))


def shard_key_id(key: bytes, dataset_id: str, shard: str) -> str:
    """Public identifier of a shard key; it also binds the dataset and shard the key belongs to."""
    return "sk-" + _hkdf(key, b"g2face-pipe/v1/shard-key-id" + _lp(dataset_id) + _lp(shard), 8).hex()


class ShardKey:
    """The key of one shard of one dataset. Its repr/str show ids only, never key material.

    The material stays inside: callers get purpose-bound subkeys from ``derive``.
    """

    __slots__ = ("_material", "dataset_id", "shard", "key_id", "master_key_id", "source")

    def __init__(self, material: bytes, dataset_id: str, shard: str, master_key_id: str | None = None, source: str = ""):
        """material: 32 key bytes; dataset_id, shard: what the key opens; master_key_id: id of the master it
        derives from (None if unknown); source: where it was loaded from, for messages."""
        if not isinstance(material, bytes) or len(material) != KEY_BYTES:
            raise KeyFileError(f"a shard key must be {KEY_BYTES} bytes")
        self._material = material
        self.dataset_id = _check_name("dataset id", dataset_id)
        self.shard = _check_name("shard name", shard)
        self.key_id = shard_key_id(material, dataset_id, shard)
        self.master_key_id = master_key_id
        self.source = source

    @classmethod
    def from_master(cls, master: bytes, dataset_id: str, shard: str, source: str = "") -> "ShardKey":
        return cls(derive_shard_key(master, dataset_id, shard), dataset_id, shard, key_id(master), source)

    def derive(self, purpose: bytes, length: int = KEY_BYTES) -> bytes:
        """A subkey for one purpose (e.g. b"payload/aead"); distinct purposes give independent keys."""
        return _hkdf(self._material, b"g2face-pipe/v1/shard-subkey/" + purpose, length)

    def __repr__(self) -> str:
        return (
            f"ShardKey(key_id={self.key_id!r}, dataset_id={self.dataset_id!r}, shard={self.shard!r}, "
            f"master_key_id={self.master_key_id!r})"
        )

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardKey):
            return NotImplemented
        return hmac.compare_digest(self._material, other._material) and (self.dataset_id, self.shard) == (
            other.dataset_id,
            other.shard,
        )

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __getstate__(self):
        # picklable (Ray ships it to shard workers), but not by accident into a log via __dict__
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)


def export_shard_key(master_path: str | Path, dataset_id: str, shard: str, out_path: str | Path, note: str = "") -> str:
    """Write one shard's key to ``out_path`` (mode 0600, refuses to overwrite). Returns the shard key id.

    The file opens this shard of this dataset only; the master key cannot be derived from it.
    """
    master, mkid = load_master_key(master_path)
    sk = ShardKey.from_master(master, dataset_id, shard)
    out_path = Path(out_path)
    if out_path.exists():
        raise KeyFileError(f"{out_path} already exists; refusing to overwrite a key (choose another --out)")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KeyFileError(f"cannot create the folder of {out_path} ({e.strerror or type(e).__name__}); choose "
                           "another --out") from None
    doc = {
        "kind": SHARD_KIND,
        "version": 1,
        "key_id": sk.key_id,
        "master_key_id": mkid,
        "dataset_id": dataset_id,
        "shard": shard,
        "created": _now(),
        "note": note,
        "key": base64.b64encode(sk._material).decode("ascii"),
    }
    _write_key_file(out_path, doc)
    return sk.key_id


def _load_shard_key_file(path: Path, doc: dict) -> ShardKey:
    try:
        key = base64.b64decode(doc["key"], validate=True)
        ds, shard, kid = doc["dataset_id"], doc["shard"], doc["key_id"]
        if not all(isinstance(v, str) for v in (ds, shard, kid)):
            raise TypeError
    except Exception:
        raise KeyFileError(f"{path} is not a readable shard key file (expected JSON from `keys export`)") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path}: shard key must be {KEY_BYTES} bytes")
    if shard_key_id(key, ds, shard) != kid:
        raise KeyFileError(f"{path}: key_id does not match the key, dataset and shard (file corrupted or edited)")
    mkid = doc.get("master_key_id")
    _check_private(path)
    return ShardKey(key, ds, shard, mkid if isinstance(mkid, str) else None, source=str(path))


def load_shard_key(path: str | Path, dataset_id: str, shard: str) -> ShardKey:
    """The key of (dataset_id, shard) from either a master key file or an exported shard key file.

    A shard key file for another dataset or shard is refused with a message that says which one it opens.
    """
    path = Path(path)
    _check_name("dataset id", dataset_id)
    _check_name("shard name", shard)
    if not path.is_file():
        raise KeyFileError(
            f"key file {path} does not exist; pass the master key (`g2face-pipe keys init`) or a shard key "
            "(`g2face-pipe keys export`)"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        kind = doc.get("kind")
    except Exception:
        raise KeyFileError(f"{path} is not a readable key file (expected JSON from `keys init` or `keys export`)") from None
    if kind == MASTER_KIND:
        master, _ = load_master_key(path)
        return ShardKey.from_master(master, dataset_id, shard, source=str(path))
    if kind != SHARD_KIND:
        raise KeyFileError(f"{path} is not a g2face-pipe master or shard key (kind={kind!r})")
    sk = _load_shard_key_file(path, doc)
    if (sk.dataset_id, sk.shard) != (dataset_id, shard):
        raise KeyFileError(
            f"{path} is the shard key {sk.key_id} for dataset {sk.dataset_id!r} shard {sk.shard!r}; it cannot open "
            f"dataset {dataset_id!r} shard {shard!r}. Use the master key, or export this shard's key with "
            f"`g2face-pipe keys export --master MASTER --dataset {dataset_id} --shard {shard} --out PATH`"
        )
    return sk


def keys_export_command(master: str | Path, shard: str, dataset: str, out: str | Path) -> str:
    """Body of `g2face-pipe keys export`: writes the shard key file and returns the line to print.

    Raises KeyFileError (message ready for the user) on any problem; never prints key material.
    """
    from .spec import DATASET_ID_PATTERN

    if not re.fullmatch(DATASET_ID_PATTERN, dataset):
        raise KeyFileError(f"--dataset {dataset!r} is not a dataset.id (letters, digits, '.', '_', '-'); give the "
                           "dataset.id of the job that wrote the shard (its run.json says it)")
    shard = posixpath.basename(shard.rstrip("/"))  # the key is bound to the name, which recover reads from the file
    skid = export_shard_key(master, dataset, shard, out)
    return (
        f"exported shard key {skid} for dataset {dataset!r} shard {shard!r} to {out} (mode 0600); "
        f"it opens this shard only: g2face-pipe recover --shard SHARD_PATH --key {out} --out DIR"
    )
