"""``pseudoflow submit | status | logs | stop``: runs on a Ray cluster."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from pipeline.submit.cluster import Cluster
    from pipeline.submit.submission import Submission

from pipeline.cli.base import (
    config_option,
    grid_option,
    load_or_exit,
    main,
    parallel_option,
    references_option,
    seeds_option,
    set_option,
    sweep_config,
)

address_option = click.option(
    "--address",
    envvar="RAY_API_SERVER_ADDRESS",
    required=True,
    help="the cluster's dashboard (Jobs API) URL, e.g. http://127.0.0.1:8265 through a tunnel",
)


token_option = click.option(
    "--token-file",
    default=None,
    help="file holding the cluster's Ray token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, "
    "~/.ray/auth_token)",
)


def _cluster(address: str, token_file: str | None) -> Cluster:
    from pipeline.submit.cluster import Cluster, find_token

    return Cluster(address, find_token(token_file))


@main.command()
@click.option(
    "--address",
    envvar="RAY_API_SERVER_ADDRESS",
    default=None,
    help="the cluster's dashboard (Jobs API) URL, e.g. http://127.0.0.1:8265 through a tunnel "
    "(required unless --dry-run)",
)
@token_option
@config_option
@click.option("--root", required=True, help="storage root every node sees (s3://... or absolute)")
@set_option
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow server URL")
@click.option("--env", "env_values", multiple=True, metavar="NAME=VALUE", help="plain job env")
@click.option(
    "--env-ref",
    "env_refs",
    multiple=True,
    metavar="NAME[=CLUSTER_NAME]",
    help="job env taken from the cluster nodes' own environment (for credentials)",
)
@click.option("--python", default="python", show_default=True, help="the cluster's python")
@click.option("--until", default=None, metavar="STAGE", help="stop after this stage")
@click.option(
    "--sweep",
    "as_sweep",
    is_flag=True,
    help="submit `pseudoflow sweep` of the config's sweep section (with --grid, --seeds)",
)
@grid_option
@seeds_option
@references_option
@parallel_option
@click.option("--again", is_flag=True, help="submit even if an identical run was submitted")
@click.option(
    "--dry-run",
    is_flag=True,
    help="list what would be shipped (paths, sizes) and the job; submit nothing",
)
def submit(
    address: str | None,
    token_file: str | None,
    config: str,
    root: str,
    overrides: tuple[str, ...],
    tracking_uri: str | None,
    env_values: tuple[str, ...],
    env_refs: tuple[str, ...],
    python: str,
    until: str | None,
    as_sweep: bool,
    grids: tuple[str, ...],
    seeds: int | None,
    references: bool,
    parallel: int | None,
    again: bool,
    dry_run: bool,
) -> None:
    """Submit a run to a Ray cluster (Jobs API, token auth); print its submission id.

    Ships what git tracks (outside git: the package only), never dotfiles or credential files,
    plus the resolved config; --dry-run lists it."""
    import tempfile
    from pathlib import Path

    from pipeline.redact import redact
    from pipeline.submit.checks import check_config, check_root, check_tracking_uri, parse_env
    from pipeline.submit.cluster import status_name
    from pipeline.submit.cluster import submit as submit_job
    from pipeline.submit.shipping import project_root, stage_working_dir, untracked_package_files
    from pipeline.submit.submission import build_submission

    if not address and not dry_run:
        raise click.UsageError("Missing option '--address' (or RAY_API_SERVER_ADDRESS).")
    if not as_sweep and (grids or seeds is not None or not references or parallel is not None):
        raise click.UsageError("--grid, --seeds, --parallel and --no-references go with --sweep")
    if as_sweep and until:
        raise click.UsageError("--until stops a single run; a sweep runs whole pipelines")
    if as_sweep:
        cfg = sweep_config(config, overrides, grids, seeds, references, parallel)
    else:
        cfg = load_or_exit(config, overrides)
    with _submit_errors():
        uri = check_tracking_uri(cfg.tracking.uri or tracking_uri)
        env = parse_env(env_values, env_refs)
        root = check_root(root)
        check_config(cfg)
        cluster = None if dry_run else _cluster(address or "", token_file)
        with tempfile.TemporaryDirectory(prefix="pseudoflow-submit-") as tmp:
            staged = Path(tmp) / "job"
            source = project_root()
            shipped = stage_working_dir(source, staged, cfg)
            untracked = untracked_package_files(source)
            if untracked:
                names = ", ".join(p.as_posix() for p in untracked)
                click.echo(
                    f"warning: not shipped (untracked in git; git add them): {names}", err=True
                )
            submission = build_submission(
                cfg,
                root=root,
                tracking_uri=uri,
                env=env,
                working_dir=staged,
                python=python,
                until=until,
                command="sweep" if as_sweep else "run",
            )
            if cluster is None:
                _print_dry_run(shipped, submission)
                return
            job_id, existing = submit_job(cluster, submission, again=again)
    if existing is not None:
        click.echo(
            f"an identical run was already submitted: {job_id} ({status_name(existing)}); "
            "--again submits it anew"
        )
    else:
        click.echo(f"submitted {job_id}")
    click.echo(
        f"follow it with: pseudoflow logs {job_id} --follow --address {redact(address or '')}"
    )


def _print_dry_run(shipped: list[tuple[str, int]], submission: Submission) -> None:
    from pipeline.redact import redact
    from pipeline.submit.shipping import human_size

    click.echo("dry run: nothing submitted. The job's working directory would hold:")
    for path, size in shipped:
        click.echo(f"  {human_size(size):>10}  {path}")
    total = sum(size for _, size in shipped)
    click.echo(f"{len(shipped)} files, {human_size(total)} in all")
    click.echo(f"submission id: {submission.submission_id}")
    click.echo(f"entrypoint: {redact(submission.entrypoint)}")
    for name, value in sorted(submission.runtime_env["env_vars"].items()):
        click.echo(f"env: {name}={redact(value)}")


@main.command()
@address_option
@token_option
@click.argument("job_id", required=False)
def status(address: str, token_file: str | None, job_id: str | None) -> None:
    """A job's status (or, without JOB_ID, every pseudoflow job on the cluster)."""
    from pipeline.submit.cluster import status_name
    from pipeline.submit.submission import ID_PREFIX

    with _submit_errors():
        cluster = _cluster(address, token_file)
        if job_id is None:
            jobs = [j for j in cluster.jobs() if (j.submission_id or "").startswith(ID_PREFIX)]
            for job in sorted(jobs, key=lambda j: j.start_time or 0):
                click.echo(f"{status_name(job):10} {job.submission_id}")
            return
        info = cluster.info(job_id)
    click.echo(f"{job_id}: {status_name(info)}")
    if info.message:
        click.echo(info.message)
    click.echo(f"entrypoint: {info.entrypoint}")


@main.command()
@address_option
@token_option
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="stream until the job ends; exit 1 unless it succeeds")
def logs(address: str, token_file: str | None, job_id: str, follow: bool) -> None:
    """A job's driver log."""
    from pipeline.submit.cluster import status_name

    with _submit_errors():
        cluster = _cluster(address, token_file)
        if not follow:
            click.echo(cluster.logs(job_id), nl=False)
            return
        for chunk in cluster.follow(job_id):
            click.echo(chunk, nl=False)
        final = status_name(cluster.info(job_id))
    click.echo(f"job {job_id}: {final}")
    if final != "SUCCEEDED":
        sys.exit(1)


@main.command()
@address_option
@token_option
@click.argument("job_id")
def stop(address: str, token_file: str | None, job_id: str) -> None:
    """Ask the cluster to stop a job."""
    with _submit_errors():
        stopped = _cluster(address, token_file).stop(job_id)
    click.echo(f"stopping {job_id}" if stopped else f"{job_id} had already ended")


@contextlib.contextmanager
def _submit_errors() -> Iterator[None]:
    from pipeline.submit.checks import SubmitError

    try:
        yield
    except SubmitError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
