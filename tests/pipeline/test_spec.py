import hashlib
import json
import subprocess
import sys

import pytest
import yaml

from conftest import DEMO_SHARDS, ROOT, job_tree
from pipeline import manifest, spec as spec_mod
from pipeline.spec import JobSpecError, load_spec, parse_spec


def test_job_schema_file_matches_the_spec_classes():
    committed = (ROOT / "schemas" / "job.schema.json").read_text()
    assert committed == spec_mod.schema_text(), "schemas/job.schema.json is stale: run `make schemas`"


def test_manifest_schema_file_matches_the_code():
    committed = (ROOT / "schemas" / "manifest.schema.json").read_text()
    assert committed == manifest.schema_text(), "schemas/manifest.schema.json is stale: run `make schemas`"


def test_demo_job_is_valid():
    s = load_spec(ROOT / "jobs" / "demo.yaml")
    assert s.anonymizer.method in ("blur", "pixelate", "g2face")
    assert s.input.format == "webdataset"


def test_unknown_key_is_named_with_its_path(tmp_path):
    tree = job_tree(tmp_path, DEMO_SHARDS)
    tree["output"]["dirr"] = "x"
    with pytest.raises(JobSpecError, match=r"output\.dirr: unknown key"):
        parse_spec(tree)


def test_a_misspelt_key_gets_the_closest_key_of_its_own_section(tmp_path):
    tree = job_tree(tmp_path, DEMO_SHARDS)
    tree["anonymizer"]["draw"] = 4  # 'draws' in anonymizer; 'draw' appears in no other section either
    tree["metrics"] = {"resolutoin": 256}
    tree["outptu"] = {}
    with pytest.raises(JobSpecError) as err:
        parse_spec(tree)
    text = str(err.value)
    assert "anonymizer.draw: unknown key (did you mean 'draws'?" in text
    assert "metrics.resolutoin: unknown key (did you mean 'resolution'?" in text
    assert "outptu: unknown key (did you mean 'output'?" in text
    tree = job_tree(tmp_path, DEMO_SHARDS)
    tree["anonymizer"]["zzzz"] = 1  # nothing close: no guess
    with pytest.raises(JobSpecError) as err:
        parse_spec(tree)
    assert "did you mean" not in str(err.value)


def test_known_keys_follow_the_schema_through_optional_sections():
    schema = spec_mod.json_schema()
    assert "draws" in spec_mod.known_keys(schema, ["anonymizer"])
    assert "g2face" in spec_mod.known_keys(schema, ["anonymizer", "official"])  # an Optional section
    assert spec_mod.known_keys(schema, ["seed"]) == [] and spec_mod.known_keys(schema, ["nope"]) == []


def test_bad_values_name_the_field_and_the_allowed_values(tmp_path):
    tree = job_tree(tmp_path, DEMO_SHARDS, anonymizer={"method": "swap"}, resources={"detect": {"actors": 0}})
    with pytest.raises(JobSpecError) as err:
        parse_spec(tree)
    text = str(err.value)
    assert "anonymizer.method" in text and "'g2face', 'blur' or 'pixelate'" in text
    assert "resources.detect.actors" in text


def test_threshold_order_and_parquet_columns_are_checked(tmp_path):
    tree = job_tree(tmp_path, DEMO_SHARDS, detection={"score_threshold": 0.5, "low_score_threshold": 0.9})
    with pytest.raises(JobSpecError, match="low_score_threshold"):
        parse_spec(tree)
    tree = job_tree(tmp_path, DEMO_SHARDS, input={"format": "parquet", "paths": "x.parquet"})
    with pytest.raises(JobSpecError, match="input.image_column is required"):
        parse_spec(tree)


