"""Per-shard keys: derivation, exported shard key files, the loader that takes a master or a shard key."""
from __future__ import annotations

import base64
import json
import os
import pickle
import re
import stat

import numpy as np
import pytest

from pipeline.keys import (
    KEY_BYTES,
    SHARD_KIND,
    KeyFileError,
    ShardKey,
    create_master_key,
    derive_shard_key,
    export_shard_key,
    key_id,
    keys_export_command,
    load_master_key,
    load_shard_key,
    pseudonym_key,
)
from pipeline.payload import PayloadContext, PayloadLayout, decode, encode, quantize

DS, SHARD = "demo-ds", "shard-000001.tar"


def _encodings(key: bytes) -> list[str]:
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()]


@pytest.fixture
def master_path(tmp_path):
    path = tmp_path / "master.json"
    create_master_key(path)
    return path


# --- derivation ----------------------------------------------------------------------------------------


def test_shard_keys_are_deterministic_and_differ_per_dataset_shard_and_master():
    master = os.urandom(KEY_BYTES)
    k = derive_shard_key(master, DS, SHARD)
    assert len(k) == KEY_BYTES and k == derive_shard_key(master, DS, SHARD)
    others = {
        derive_shard_key(master, DS, "shard-000002.tar"),
        derive_shard_key(master, "other-ds", SHARD),
        derive_shard_key(os.urandom(KEY_BYTES), DS, SHARD),
        master,
        pseudonym_key(master, DS),
    }
    assert k not in others and len(others) == 5


def test_field_boundaries_are_unambiguous():
    master = bytes(KEY_BYTES)
    assert derive_shard_key(master, "ab", "c") != derive_shard_key(master, "a", "bc")


@pytest.mark.parametrize("ds,shard", [("", SHARD), (DS, ""), (DS, "a\nb"), (DS, "x" * 256)])
def test_bad_names_are_refused(ds, shard):
    with pytest.raises(KeyFileError, match="must be a non-empty string"):
        derive_shard_key(bytes(KEY_BYTES), ds, shard)


def test_subkeys_are_independent_per_purpose():
    sk = ShardKey.from_master(bytes(KEY_BYTES), DS, SHARD)
    a, b = sk.derive(b"payload/v1/aead"), sk.derive(b"payload/v1/nonce")
    assert a != b and len(a) == KEY_BYTES and a != sk._material
    assert sk.derive(b"payload/v1/aead") == a


def test_shard_key_repr_shows_ids_only_and_pickles(master_path):
    master, mkid = load_master_key(master_path)
    sk = load_shard_key(master_path, DS, SHARD)
    text = repr(sk) + str(sk) + f"{sk}"
    assert sk.key_id in text and mkid in text and DS in text
    assert re.fullmatch(r"sk-[0-9a-f]{16}", sk.key_id)
    for enc in _encodings(sk._material) + _encodings(master):
        assert enc not in text
    assert pickle.loads(pickle.dumps(sk)) == sk


# --- export --------------------------------------------------------------------------------------------


def test_export_writes_a_self_describing_0600_file(master_path, tmp_path):
    out = tmp_path / "export" / "shard.key.json"
    old = os.umask(0)
    try:
        skid = export_shard_key(master_path, DS, SHARD, out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    doc = json.loads(out.read_text())
    master, mkid = load_master_key(master_path)
    assert doc["kind"] == SHARD_KIND and doc["version"] == 1
    assert doc["key_id"] == skid and doc["master_key_id"] == mkid
    assert doc["dataset_id"] == DS and doc["shard"] == SHARD
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["created"])
    assert base64.b64decode(doc["key"]) == derive_shard_key(master, DS, SHARD)
    for enc in _encodings(master):  # the master key never leaves its file
        assert enc not in out.read_text()


def test_export_refuses_to_overwrite(master_path, tmp_path):
    out = tmp_path / "shard.json"
    out.write_text("keep me")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        export_shard_key(master_path, DS, SHARD, out)
    assert out.read_text() == "keep me"


def test_export_needs_a_master_key(tmp_path, master_path):
    with pytest.raises(KeyFileError, match="g2face-pipe keys init"):
        export_shard_key(tmp_path / "missing.json", DS, SHARD, tmp_path / "out.json")
    shard_file = tmp_path / "s.json"
    export_shard_key(master_path, DS, SHARD, shard_file)
    with pytest.raises(KeyFileError, match="is a shard key .* not a master key"):
        export_shard_key(shard_file, DS, SHARD, tmp_path / "out2.json")
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out2.json").exists()


