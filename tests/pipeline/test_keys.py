"""Master key files, key ids and keyed pseudonyms."""
from __future__ import annotations

import base64
import json
import os
import re
import stat

import pytest
from typer.testing import CliRunner

from pipeline.keys import (
    KEY_BYTES,
    MASTER_KIND,
    KeyFileError,
    create_master_key,
    key_id,
    load_master_key,
    pseudonym_key,
    pseudonymize,
)


def _key_encodings(key: bytes) -> list[str]:
    return [
        key.hex(),
        key.hex().upper(),
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode(),
        base64.b64encode(key).decode().rstrip("="),
    ]


def _doc(path) -> dict:
    return json.loads(path.read_text())


# --- create_master_key ---------------------------------------------------------------------------------


def test_create_master_key_writes_mode_0600_even_with_a_permissive_umask(tmp_path):
    path = tmp_path / "keys" / "master.json"  # parent is created
    old = os.umask(0)
    try:
        kid = create_master_key(path, note="unit test")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = _doc(path)
    assert doc["kind"] == MASTER_KIND and doc["version"] == 1
    assert doc["key_id"] == kid and doc["note"] == "unit test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["created"])
    assert len(base64.b64decode(doc["key"])) == KEY_BYTES


def test_create_master_key_refuses_to_overwrite(tmp_path):
    path = tmp_path / "master.json"
    create_master_key(path)
    original = path.read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        create_master_key(path)
    assert path.read_bytes() == original


def test_create_master_key_refuses_an_existing_unrelated_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("important")
    with pytest.raises(KeyFileError):
        create_master_key(path)
    assert path.read_text() == "important"


def test_each_new_key_is_random(tmp_path):
    k1 = create_master_key(tmp_path / "a.json")
    k2 = create_master_key(tmp_path / "b.json")
    assert k1 != k2
    assert _doc(tmp_path / "a.json")["key"] != _doc(tmp_path / "b.json")["key"]


def test_creating_a_key_prints_nothing_and_returns_only_the_key_id(tmp_path, capsys):
    path = tmp_path / "master.json"
    kid = create_master_key(path)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    key, _ = load_master_key(path)
    assert kid == key_id(key)
    for enc in _key_encodings(key):
        assert enc not in kid


def test_keys_init_cli_reports_the_key_id_but_never_the_key(tmp_path):
    from pipeline.cli import app

    path = tmp_path / "master.json"
    result = CliRunner().invoke(app, ["keys", "init", "--out", str(path)])
    assert result.exit_code == 0, result.output
    key, kid = load_master_key(path)
    assert kid in result.output
    for enc in _key_encodings(key):
        assert enc not in result.output
    again = CliRunner().invoke(app, ["keys", "init", "--out", str(path)])
    assert again.exit_code != 0
    assert "refusing to overwrite" in again.output
    for enc in _key_encodings(key):
        assert enc not in again.output


# --- load_master_key -----------------------------------------------------------------------------------


def test_load_master_key_round_trip(tmp_path):
    path = tmp_path / "master.json"
    kid = create_master_key(path)
    key, kid2 = load_master_key(path)
    assert isinstance(key, bytes) and len(key) == KEY_BYTES
    assert kid2 == kid == key_id(key)
    assert base64.b64decode(_doc(path)["key"]) == key
    assert load_master_key(str(path)) == (key, kid)  # str paths too


def test_load_master_key_detects_an_edited_key_id(tmp_path):
    path = tmp_path / "master.json"
    create_master_key(path)
    doc = _doc(path)
    doc["key_id"] = "mk-" + "0" * 16
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="key_id does not match"):
        load_master_key(path)


def test_load_master_key_detects_a_swapped_key(tmp_path):
    path = tmp_path / "master.json"
    create_master_key(path)
    doc = _doc(path)
    other = bytes(range(KEY_BYTES))
    doc["key"] = base64.b64encode(other).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="key_id") as ei:
        load_master_key(path)
    for enc in _key_encodings(other):
        assert enc not in str(ei.value)


def test_missing_key_file_error_names_keys_init(tmp_path):
    path = tmp_path / "nope" / "master.json"
    with pytest.raises(KeyFileError) as ei:
        load_master_key(path)
    msg = str(ei.value)
    assert "g2face-pipe keys init" in msg
    assert str(path) in msg
    assert "does not exist" in msg


@pytest.mark.parametrize(
    "content,match",
    [
        ("not json at all", "not a readable master key"),
        ('{"kind": "something-else", "key": "AAAA"}', "not a g2face-pipe master key"),
        ('[1, 2, 3]', "not a readable master key"),
        ('{"kind": "g2face-pipe/master-key"}', "not a readable master key"),
        ('{"kind": "g2face-pipe/master-key", "key": "!!!not base64!!!"}', "not a readable master key"),
    ],
)
def test_malformed_key_files_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "master.json"
    path.write_text(content)
    with pytest.raises(KeyFileError, match=match):
        load_master_key(path)