def test_set_overrides_parse_yaml_values(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_tree(tmp_path / "out", DEMO_SHARDS)))
    s = load_spec(job, ["seed=7", "detection.stage_thresholds=[0.5, 0.6, 0.7]", "output.image_format=png"])
    assert s.seed == 7 and s.detection.stage_thresholds == (0.5, 0.6, 0.7) and s.output.image_format == "png"
    with pytest.raises(JobSpecError, match=r"anonymizer.nope: unknown key .*\(from --set anonymizer.nope=1\)"):
        load_spec(job, ["anonymizer.nope=1"])
    with pytest.raises(JobSpecError) as err:  # the error names the --set that wrote the key, not the file alone
        load_spec(job, ["output.image_format=png", "anonymizer.draws=99"])
    assert "anonymizer.draws: Input should be less than or equal to 64 (from --set anonymizer.draws=99)" in str(err.value)
    assert "image_format=png" not in str(err.value)
    # an error about the whole job is not pinned on an override of one key in it
    job.write_text(yaml.safe_dump(job_tree(tmp_path / "out", DEMO_SHARDS, input={"format": "parquet", "paths": "x.parquet"})))
    with pytest.raises(JobSpecError) as err:
        load_spec(job, ["seed=7"])
    assert "input.image_column is required" in str(err.value) and "--set seed" not in str(err.value)
    with pytest.raises(JobSpecError, match="expected key=value"):
        load_spec(job, ["seed"])


def test_spec_is_frozen(tmp_path):
    s = parse_spec(job_tree(tmp_path, DEMO_SHARDS))
    with pytest.raises(Exception):
        s.seed = 3


def test_dry_run_prints_spec_and_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "jobs" / "demo.yaml"), "--dry-run", "--set", f"output.dir={out}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "# resolved job spec" in res.stdout and "create_demo_key: true" in res.stdout
    assert res.stdout.count("run          ") == 2 and "2 to run, 0 already done" in res.stdout
    assert not out.exists()
    assert "draws:" not in res.stdout and "anonymizer.draws" in res.stdout  # the demo is a blur job
    assert "blur_sigma: 0.08" in res.stdout and "pixelate_blocks: 8" in res.stdout  # its method and fallback


def test_every_anonymizer_key_is_either_shared_or_g2face_only():
    """A new g2face setting must join G2FACE_ONLY_KEYS, or blur jobs' dry runs would show it as their own."""
    import dataclasses

    shared = {"method", "resolution", "min_size", "fallback", "blur_sigma", "pixelate_blocks"}
    fields = {f.name for f in dataclasses.fields(spec_mod.AnonymizerSpec)}
    assert fields == shared | set(spec_mod.G2FACE_ONLY_KEYS) and not shared & set(spec_mod.G2FACE_ONLY_KEYS)


def test_dry_run_shows_only_the_anonymizer_keys_the_job_reads(tmp_path):
    from pipeline.runner import dry_run_text

    g2 = parse_spec(job_tree(tmp_path, DEMO_SHARDS, anonymizer={"method": "g2face", "fallback": "pixelate"}))
    text = dry_run_text(g2, [])
    assert "draws: 32" in text and "identity_push: 0.5" in text and "pixelate_blocks" in text
    assert "blur_sigma" in text and "left out: anonymizer.blur_sigma," in text  # named as left out, not shown
    assert "\n  blur_sigma" not in text
    px = parse_spec(job_tree(tmp_path, DEMO_SHARDS, anonymizer={"method": "pixelate", "fallback": "withhold"}))
    text = dry_run_text(px, [])
    assert "\n  draws" not in text and "\n  blur_sigma" not in text and "\n  pixelate_blocks: 8" in text


