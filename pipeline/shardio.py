"""Reading and writing shards (WebDataset tars and Parquet files) as plain samples.

A :class:`RawSample` is what a shard holds for one key: its fields (member extension or column ->
value). Readers never raise for a bad sample or a truncated shard: they yield a sample carrying the
read error so that it reaches the manifest.
"""
from __future__ import annotations

import io
import lzma
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .imaging import IMAGE_EXTS
from .storage import url_to_fs

# WebDataset's rule: the key is everything up to the first dot of the file's basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class RawSample:
    index: int
    key: str | None
    fields: dict[str, object] = field(default_factory=dict)
    image_field: str | None = None
    read_error: str | None = None
    shard_error: bool = False  # the read_error is the shard's (unreadable, or its tail lost), not this row's
    duplicate_of: int | None = None  # index of the earlier sample of the shard with the same key


def _pick_image_field(fields: dict, wanted: str | None) -> str | None:
    if wanted:
        return wanted if wanted in fields else None
    for ext in IMAGE_EXTS:
        if ext in fields:
            return ext
    return None


def _flag_duplicate_keys(samples: Iterator[RawSample]) -> Iterator[RawSample]:
    """Mark every sample whose key an earlier sample of the shard already has: outputs, manifests and payloads
    are bound to the key, so a second sample under it is recorded as an error rather than published."""
    first: dict[str, int] = {}
    for s in samples:
        if s.key is not None:
            if s.key in first:
                s.duplicate_of = first[s.key]
                # the key itself stays out of the message: errors reach the public manifest, keys may hold names
                dup = (f"duplicate key: sample {first[s.key]} of this shard has the same key; keys must be unique "
                       "within a shard (rename or drop one of them)")
                s.read_error = f"{s.read_error}; {dup}" if s.read_error else dup
            else:
                first[s.key] = s.index
        yield s


def read_webdataset(url: str, image_field: str | None) -> Iterator[RawSample]:
    """Samples of a tar shard in member order (a key's members are consecutive, as WebDataset writes them)."""
    return _flag_duplicate_keys(_read_tar_samples(url, image_field))


def _read_tar_samples(url: str, image_field: str | None) -> Iterator[RawSample]:
    fs, p = url_to_fs(url)
    index = 0
    current: RawSample | None = None
    members = 0
    try:
        with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                members += 1
                m = _KEY_EXT.match(info.name)
                if m is None:
                    key, ext = info.name, ""
                else:
                    key, ext = m.group(1), m.group(2).lower()
                # a repeated member (a.jpg twice, or a.jpg and a.JPG) starts a sample of its own, never overwrites
                if current is None or current.key != key or ext in current.fields:
                    if current is not None:
                        current.image_field = _pick_image_field(current.fields, image_field)
                        yield current
                        index += 1
                    current = RawSample(index=index, key=key)
                data = tar.extractfile(info).read()
                current.fields[ext] = data
            # tarfile takes a cut-off header for the end of the archive: insist on the end-of-archive block,
            # or a shard truncated between members would silently lose its tail.
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(512) != bytes(512):
                raise tarfile.ReadError("missing end-of-archive marker (file truncated?)")
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # damaged .tar.gz / .tar.xz too
        if current is not None:
            current.image_field = _pick_image_field(current.fields, image_field)
            current.read_error = f"shard truncated in or after this sample: {type(e).__name__}: {e}"
            yield current
            index += 1
            current = None
        yield RawSample(
            index=index,
            key=None,
            read_error=f"shard unreadable after {members} members: {type(e).__name__}: {e}",
            shard_error=True,
        )
        return
    if current is not None:
        current.image_field = _pick_image_field(current.fields, image_field)
        yield current


def _parquet_image_bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and "bytes" in value:  # Hugging Face-style {bytes, path} struct
        return value["bytes"]
    raise TypeError(f"unsupported image cell type {type(value).__name__}; expected bytes or a {{bytes, path}} struct")


def read_parquet(
    url: str, image_column: str, key_column: str | None, stem: str
) -> tuple[pa.Schema | None, list[RawSample]]:
    """Whole Parquet shard as samples plus its schema (None when the shard cannot be read)."""
    fs, p = url_to_fs(url)
    try:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f)
    except Exception as e:
        return None, [RawSample(index=0, key=None, read_error=f"shard unreadable: {type(e).__name__}: {e}",
                                shard_error=True)]
    if image_column not in table.column_names:
        err = (
            f"input.image_column {image_column!r} is not a column of this shard "
            f"(columns: {', '.join(table.column_names)})"
        )
        return None, [RawSample(index=0, key=None, read_error=err, shard_error=True)]
    if key_column and key_column not in table.column_names:
        err = f"input.key_column {key_column!r} is not a column of this shard (columns: {', '.join(table.column_names)})"
        return None, [RawSample(index=0, key=None, read_error=err, shard_error=True)]
    samples = []
    for i, row in enumerate(table.to_pylist()):
        key = (None if row[key_column] is None else str(row[key_column])) if key_column else f"{stem}/{i}"
        s = RawSample(index=i, key=key, fields=row, image_field=image_column)
        try:
            row[image_column] = _parquet_image_bytes(row[image_column])
        except TypeError as e:
            s.read_error = str(e)
        if key is None:
            s.read_error = (f"input.key_column {key_column!r} is null in row {i}; give every row a key, or leave "
                            "input.key_column unset to key rows by shard and row number")
        samples.append(s)
    return table.schema, list(_flag_duplicate_keys(iter(samples)))


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def write_webdataset(fileobj, records: list[tuple[str, list[tuple[str, bytes]]]]) -> None:
    """records: (key, [(extension, bytes), ...]) in output order. Deterministic headers."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in records:
            for ext, data in members:
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))


def write_parquet(fileobj, rows: list[dict], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, fileobj, compression="zstd")