def test_wrong_key_length_is_rejected_without_echoing_the_key(tmp_path):
    short = b"s3cr3t-short-key-material"
    path = tmp_path / "master.json"
    path.write_text(json.dumps({"kind": MASTER_KIND, "key": base64.b64encode(short).decode(), "key_id": key_id(short)}))
    with pytest.raises(KeyFileError, match=f"{KEY_BYTES} bytes") as ei:
        load_master_key(path)
    for enc in _key_encodings(short) + [short.decode()]:
        assert enc not in str(ei.value)


def test_a_directory_is_not_a_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="is a folder; give the path of the key file in it"):
        load_master_key(tmp_path)
    with pytest.raises(KeyFileError, match=r"is a folder; give the path of the key file to create, e\.g\. .*master\.key"):
        create_master_key(tmp_path)


def test_a_key_that_cannot_be_written_is_a_key_error_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyFileError, match=r"cannot create the folder of .*file/sub/m\.key \(.*\); choose another"):
        create_master_key(tmp_path / "file" / "sub" / "m.key")


# --- key ids and pseudonyms ----------------------------------------------------------------------------


def test_key_id_format_and_no_key_material():
    key = bytes(range(KEY_BYTES))
    kid = key_id(key)
    assert re.fullmatch(r"mk-[0-9a-f]{16}", kid)
    assert kid == key_id(key)  # deterministic
    assert kid != key_id(bytes(KEY_BYTES))
    for enc in _key_encodings(key):
        assert enc not in kid
    for i in range(0, KEY_BYTES - 4):  # no 4-byte window of the key in hex either
        assert key[i : i + 4].hex() not in kid


def test_pseudonymize_is_deterministic_and_24_hex_chars():
    pkey = pseudonym_key(os.urandom(KEY_BYTES), "ds")
    p = pseudonymize(pkey, "shard-000/img_0001")
    assert re.fullmatch(r"[0-9a-f]{24}", p)
    assert pseudonymize(pkey, "shard-000/img_0001") == p
    assert pseudonymize(pkey, "shard-000/img_0002") != p
    assert "img_0001" not in p


def test_pseudonyms_differ_per_dataset_and_per_master_key():
    master = os.urandom(KEY_BYTES)
    k_a, k_b = pseudonym_key(master, "dataset-a"), pseudonym_key(master, "dataset-b")
    assert len(k_a) == KEY_BYTES
    assert k_a != k_b and k_a != master
    assert pseudonym_key(master, "dataset-a") == k_a
    assert pseudonymize(k_a, "x") != pseudonymize(k_b, "x")
    assert pseudonymize(pseudonym_key(os.urandom(KEY_BYTES), "dataset-a"), "x") != pseudonymize(k_a, "x")


def test_pseudonyms_are_collision_free_on_many_keys():
    pkey = pseudonym_key(bytes(KEY_BYTES), "ds")
    names = [f"sample-{i:05d}" for i in range(5000)]
    assert len({pseudonymize(pkey, n) for n in names}) == len(names)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o666])
def test_a_key_file_others_can_read_is_refused_with_the_fix(tmp_path, mode):
    """Whoever reads the master key opens every payload and reverses the pseudonyms (ssh refuses such keys too)."""
    from pipeline.keys import export_shard_key, load_shard_key

    master, shard = tmp_path / "master.json", tmp_path / "shard.json"
    create_master_key(master)
    export_shard_key(master, "ds", "s-000.tar", shard)
    for path, load in ((master, load_master_key), (shard, lambda p: load_shard_key(p, "ds", "s-000.tar")),
                       (master, lambda p: load_shard_key(p, "ds", "s-000.tar"))):
        os.chmod(path, 0o600)
        load(path)
        os.chmod(path, mode)
        with pytest.raises(KeyFileError, match=rf"mode {mode:04o}.*chmod 600 {re.escape(str(path))}"):
            load(path)
        os.chmod(path, 0o400)
        load(path)  # read-only for its owner is fine


def test_file_systems_without_private_modes_can_opt_out_explicitly(tmp_path, monkeypatch):
    from pipeline.keys import ALLOW_SHARED_KEY_ENV

    path = tmp_path / "master.json"
    create_master_key(path)
    os.chmod(path, 0o777)  # what CIFS or WSL's /mnt/c report whatever chmod does
    with pytest.raises(KeyFileError, match=f"then set {ALLOW_SHARED_KEY_ENV}=1"):
        load_master_key(path)
    monkeypatch.setenv(ALLOW_SHARED_KEY_ENV, "1")
    assert load_master_key(path)[1].startswith("mk-")
    monkeypatch.setenv(ALLOW_SHARED_KEY_ENV, "yes")  # only "1" opts out
    with pytest.raises(KeyFileError):
        load_master_key(path)
