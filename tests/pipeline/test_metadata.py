"""No identifying metadata survives by default: EXIF (GPS, thumbnail), name-bearing keys and fields."""
import io
import json
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import DEMO_SHARDS, job_tree
from helpers import encode, read_tar, write_tar
from pipeline.keys import create_master_key
from pipeline.runner import run_job
from pipeline.spec import JobSpecError, parse_spec

pytestmark = pytest.mark.timeout(300)


def exif_with_gps_and_thumbnail(thumbnail: bytes) -> bytes:
    """Big-endian TIFF/EXIF block: IFD0 -> GPS IFD (latitude), IFD1 -> embedded JPEG thumbnail."""
    def ifd(entries, next_offset):
        out = struct.pack(">H", len(entries))
        for tag, typ, count, value in entries:
            out += struct.pack(">HHI", tag, typ, count) + value
        return out + struct.pack(">I", next_offset)

    ifd0_at, gps_at, rat_at, ifd1_at = 8, 26, 56, 80
    thumb_at = 110
    ifd0 = ifd([(0x8825, 4, 1, struct.pack(">I", gps_at))], ifd1_at)
    gps = ifd([(0x0001, 2, 2, b"N\x00\x00\x00"), (0x0002, 5, 3, struct.pack(">I", rat_at))], 0)
    rationals = struct.pack(">IIIIII", 59, 1, 54, 1, 3012, 100)
    ifd1 = ifd([(0x0201, 4, 1, struct.pack(">I", thumb_at)), (0x0202, 4, 1, struct.pack(">I", len(thumbnail)))], 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", ifd0_at) + ifd0 + gps + rationals + ifd1
    assert len(tiff) == thumb_at
    return b"Exif\x00\x00" + tiff + thumbnail


def _photo_with_exif(portrait: bytes) -> tuple[bytes, bytes]:
    img = Image.open(io.BytesIO(portrait)).convert("RGB")
    thumb = img.copy()
    thumb.thumbnail((64, 64))
    thumb_bytes = encode(np.asarray(thumb), "JPEG", quality=80)
    exif = exif_with_gps_and_thumbnail(thumb_bytes)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, exif=exif)
    return buf.getvalue(), thumb_bytes


def test_exif_names_and_fields_do_not_leak(tmp_path):
    portrait = read_tar(DEMO_SHARDS[0])["nasa_Christina_Koch"]["jpg"]
    photo, thumb = _photo_with_exif(portrait)
    src = Image.open(io.BytesIO(photo))
    assert src.getexif().get_ifd(0x8825), "fixture must carry GPS"
    assert thumb in photo, "fixture must carry the thumbnail"
    shard = write_tar(
        tmp_path / "people-000000.tar",
        [
            ("lfw_AJ_Cook_0001.jpg", photo),
            ("lfw_AJ_Cook_0001.json", json.dumps({"identity": "AJ Cook", "dataset": "lfw"}).encode()),
            ("lfw_AJ_Cook_0001.cls", b"17"),
            ("lfw_AJ_Cook_0001.txt", b"AJ Cook at the premiere"),
        ],
    )
    master = tmp_path / "keys" / "master.key"
    create_master_key(master)
    out = tmp_path / "out"
    tree = job_tree(out, shard, output={"keys": "pseudonymize", "metadata": {"fields": ["cls", "json.dataset"]}}, keys={"master": str(master)})
    run_job(parse_spec(tree), echo=lambda *_: None)

    published = read_tar(out / "shards" / "people-000000.tar")
    (key, members), = published.items()
    assert "AJ" not in key and "Cook" not in key and len(key) == 24
    assert set(members) == {"jpg", "cls", "json"}, "txt is not allow-listed"
    assert json.loads(members["json"]) == {"dataset": "lfw"}, "only json.dataset is allow-listed"
    jpg = members["jpg"]
    assert b"Exif" not in jpg and thumb not in jpg
    assert not Image.open(io.BytesIO(jpg)).getexif()

    manifest = pq.read_table(out / "manifests" / "people-000000.tar.parquet")
    text = json.dumps(manifest.to_pylist(), default=str)
    assert "Cook" not in text and manifest.column("key").to_pylist() == [key]
    private = pq.read_table(out / "private" / "people-000000.tar.parquet").to_pylist()
    assert private[0]["original_key"] == "lfw_AJ_Cook_0001" and private[0]["key"] == key
    for f in (out / "run.json", out / "done" / "people-000000.tar.json"):
        body = f.read_text()
        assert "Cook" not in body
        assert json.loads(master.read_text())["key"] not in body, "key material must never reach outputs"


def test_exif_keep_still_drops_the_thumbnail(tmp_path):
    portrait = read_tar(DEMO_SHARDS[0])["nasa_Christina_Koch"]["jpg"]
    photo, thumb = _photo_with_exif(portrait)
    shard = write_tar(tmp_path / "p-000000.tar", [("x.jpg", photo)])
    out = tmp_path / "out"
    run_job(parse_spec(job_tree(out, shard, output={"metadata": {"exif": "keep"}})), echo=lambda *_: None)
    jpg = read_tar(out / "shards" / "p-000000.tar")["x"]["jpg"]
    assert thumb not in jpg
    assert Image.open(io.BytesIO(jpg)).getexif().get_ifd(0x8825), "exif: keep keeps GPS (explicit opt-in)"


def test_pseudonymize_without_a_key_refuses_to_start(tmp_path):
    tree = job_tree(tmp_path / "out", DEMO_SHARDS[0], output={"keys": "pseudonymize"})
    with pytest.raises(JobSpecError, match="keys init"):
        run_job(parse_spec(tree), echo=lambda *_: None)
    assert not (tmp_path / "out").exists()