def test_cli_reports_spec_errors_without_traceback(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("dataset: {id: x}\ninput: {format: tar, paths: a}\noutput: {dir: o}\n")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "input.format" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_validates(job):
    if job.name.startswith("prepare-"):
        from pipeline.prepare import load_prepare_spec

        load_prepare_spec(job)  # prepare jobs have their own spec
    elif job.name.startswith("train-"):
        from pipeline.train import load_train_spec

        load_train_spec(job)  # so do training jobs
    else:
        load_spec(job)


def test_g2face_method_without_a_checkpoint_plans_with_the_shipped_model(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "jobs" / "demo.yaml"), "--dry-run",
         "--set", f"output.dir={tmp_path / 'out'}", "--set", "anonymizer.method=g2face"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "# shard plan" in res.stdout and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.key"))


def test_error_location_keeps_key_names_intact(tmp_path):
    tree = job_tree(tmp_path, DEMO_SHARDS)
    tree["output"]["strip_exif"] = True
    with pytest.raises(JobSpecError, match=r"output\.strip_exif: unknown key"):
        parse_spec(tree)


def test_fingerprint_ignores_locations_but_not_detection_batching(tmp_path):
    base = parse_spec(job_tree(tmp_path / "a", DEMO_SHARDS))
    moved = parse_spec(job_tree(tmp_path / "b", DEMO_SHARDS[:1]))
    rebatched = parse_spec(job_tree(tmp_path / "a", DEMO_SHARDS, resources={"detect": {"batch_size": 3}}))
    assert spec_mod.spec_fingerprint(base) == spec_mod.spec_fingerprint(moved)
    assert spec_mod.spec_fingerprint(base) != spec_mod.spec_fingerprint(rebatched)



def test_pseudonymized_g2face_jobs_fingerprint_the_seed_rule(tmp_path):
    """Their face seeds come from the published key now: a run begun with seeds from the original keys must
    not resume into shards drawn the new way. Jobs whose seeds did not move keep their fingerprints."""
    from pipeline.spec import fingerprint_fields, spec_fingerprint

    for method, keys, moved in (("g2face", "pseudonymize", True), ("g2face", "keep", False),
                                ("blur", "pseudonymize", False)):
        spec = parse_spec(job_tree(tmp_path / "out", DEMO_SHARDS[0], anonymizer={"method": method},
                                   keys={"master": str(tmp_path / "m.key")}, output={"keys": keys}))
        fields = fingerprint_fields(spec)
        assert (fields.pop("face_seeds", None) == "published_key") is moved, (method, keys)
        assert (spec_fingerprint(spec) != hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]) is moved


def test_a_master_key_uri_is_refused_naming_the_field(tmp_path):
    with pytest.raises(JobSpecError, match=r"keys.master 's3://bucket/m.key' is a URI.*local"):
        parse_spec(job_tree(tmp_path / "out", DEMO_SHARDS[0], keys={"master": "s3://bucket/m.key"}))


def test_fingerprint_ignores_where_weight_files_lie_but_not_the_recognizer_hash(tmp_path):
    """A moved or remounted weights file resumes: its content is checked by the model id in the done markers
    (and recognizer_sha256), not by its path. Unset paths keep the fingerprints of older runs."""
    from pipeline.spec import spec_fingerprint

    def fp(**sections):
        return spec_fingerprint(parse_spec(job_tree(tmp_path / "out", DEMO_SHARDS[0], **sections)))

    assert fp(anonymizer={"method": "g2face", "checkpoint": "/a/lite.pt"}) == \
        fp(anonymizer={"method": "g2face", "checkpoint": "/mnt/b/lite.pt"})
    official = {"g2face": "/a/G2Face.pth", "arcface": "/a/arc.pth", "deep3d": "/a/epoch_20.pth"}
    moved = {k: v.replace("/a/", "/b/") for k, v in official.items()}
    assert fp(anonymizer={"method": "g2face", "weights": "official", "resolution": 256, "official": official}) == \
        fp(anonymizer={"method": "g2face", "weights": "official", "resolution": 256, "official": moved})
    sha = "ab" * 32
    assert fp(metrics={"recognizer_checkpoint": "/a/r50.pth", "recognizer_sha256": sha}) == \
        fp(metrics={"recognizer_checkpoint": "/b/r50.pth", "recognizer_sha256": sha})
    assert fp(metrics={"recognizer_checkpoint": "/a/r50.pth", "recognizer_sha256": sha}) != \
        fp(metrics={"recognizer_checkpoint": "/a/r50.pth", "recognizer_sha256": "cd" * 32})


