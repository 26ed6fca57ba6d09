"""Shard readers/writers (WebDataset tars, Parquet) and the storage helpers they rely on."""
from __future__ import annotations

import io
import os
import tarfile
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import read_tar, write_tar
from pipeline import storage
from pipeline.shardio import read_parquet, read_webdataset, write_parquet, write_webdataset


def _samples(path, image_field=None):
    return list(read_webdataset(str(path), image_field))


def _summary(samples):
    return [(s.key, sorted(s.fields), s.image_field, s.read_error) for s in samples]


# --- read_webdataset: grouping ------------------------------------------------------------------------------


def test_read_webdataset_groups_members_by_key(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("a.jpg", b"A-JPG"),
            ("a.seg.png", b"A-SEG"),
            ("a.json", b"{}"),
            ("b.png", b"B-PNG"),
            ("b.cls", b"3"),
            ("c.webp", b"C"),
        ],
    )
    samples = _samples(shard)
    assert [s.index for s in samples] == [0, 1, 2]
    assert [s.key for s in samples] == ["a", "b", "c"]
    a = samples[0]
    assert a.fields == {"jpg": b"A-JPG", "seg.png": b"A-SEG", "json": b"{}"}
    assert a.read_error is None
    assert samples[1].fields == {"png": b"B-PNG", "cls": b"3"}


def test_read_webdataset_key_is_up_to_the_first_dot_of_the_basename(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("dir.v2/sub/img_1.seg.png", b"1"),
            ("dir.v2/sub/img_1.JPG", b"2"),  # extensions are lower-cased
            ("dir.v2/sub/img_2.tar.gz", b"3"),
        ],
    )
    samples = _samples(shard)
    assert [s.key for s in samples] == ["dir.v2/sub/img_1", "dir.v2/sub/img_2"]
    assert samples[0].fields == {"seg.png": b"1", "jpg": b"2"}
    assert samples[0].image_field == "jpg"
    assert samples[1].fields == {"tar.gz": b"3"}
    assert samples[1].image_field is None


def test_read_webdataset_skips_directories_and_keeps_extensionless_members(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in [("sub/x.jpg", b"X"), ("README", b"hi")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    samples = _samples(path)
    assert [(s.key, s.fields) for s in samples] == [("sub/x", {"jpg": b"X"}), ("README", {"": b"hi"})]


def test_read_webdataset_picks_the_image_field_by_extension_order(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("a.webp", b"w"), ("a.png", b"p"), ("a.jpeg", b"j2"), ("a.jpg", b"j"),
            ("b.webp", b"w"), ("b.png", b"p"),
            ("c.seg.png", b"s"), ("c.webp", b"w"),
            ("d.json", b"{}"),
        ],
    )  # fmt: skip
    assert [s.image_field for s in _samples(shard)] == ["jpg", "png", "webp", None]
    # an explicit field wins, and is None where the sample lacks it
    assert [s.image_field for s in _samples(shard, "seg.png")] == [None, None, "seg.png", None]
    assert [s.image_field for s in _samples(shard, "webp")] == ["webp", "webp", "webp", None]


def test_webdataset_write_read_round_trip_is_deterministic(tmp_path):
    records = [("k1", [("jpg", b"\xff\xd8one"), ("json", b'{"a": 1}')]), ("k2", [("png", b"two")])]
    buf1, buf2 = io.BytesIO(), io.BytesIO()
    write_webdataset(buf1, records)
    write_webdataset(buf2, records)
    assert buf1.getvalue() == buf2.getvalue()
    path = tmp_path / "out.tar"
    path.write_bytes(buf1.getvalue())
    assert read_tar(path) == {"k1": {"jpg": b"\xff\xd8one", "json": b'{"a": 1}'}, "k2": {"png": b"two"}}
    assert _summary(_samples(path)) == [("k1", ["jpg", "json"], "jpg", None), ("k2", ["png"], "png", None)]


def test_read_webdataset_reads_through_fsspec_urls():
    fs = fsspec.filesystem("memory")
    path = f"/shardio-{uuid.uuid4().hex}/s.tar"
    buf = io.BytesIO()
    write_webdataset(buf, [("m", [("png", b"x")])])
    fs.pipe(path, buf.getvalue())
    try:
        assert _summary(list(read_webdataset("memory://" + path, None))) == [("m", ["png"], "png", None)]
    finally:
        fs.rm(path)


# --- read_webdataset: damaged shards ------------------------------------------------------------------------


def _three_sample_tar(tmp_path):
    members = [("a.jpg", b"A" * 1000), ("a.json", b"{}"), ("b.jpg", b"B" * 3000), ("b.cls", b"1"), ("c.jpg", b"C" * 700)]
    path = write_tar(tmp_path / "full.tar", members)
    with tarfile.open(path) as tar:
        offsets = {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}
    return path.read_bytes(), offsets


def test_truncated_tar_mid_member_yields_a_sample_with_read_error(tmp_path):
    full, offsets = _three_sample_tar(tmp_path)
    _, b_data, b_size = offsets["b.jpg"]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: b_data + b_size // 2])  # inside b.jpg's data
    samples = _samples(cut)
    assert samples[0].key == "a" and samples[0].read_error is None
    assert samples[0].fields == {"jpg": b"A" * 1000, "json": b"{}"}
    b = samples[1]
    assert b.key == "b" and b.read_error is not None and "truncated" in b.read_error
    assert samples[-1].key is None and "unreadable" in samples[-1].read_error
    assert len(samples) == 3
    assert [s.index for s in samples] == [0, 1, 2]


def test_truncated_tar_in_the_last_member_is_reported(tmp_path):
    full, offsets = _three_sample_tar(tmp_path)
    _, c_data, _ = offsets["c.jpg"]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: c_data + 100])
    samples = _samples(cut)
    assert [s.key for s in samples] == ["a", "b", "c", None]
    assert samples[1].read_error is None and samples[1].fields == {"jpg": b"B" * 3000, "cls": b"1"}
    assert samples[2].read_error and samples[3].read_error


