"""Command line: ``g2face-pipe run JOB.yaml [--dry-run] [--set key=value ...]``, ``g2face-pipe keys init``."""
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

    try:
        spec = load_spec(job, set_ or [])
        run_job(spec, dry_run=dry_run, echo=typer.echo)
    except (JobSpecError, KeyFileError, AnonymizerUnavailable, WeightsError, FileNotFoundError, PermissionError) as e:
        _fail(str(e))


@keys_app.command("init")
def keys_init(out: Path = typer.Option(..., "--out", help="Where to write the new master key (mode 0600).")) -> None:
    """Create a new master key file. Keep it secret; only its key id appears in outputs."""
    from .keys import KeyFileError, create_master_key

    try:
        kid = create_master_key(out)
    except KeyFileError as e:
        _fail(str(e))
    typer.echo(f"created master key {kid} at {out} (mode 0600); set keys.master: {out} in your job")


def main() -> None:
    app(prog_name="g2face-pipe")


if __name__ == "__main__":
    sys.exit(main())