def test_runs_begun_while_weight_paths_were_hashed_still_resume(tmp_path):
    """Fingerprints computed by 8e57449 (before weight paths left them) for the trees `evaluate` writes: the
    g2face one named its checkpoint, so its old fingerprint is still accepted; the blur one named none and
    keeps its fingerprint."""
    from pathlib import Path

    from pipeline.evaluate import job_tree as evaluate_tree
    from pipeline.spec import accepted_fingerprints, spec_fingerprint

    def spec(method, checkpoint, push=None, keep_detection=None):
        tree = evaluate_tree(method, ["/data/a.tar"], Path("/out"), Path("/k.key"), 128, checkpoint, "cpu", 0, 0, 16)
        if push is not None:
            tree["anonymizer"]["identity_push"] = push
        if keep_detection is not None:
            tree["anonymizer"]["payload_reinforce_keep_detection"] = keep_detection
        return parse_spec(tree)

    # 8e57449 had no identity push nor payload_reinforce_keep_detection: with both off, the same job resumes;
    # with either on (the defaults since), some faces are published differently, so those shards must not be
    # resumed into
    g2face = spec("g2face", Path("/models/lite.pt"), push=0, keep_detection=False)
    assert "7e36e6907e4c6f7f" in accepted_fingerprints(g2face) and spec_fingerprint(g2face) != "7e36e6907e4c6f7f"
    assert accepted_fingerprints(spec("g2face", Path("/elsewhere/lite.pt"), push=0, keep_detection=False)) != \
        accepted_fingerprints(g2face)
    assert "7e36e6907e4c6f7f" not in accepted_fingerprints(spec("g2face", Path("/models/lite.pt"), keep_detection=False))
    assert "7e36e6907e4c6f7f" not in accepted_fingerprints(spec("g2face", Path("/models/lite.pt"), push=0))
    assert accepted_fingerprints(spec("blur", None)) == {spec_fingerprint(spec("blur", None)), "ba97d44d3477a365"} \
        == {"ba97d44d3477a365"}


def test_g2face_jobs_whose_guard_reads_the_redraw_verdict_fingerprint_it(tmp_path):
    """The guard sends more faces to the fallback since it reads the redraw check: a run begun before must
    not resume into shards guarded the new way. Jobs whose guard did not change keep their fingerprints."""
    from pipeline.spec import fingerprint_fields, spec_fingerprint

    for anonymizer, moved in (({"method": "g2face"}, True), ({"method": "g2face", "identity_guard": "withhold"}, True),
                              ({"method": "g2face", "identity_guard": "off"}, False),
                              ({"method": "g2face", "draws": 1}, False), ({"method": "blur"}, False)):
        spec = parse_spec(job_tree(tmp_path / "out", DEMO_SHARDS[0], anonymizer=anonymizer))
        fields = fingerprint_fields(spec)
        assert (fields.pop("identity_guard_checks", None) == "crop_and_published") is moved, anonymizer
        old = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
        assert (spec_fingerprint(spec) != old) is moved, anonymizer


def test_set_values_that_are_not_yaml_name_the_override_and_how_to_quote():
    with pytest.raises(JobSpecError, match=r"--set input\.paths=\*\.tar: the value is not valid YAML .*quote it, "
                                           r"e\.g\. --set 'input\.paths=\"\*\.tar\"'"):
        load_spec(ROOT / "jobs" / "demo.yaml", ["input.paths=*.tar"])
    assert load_spec(ROOT / "jobs" / "demo.yaml", ['dataset.id="x1"']).dataset.id == "x1"


def test_a_folder_or_a_training_job_given_to_run_says_what_to_give(tmp_path):
    with pytest.raises(JobSpecError, match="is a folder; pass the path of a YAML job spec"):
        load_spec(ROOT / "jobs")
    with pytest.raises(JobSpecError, match=r"is a training job .*`g2face-pipe train .*train-lite\.yaml`"):
        load_spec(ROOT / "jobs" / "train-lite.yaml")
    with pytest.raises(JobSpecError, match=r"is a prepare job .*`g2face-pipe prepare .*prepare-train\.yaml`"):
        load_spec(ROOT / "jobs" / "prepare-train.yaml")