def test_garbage_shard_yields_one_error_sample(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive at all" * 10)
    samples = _samples(bad)
    assert len(samples) == 1
    assert samples[0].key is None and "unreadable" in samples[0].read_error


def test_empty_shard_file_yields_an_error_sample_not_an_exception(tmp_path):
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    samples = _samples(empty)
    assert len(samples) == 1 and samples[0].key is None and samples[0].read_error


def test_truncated_tar_inside_a_header_is_reported(tmp_path):
    full, offsets = _three_sample_tar(tmp_path)
    c_header, _, _ = offsets["c.jpg"]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: c_header + 100])  # 100 bytes into c.jpg's 512-byte header
    samples = _samples(cut)
    assert any(s.read_error for s in samples), _summary(samples)


def test_truncated_tar_at_a_member_boundary_is_reported(tmp_path):
    full, offsets = _three_sample_tar(tmp_path)
    cls_header, _, _ = offsets["b.cls"]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[:cls_header])
    samples = _samples(cut)
    assert any(s.read_error for s in samples), _summary(samples)


# --- read_parquet ------------------------------------------------------------------------------------------


def _write_pq(path, table: pa.Table):
    pq.write_table(table, path)
    return str(path)


def test_read_parquet_with_a_bytes_image_column(tmp_path):
    table = pa.table({"image": pa.array([b"i0", b"i1", None], pa.binary()), "caption": ["x", "y", "z"]})
    schema, samples = read_parquet(_write_pq(tmp_path / "s.parquet", table), "image", None, "s")
    assert schema is not None and schema.names == ["image", "caption"]
    assert [s.key for s in samples] == ["s/0", "s/1", "s/2"]
    assert [s.index for s in samples] == [0, 1, 2]
    assert [s.fields["image"] for s in samples] == [b"i0", b"i1", None]
    assert all(s.image_field == "image" and s.read_error is None for s in samples)
    assert samples[1].fields["caption"] == "y"


def test_read_parquet_with_a_bytes_path_struct_column_and_a_key_column(tmp_path):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "img": pa.array([{"bytes": b"B0", "path": "p0.jpg"}, {"bytes": b"B1", "path": "p1.jpg"}], struct),
            "id": pa.array([17, 42], pa.int64()),
        }
    )
    schema, samples = read_parquet(_write_pq(tmp_path / "hf.parquet", table), "img", "id", "hf")
    assert schema.field("img").type == struct
    assert [s.key for s in samples] == ["17", "42"]
    assert [s.fields["img"] for s in samples] == [b"B0", b"B1"]
    assert all(s.read_error is None for s in samples)


def test_read_parquet_missing_image_column_is_an_error_sample(tmp_path):
    table = pa.table({"picture": [b"x"], "id": [1]})
    schema, samples = read_parquet(_write_pq(tmp_path / "s.parquet", table), "image", None, "s")
    assert schema is None
    assert len(samples) == 1 and samples[0].key is None
    err = samples[0].read_error
    assert "input.image_column" in err and "'image'" in err and "picture" in err