def test_export_takes_the_shard_name_from_a_path_and_checks_the_dataset_id(master_path, tmp_path):
    """The key is bound to the shard's name (recover reads it from the file name): a path given for --shard
    exports the key of its name, never a key that opens nothing."""
    line = keys_export_command(master_path, f"runs/x/shards/{SHARD}", DS, tmp_path / "a.key")
    assert f"shard {SHARD!r}" in line
    doc = json.loads((tmp_path / "a.key").read_text())
    master, _ = load_master_key(master_path)
    assert doc["shard"] == SHARD and base64.b64decode(doc["key"]) == derive_shard_key(master, DS, SHARD)
    with pytest.raises(KeyFileError, match=r"--dataset 'a b/\.\./' is not a dataset\.id"):
        keys_export_command(master_path, SHARD, "a b/../", tmp_path / "c.key")


def test_keys_export_command_reports_the_key_id_never_the_key(master_path, tmp_path, capsys):
    out = tmp_path / "s.json"
    line = keys_export_command(master_path, SHARD, DS, out)
    sk = load_shard_key(out, DS, SHARD)
    assert sk.key_id in line and str(out) in line and "recover" in line
    master, _ = load_master_key(master_path)
    for enc in _encodings(sk._material) + _encodings(master):
        assert enc not in line
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# --- loading -------------------------------------------------------------------------------------------


def test_master_and_exported_shard_key_load_to_the_same_key_and_open_the_same_payload(master_path, tmp_path):
    out = tmp_path / "s.json"
    export_shard_key(master_path, DS, SHARD, out)
    from_master, from_file = load_shard_key(master_path, DS, SHARD), load_shard_key(out, DS, SHARD)
    assert from_master == from_file and from_master.key_id == from_file.key_id
    assert from_file.master_key_id == load_master_key(master_path)[1]

    layout = PayloadLayout(4096, 128, 3)
    ctx = PayloadContext(DS, SHARD, "img_0001", 0, "g2face-hide-v1", 3)
    e = np.linspace(-1, 1, 128).astype(np.float32)
    res = decode(encode(e, ctx, from_master, layout), ctx, from_file, layout)
    assert res.ok and np.array_equal(res.embedding, quantize(e, 3))


@pytest.mark.parametrize("ds,shard", [(DS, "shard-000002.tar"), ("other-ds", SHARD)])
def test_a_shard_key_is_refused_for_another_shard_or_dataset(master_path, tmp_path, ds, shard):
    out = tmp_path / "s.json"
    skid = export_shard_key(master_path, DS, SHARD, out)
    with pytest.raises(KeyFileError) as ei:
        load_shard_key(out, ds, shard)
    msg = str(ei.value)
    assert skid in msg and repr(SHARD) in msg and repr(shard) in msg and repr(ds) in msg
    assert f"g2face-pipe keys export --master MASTER --dataset {ds} --shard {shard}" in msg
    # the master key opens any shard
    assert load_shard_key(master_path, ds, shard).shard == shard


@pytest.mark.parametrize("field,value", [("dataset_id", "other-ds"), ("shard", "shard-000002.tar")])
def test_an_edited_shard_key_file_is_detected(master_path, tmp_path, field, value):
    out = tmp_path / "s.json"
    export_shard_key(master_path, DS, SHARD, out)
    doc = json.loads(out.read_text())
    doc[field] = value  # try to make the key look like another shard's
    out.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="corrupted or edited"):
        load_shard_key(out, doc["dataset_id"], doc["shard"])


@pytest.mark.parametrize(
    "content,match",
    [
        ("not json", "not a readable key file"),
        ('{"kind": "something-else"}', "not a g2face-pipe master or shard key"),
        (json.dumps({"kind": SHARD_KIND, "dataset_id": DS, "shard": SHARD}), "not a readable shard key file"),
        (json.dumps({"kind": SHARD_KIND, "dataset_id": DS, "shard": SHARD, "key_id": "sk-0", "key": "AAAA"}), "32 bytes"),
    ],
)
def test_malformed_key_files_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "k.json"
    path.write_text(content)
    with pytest.raises(KeyFileError, match=match):
        load_shard_key(path, DS, SHARD)


def test_missing_key_file_names_both_ways_to_get_one(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist") as ei:
        load_shard_key(tmp_path / "nope.json", DS, SHARD)
    assert "keys init" in str(ei.value) and "keys export" in str(ei.value)


def test_a_swapped_key_in_a_shard_key_file_is_detected_without_echoing_it(master_path, tmp_path):
    out = tmp_path / "s.json"
    export_shard_key(master_path, DS, SHARD, out)
    doc = json.loads(out.read_text())
    other = bytes(range(KEY_BYTES))
    doc["key"] = base64.b64encode(other).decode()
    out.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="key_id") as ei:
        load_shard_key(out, DS, SHARD)
    for enc in _encodings(other):
        assert enc not in str(ei.value)


def test_key_ids_of_master_and_shard_keys_differ_and_reveal_nothing(master_path):
    master, mkid = load_master_key(master_path)
    sk = load_shard_key(master_path, DS, SHARD)
    assert mkid == key_id(master) and sk.key_id != mkid
    for i in range(0, KEY_BYTES - 4):
        assert sk._material[i : i + 4].hex() not in sk.key_id
