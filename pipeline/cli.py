"""Command line: ``g2face-pipe run JOB.yaml [--dry-run] [--set key=value ...]``, ``g2face-pipe audit RUN_DIR``,
``g2face-pipe keys init``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Anonymize every face in image datasets with G2Face.")
keys_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Create and manage key files.")
app.add_typer(keys_app, name="keys")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@app.command()
def run(
    job: Path = typer.Argument(..., help="YAML job spec (see jobs/)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved spec and shard plan, run nothing."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: --set output.dir=/tmp/out (YAML value)."),
) -> None:
    """Anonymize a sharded corpus into 1:1 output shards with manifests."""
    from .keys import KeyFileError
    from .anonymizers import AnonymizerUnavailable
    from .models import WeightsError
    from .runner import run_job
    from .spec import JobSpecError, load_spec

    from .stages import StageError

    try:
        spec = load_spec(job, set_ or [])
        run_job(spec, dry_run=dry_run, echo=typer.echo)
    except (JobSpecError, KeyFileError, AnonymizerUnavailable, WeightsError, FileNotFoundError, PermissionError,
            StageError) as e:
        _fail(str(e))


@app.command()
def submit(
    job: Path = typer.Argument(..., help="YAML job spec."),
    address: str = typer.Option(..., "--address", help="Ray dashboard address of the cluster, e.g. http://HEAD:8265."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job to finish and print its final status."),
    timeout: float = typer.Option(24 * 3600, "--timeout", help="With --wait: give up waiting after this many seconds."),
    python: str = typer.Option("python", "--python", help="Python of the cluster's environment (has the dependencies)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key (YAML value), as for `run`."),
) -> None:
    """Submit a job to a Ray cluster through the Ray Jobs API; prints the submission id."""
    import shutil

    from .ray_adapter import TERMINAL_STATES, submit as submit_job, wait_for
    from .spec import JobSpecError
    from .submit import stage_submission

    try:
        stage, spec = stage_submission(job, set_ or [])
    except (JobSpecError, FileNotFoundError) as e:
        _fail(str(e))
    try:
        sid = submit_job(
            address,
            f"{python} -m pipeline.cli run job.yaml",
            str(stage),
            metadata={"g2face-pipe.dataset": spec.dataset.id, "g2face-pipe.job": job.name},
            env_vars={"RAY_USAGE_STATS_ENABLED": "0"},
        )
    except ConnectionError as e:
        _fail(str(e))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    typer.echo(sid)
    typer.echo(f"follow: g2face-pipe logs {sid} --address {address} --follow", err=True)
    if wait:
        st = wait_for(address, sid, timeout)
        typer.echo(f"{sid}: {st['status']}" + (f": {st['message']}" if st["message"] and st["status"] != "SUCCEEDED" else ""))
        if st["status"] not in TERMINAL_STATES:
            _fail(f"job {sid} still {st['status']} after {timeout:.0f} s", 1)
        if st["status"] != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def status(
    submission_id: str = typer.Argument(..., help="Submission id printed by `submit`."),
    address: str = typer.Option(..., "--address", help="Ray dashboard address, e.g. http://HEAD:8265."),
) -> None:
    """Status of a submitted job (and its error, when it failed)."""
    from .ray_adapter import job_status

    try:
        st = job_status(address, submission_id)
    except (ConnectionError, LookupError) as e:
        _fail(str(e))
    typer.echo(f"{submission_id}: {st['status']}")
    if st["message"]:
        typer.echo(st["message"])
    if st["status"] == "FAILED":
        raise typer.Exit(1)


@app.command()
def logs(
    submission_id: str = typer.Argument(..., help="Submission id printed by `submit`."),
    address: str = typer.Option(..., "--address", help="Ray dashboard address, e.g. http://HEAD:8265."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
) -> None:
    """Logs of a submitted job."""
    from .ray_adapter import follow_logs, job_logs

    try:
        if follow:
            follow_logs(address, submission_id, lambda text: typer.echo(text, nl=False))
        else:
            typer.echo(job_logs(address, submission_id), nl=False)
    except ConnectionError as e:
        _fail(str(e))


@app.command()
def audit(
    run_dir: str = typer.Argument(..., help="output.dir of a finished run (holds run.json)."),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="CSV key_a,key_b,same of input keys: TAR at FAR=1e-3."),
    recovery: Optional[str] = typer.Option(None, "--recovery", help="Folder of recovered shards, named like the run's."),
    out: Optional[str] = typer.Option(
        None, "--out", help="Report path (default RUN_DIR/report.html); audit.json goes beside it."
    ),
    baseline: Optional[List[str]] = typer.Option(
        None, "--baseline", help="Run dir of a baseline (e.g. blur, pixelate) on the same inputs; repeatable."
    ),
    no_examples: bool = typer.Option(
        False, "--no-examples", help="Leave out the example faces (for reports leaving the organisation)."
    ),
    inception_weights: Optional[str] = typer.Option(
        None, "--inception-weights",
        help="Inception-v3 weights for FID: pytorch-fid's pt_inception-2015-12-05-*.pth (comparable with published "
        "FIDs) or torchvision's inception_v3_google-*.pth. Without it FID is not computed.",
    ),
    fid_faces: int = typer.Option(1000, "--fid-faces", help="FID over at most this many faces per run (run order)."),
    device: str = typer.Option("auto", "--device", help="Torch device of the recognizer: auto, cpu or cuda."),
) -> None:
    """Write a self-contained HTML privacy-audit report and audit.json for a finished run."""
    from .audit import AuditError, write_audit
    from .models import WeightsError

    try:
        html_path, json_path = write_audit(
            run_dir, out, pairs=pairs, recovery=recovery, baselines=baseline or [], examples=not no_examples,
            inception_weights=inception_weights, fid_faces=fid_faces, device=device,
        )
    except (AuditError, WeightsError, FileNotFoundError, PermissionError) as e:
        _fail(str(e))
    typer.echo(f"wrote {html_path} and {json_path}")


@app.command("evaluate")
def evaluate_cmd(
    data: List[str] = typer.Option(..., "--data", help="WebDataset shards (glob or path; repeatable)."),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="CSV key_a,key_b,same of input keys: TAR at FAR=1e-3."),
    out: str = typer.Option(..., "--out", help="Where to write eval.json."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="G2Face artifact (default: the shipped one)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N samples only."),
    baselines: str = typer.Option("blur,pixelate", "--baselines", help="Comma-separated baselines ('' for none)."),
    work_dir: Optional[str] = typer.Option(None, "--work-dir", help="Keep the runs here (to audit them), not in a temp dir; an evaluation killed there resumes with the same options."),
    device: str = typer.Option("cpu", "--device", help="Torch device: cpu or cuda."),
    inception_weights: Optional[str] = typer.Option(
        None, "--inception-weights", help="Inception-v3 weights for FID (see `audit --help`); without it no FID."
    ),
    draws: Optional[int] = typer.Option(
        None, "--draws", help="anonymizer.draws of the model's run (default: the job default; 1 measures every "
        "face's first draw, the model without redraws)."
    ),
) -> None:
    """Measure a G2Face model on a corpus: every number of the model card's quality bars, as JSON."""
    from .anonymizers import AnonymizerUnavailable
    from .audit import AuditError
    from .evaluate import EvaluateError, evaluate
    from .models import WeightsError
    from .spec import JobSpecError

    try:
        doc = evaluate(
            data if len(data) > 1 else data[0], pairs, out, checkpoint=checkpoint, limit=limit,
            baselines=tuple(b for b in baselines.split(",") if b.strip()), work_dir=work_dir, device=device,
            echo=lambda m: typer.echo(m, err=True), inception_weights=inception_weights, draws=draws,
        )
    except (EvaluateError, AuditError, JobSpecError, AnonymizerUnavailable, WeightsError, FileNotFoundError,
            PermissionError) as e:
        _fail(str(e))
    typer.echo(f"wrote {out}: {doc['bars']['summary']}")