def test_read_parquet_missing_key_column_is_an_error_sample(tmp_path):
    table = pa.table({"image": [b"x"]})
    schema, samples = read_parquet(_write_pq(tmp_path / "s.parquet", table), "image", "uid", "s")
    assert schema is None and len(samples) == 1
    assert "input.key_column" in samples[0].read_error and "'uid'" in samples[0].read_error


def test_read_parquet_unsupported_image_cell_is_a_per_sample_error(tmp_path):
    table = pa.table({"image": ["path/only.jpg", "other.jpg"]})
    schema, samples = read_parquet(_write_pq(tmp_path / "s.parquet", table), "image", None, "s")
    assert schema is not None and len(samples) == 2
    assert all(s.read_error and "unsupported image cell type" in s.read_error for s in samples)


def test_read_parquet_unreadable_file_is_an_error_sample(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 garbage")
    schema, samples = read_parquet(str(bad), "image", None, "bad")
    assert schema is None and len(samples) == 1
    assert samples[0].key is None and "unreadable" in samples[0].read_error


def test_write_parquet_round_trip(tmp_path):
    schema = pa.schema([("image", pa.binary()), ("key", pa.string())])
    path = tmp_path / "out.parquet"
    with open(path, "wb") as f:
        write_parquet(f, [{"image": b"a", "key": "k0"}, {"image": b"b", "key": "k1"}], schema)
    got_schema, samples = read_parquet(str(path), "image", "key", "out")
    assert got_schema.names == ["image", "key"]
    assert [(s.key, s.fields["image"]) for s in samples] == [("k0", b"a"), ("k1", b"b")]


# --- storage.list_shards --------------------------------------------------------------------------------------


def _touch(*paths):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(p.name.encode())


def test_list_shards_expands_globs_sorted(tmp_path):
    _touch(tmp_path / "s-002.tar", tmp_path / "s-000.tar", tmp_path / "s-001.tar", tmp_path / "other.parquet")
    got = storage.list_shards(str(tmp_path / "s-*.tar"))
    assert got == [str(tmp_path / f"s-00{i}.tar") for i in range(3)]


def test_list_shards_lists_are_merged_and_deduplicated(tmp_path):
    _touch(tmp_path / "a" / "x.tar", tmp_path / "a" / "y.tar", tmp_path / "b" / "z.tar")
    got = storage.list_shards([str(tmp_path / "b" / "z.tar"), str(tmp_path / "a" / "*.tar"), str(tmp_path / "a" / "y.tar")])
    assert got == sorted([str(tmp_path / "a" / "x.tar"), str(tmp_path / "a" / "y.tar"), str(tmp_path / "b" / "z.tar")])


def test_list_shards_plain_path(tmp_path):
    _touch(tmp_path / "one.tar")
    assert storage.list_shards(str(tmp_path / "one.tar")) == [str(tmp_path / "one.tar")]


def test_list_shards_file_uri(tmp_path):
    _touch(tmp_path / "u-1.tar", tmp_path / "u-0.tar")
    got = storage.list_shards(f"file://{tmp_path}/u-*.tar")
    assert got == [str(tmp_path / "u-0.tar"), str(tmp_path / "u-1.tar")]
    assert [storage.read_bytes(u) for u in got] == [b"u-0.tar", b"u-1.tar"]


def test_list_shards_memory_uri():
    fs = fsspec.filesystem("memory")
    root = f"/ls-{uuid.uuid4().hex}"
    for name in ("m-1.tar", "m-0.tar", "m.parquet"):
        fs.pipe(f"{root}/{name}", name.encode())
    try:
        got = storage.list_shards(f"memory://{root}/m-*.tar")
        assert got == [f"memory://{root}/m-0.tar", f"memory://{root}/m-1.tar"]
        assert [storage.read_bytes(u) for u in got] == [b"m-0.tar", b"m-1.tar"]
        assert storage.list_shards(f"memory://{root}/m.parquet") == [f"memory://{root}/m.parquet"]
        assert storage.shard_name(got[0]) == "m-0.tar"
    finally:
        fs.rm(root, recursive=True)


@pytest.mark.parametrize("pattern", ["nothing-*.tar", "missing.tar"])
def test_list_shards_no_match_names_input_paths(tmp_path, pattern):
    _touch(tmp_path / "present.tar")
    with pytest.raises(FileNotFoundError) as ei:
        storage.list_shards([str(tmp_path / "present.tar"), str(tmp_path / pattern)])
    assert "input.paths" in str(ei.value) and pattern in str(ei.value)


def test_list_shards_no_match_on_memory_uri():
    with pytest.raises(FileNotFoundError, match="input.paths"):
        storage.list_shards(f"memory:///nothing-{uuid.uuid4().hex}/*.tar")


# --- storage.atomic_write_bytes -------------------------------------------------------------------------------


def test_atomic_write_bytes_leaves_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "dir" / "out.tar"
    storage.atomic_write_bytes(str(target), b"first")
    storage.atomic_write_bytes(str(target), b"second")  # overwrite in place
    assert target.read_bytes() == b"second"
    assert sorted(os.listdir(target.parent)) == ["out.tar"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_atomic_write_failure_removes_the_temp_file_and_keeps_the_old_content(tmp_path):
    target = tmp_path / "out.bin"
    storage.atomic_write_bytes(str(target), b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        storage.atomic_write_file(str(target), boom)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]

    fresh = tmp_path / "never.bin"
    with pytest.raises(RuntimeError):
        storage.atomic_write_file(str(fresh), boom)
    assert not fresh.exists()
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_bytes_on_a_memory_uri():
    fs = fsspec.filesystem("memory")
    root = f"/aw-{uuid.uuid4().hex}"
    try:
        storage.atomic_write_bytes(f"memory://{root}/sub/x.bin", b"payload")
        assert storage.read_bytes(f"memory://{root}/sub/x.bin") == b"payload"
        assert storage.exists(f"memory://{root}/sub/x.bin")
        assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/sub", detail=False)] == ["x.bin"]
    finally:
        fs.rm(root, recursive=True)


# --- keys that repeat, damaged compressed tars -------------------------------------------------------------


def test_repeated_members_and_keys_become_samples_of_their_own_marked_as_duplicates(tmp_path):
    """A second a.jpg (or a.JPG) must neither overwrite the first nor vanish: it is a sample of its own, recorded
    with an error that names the earlier sample (never the key: errors are public and keys may be names)."""
    shard = write_tar(tmp_path / "s.tar", [("a.jpg", b"A1"), ("a.jpg", b"A2"), ("b.jpg", b"B"), ("a.JPG", b"A3"),
                                           ("b.json", b"{}")])
    samples = _samples(shard)
    assert [(s.index, s.key, s.fields) for s in samples] == [
        (0, "a", {"jpg": b"A1"}), (1, "a", {"jpg": b"A2"}), (2, "b", {"jpg": b"B"}), (3, "a", {"jpg": b"A3"}),
        (4, "b", {"json": b"{}"})]
    assert samples[0].read_error is None and samples[2].read_error is None
    for s, first in zip([samples[1], samples[3], samples[4]], (0, 0, 2)):
        assert s.read_error.startswith(f"duplicate key: sample {first} of this shard has the same key")
        assert "'a'" not in s.read_error and "'b'" not in s.read_error


def test_read_parquet_null_and_repeated_keys_are_per_sample_errors(tmp_path):
    table = pa.table({"image": [b"i0", b"i1", b"i2", b"i3"], "id": pa.array(["x", None, "x", "y"])})
    schema, samples = read_parquet(_write_pq(tmp_path / "s.parquet", table), "image", "id", "s")
    assert schema is not None and [s.key for s in samples] == ["x", None, "x", "y"]
    assert samples[0].read_error is None and samples[3].read_error is None
    assert "input.key_column 'id' is null in row 1" in samples[1].read_error
    assert samples[2].read_error.startswith("duplicate key: sample 0 of this shard")


@pytest.mark.parametrize("mode", ["gz", "xz"])
def test_damaged_compressed_tar_yields_an_error_sample_not_an_exception(tmp_path, mode):
    """A damaged deflate or xz stream raises zlib.error / LZMAError, which are not OSErrors."""
    import gzip
    import lzma
    import random
    import zlib

    rng = random.Random(0)
    members = [(f"k{i}.txt", bytes(rng.choice(b"abcd") for _ in range(4000))) for i in range(6)]
    plain = write_tar(tmp_path / "plain.tar", members).read_bytes()
    packed = bytearray(gzip.compress(plain, mtime=0) if mode == "gz" else lzma.compress(plain))
    packed[len(packed) // 2 : len(packed) // 2 + 64] = bytes(64)
    damaged = tmp_path / f"s.tar.{mode}"
    damaged.write_bytes(bytes(packed))
    with pytest.raises(zlib.error if mode == "gz" else lzma.LZMAError):  # what tarfile itself raises here
        with tarfile.open(damaged, "r:*") as tar:
            for info in tar:
                tar.extractfile(info).read()
    samples = _samples(damaged)
    assert samples and samples[-1].key is None and samples[-1].read_error.startswith("shard unreadable after")
    assert ("while decompressing" if mode == "gz" else "LZMAError") in samples[-1].read_error