def test_the_cluster_template_runs_the_shipped_model_at_its_resolution():
    """jobs/celeba.yaml names no checkpoint, so its resolution must be the shipped model's (a 256 px job
    stops at start: 'a 128 px model but anonymizer.resolution is 256')."""
    from g2face.config import preset

    spec = load_spec(ROOT / "jobs" / "celeba.yaml")
    assert spec.anonymizer.checkpoint is None and spec.anonymizer.resolution == preset("lite-128").resolution


def test_home_in_key_and_weight_paths_is_expanded_as_a_shell_would(tmp_path):
    import os

    spec = parse_spec(job_tree(tmp_path / "out", DEMO_SHARDS[0], keys={"master": "~/k/m.key"},
                               anonymizer={"method": "g2face", "checkpoint": "~/w/lite.pt"},
                               metrics={"recognizer_checkpoint": "~/w/r50.pth", "recognizer_sha256": "ab" * 32}))
    home = os.path.expanduser("~")
    assert spec.keys.master == f"{home}/k/m.key" and spec.anonymizer.checkpoint == f"{home}/w/lite.pt"
    assert spec.metrics.recognizer_checkpoint == f"{home}/w/r50.pth"


def test_a_dry_run_refuses_what_the_run_would_refuse_and_writes_nothing(tmp_path):
    """Empty or folder inputs, shards of another format, outputs that land where the inputs are matched, an
    output.dir that is a file, a missing key, a damaged done marker: named before anything is read or written."""
    import shutil

    from pipeline.runner import run_job

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(DEMO_SHARDS[0], src / DEMO_SHARDS[0].name)
    (tmp_path / "a-file").write_text("x")

    def dry(paths=str(src / "*.tar"), out=tmp_path / "out", **sections):
        return run_job(parse_spec(job_tree(out, paths, **sections)), dry_run=True, echo=lambda *_: None)

    cases = [
        (dict(paths=[]), FileNotFoundError, "input.paths is empty"),
        (dict(paths=str(src)), FileNotFoundError, "is a folder, not a shard; give a glob of its shards"),
        (dict(input={"format": "parquet", "paths": str(src / "*.tar"), "image_column": "jpg"}), JobSpecError,
         "is not a parquet shard, but input.format is 'parquet'"),
        (dict(paths=str(src / "**" / "*.tar"), out=src / "anon"), JobSpecError,
         r"also matches .*anon/shards/nasa-000000\.tar, an output of this job"),
        (dict(paths=[str(src / "[!]a]*.tar")], out=src / "anon"), None, None),  # fsspec's glob syntax, not a crash
        (dict(out="memory://out", keys={"create_demo_key": True}), JobSpecError, "works with a local output.dir only"),
        (dict(out=tmp_path / "a-file" / "out"), PermissionError, "a-file is a file"),
        (dict(anonymizer={"method": "g2face"}), JobSpecError, "needs keys.master"),
    ]
    for kwargs, error, match in cases:
        if error is None:
            dry(**kwargs)
            continue
        with pytest.raises(error, match=match):
            dry(**kwargs)
    (src / "anon" / "shards").mkdir(parents=True)
    shutil.copy(DEMO_SHARDS[0], src / "anon" / "shards" / "x.tar")
    with pytest.raises(JobSpecError, match=r"input shard .*anon/shards/x\.tar lies where this job writes its outputs"):
        dry(paths=str(src / "anon" / "shards" / "x.tar"), out=src / "anon")
    shutil.rmtree(src / "anon")
    dry(paths=str(src / "*.tar"), out=src / "anon")  # a glob that does not reach the outputs is fine
    dry(paths=str(src / "*.tar"), out=src)  # so are outputs next to the inputs, in their own folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "in"] and not (src / "anon").exists()
    (tmp_path / "out" / "done").mkdir(parents=True)
    (tmp_path / "out" / "done" / f"{DEMO_SHARDS[0].name}.json").write_text("{")
    with pytest.raises(JobSpecError, match=r"done marker .*nasa-000000\.tar\.json of shard nasa-000000\.tar is "
                                           r"damaged \(JSONDecodeError\); delete it"):
        dry()