@app.command("recover")
def recover_cmd(
    shard: str = typer.Option(..., "--shard", help="Anonymized shard inside its run directory (RUN/shards/NAME)."),
    key: Path = typer.Option(..., "--key", help="Master key, or this shard's key from `keys export`."),
    out: str = typer.Option(..., "--out", help="Directory for the recovered shard and the per-face report."),
    samples: Optional[str] = typer.Option(None, "--samples", help="Comma-separated sample keys (as published) only."),
    user: Optional[str] = typer.Option(None, "--user", help="Who recovers (written to the recovery log)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (written to the recovery log)."),
    log: Optional[str] = typer.Option(None, "--log", help="Recovery log (default RUN/recovery-log.jsonl)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="The run's G2Face artifact, if moved."),
    device: str = typer.Option("auto", "--device", help="Torch device: auto, cpu or cuda."),
) -> None:
    """Recover the original faces of one shard with its key; every call is logged."""
    from .recover import RecoveryError, recover_shard

    wanted = [s.strip() for s in samples.split(",") if s.strip()] if samples else None
    try:
        res = recover_shard(shard, str(key), out, samples=wanted, user=user, reason=reason, log_path=log,
                            checkpoint=checkpoint, device=device)
    except (RecoveryError, FileNotFoundError, PermissionError) as e:
        _fail(str(e), 1)
    c = res["counts"]
    typer.echo(f"recovered {c.get('recovered', 0)} face(s) of {sum(c.values())} in {res['shard']} with key {res['key_id']}: "
               + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    typer.echo(f"wrote {res['recovered_shard']} and {res['report']}")


@keys_app.command("init")
def keys_init(out: Path = typer.Option(..., "--out", help="Where to write the new master key (mode 0600).")) -> None:
    """Create a new master key file. Keep it secret; only its key id appears in outputs."""
    from .keys import KeyFileError, create_master_key

    try:
        kid = create_master_key(out)
    except KeyFileError as e:
        _fail(str(e))
    typer.echo(f"created master key {kid} at {out} (mode 0600); set keys.master: {out} in your job")


@app.command("train")
def train_cmd(
    job: Path = typer.Argument(..., help="YAML train job (see jobs/train-lite.yaml)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output.dir from its last checkpoint."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key (YAML value)."),
) -> None:
    """Train G2Face as a Ray Train job over prepared shards (checkpoints, stats.jsonl, grids, warm start)."""
    from g2face.training import TrainingError

    from .spec import JobSpecError
    from .train import train

    try:
        train(job, set_ or [], resume=resume, echo=typer.echo)
    except (JobSpecError, TrainingError, FileNotFoundError, PermissionError) as e:
        _fail(str(e))


@app.command("prepare")
def prepare_cmd(
    job: Path = typer.Argument(..., help="YAML prepare job (see jobs/prepare-train.yaml)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key (YAML value)."),
    max_shards: Optional[int] = typer.Option(None, "--max-shards", help="Prepare at most this many pending shards."),
) -> None:
    """Detect, align, fit the 3DMM and compute the priors: aligned training shards (scratch, never in the repo)."""
    from .prepare import prepare
    from .spec import JobSpecError

    try:
        prepare(job, set_ or [], echo=typer.echo, max_shards=max_shards)
    except (JobSpecError, FileNotFoundError, PermissionError, ValueError) as e:
        _fail(str(e))


@keys_app.command("export")
def keys_export(
    master: Path = typer.Option(..., "--master", help="Master key file."),
    shard: str = typer.Option(..., "--shard", help="Output shard name, e.g. celeba-hq-000003.tar."),
    dataset: str = typer.Option(..., "--dataset", help="dataset.id of the job that wrote the shard."),
    out: Path = typer.Option(..., "--out", help="Where to write the shard key (mode 0600)."),
) -> None:
    """Export the key of one shard for an authorized user (it opens that shard only)."""
    from .keys import KeyFileError, keys_export_command

    try:
        typer.echo(keys_export_command(master, shard, dataset, out))
    except KeyFileError as e:
        _fail(str(e))


def main() -> None:
    app(prog_name="g2face-pipe")


if __name__ == "__main__":
    sys.exit(main())
