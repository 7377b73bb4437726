"""The ``pseudoflow`` command line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

# Configs, stages and torch are imported by the commands that need them, so that the cluster
# verbs (status, logs, stop) answer in a second.

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.runner import RunSummary
    from pipeline.submit import Cluster, Submission


def _setup_logging(verbose: bool) -> None:
    """One line per stage start and end, the warnings a user can act on, errors; ``verbose``:
    everything (debug lines, the Ray workers' output, MLflow's and Ray's notices)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from stages.core import progress

    progress.set_verbose(verbose)
    if not verbose:  # e.g. "Creating initial MLflow database tables": MLflow sets it at import
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    from pipeline.console import QuietNotices
    from pipeline.redact import redact_logs

    if not verbose and not isinstance(sys.stdout, QuietNotices):
        sys.stdout = QuietNotices(sys.stdout)

    redact_logs()  # URL passwords and ?token=... never reach the console as they are


def _load(config: str, overrides: tuple[str, ...]) -> PipelineConfig:
    from pipeline.config import ConfigError, load_config

    try:
        return load_config(config, list(overrides))
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)


class Commands(click.Group):
    """The command group: an error of pseudoflow's own (``stages.core.errors``) ends any command
    with one line, ``error: <message>`` (credentials masked), and its exit code; anything else
    is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from pipeline.redact import redact
        from stages.core.errors import PseudoflowError

        try:
            return super().invoke(ctx)
        except PseudoflowError as exc:
            click.echo(f"error: {redact(str(exc))}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=Commands)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="debug logging, and the Ray workers' output (each training step, Ray's own notices)",
)
def main(verbose: bool) -> None:
    """pseudoflow: semi-supervised segmentation with offline pseudo-labels on Ray."""
    _setup_logging(verbose)


config_option = click.option(
    "--config",
    "config",
    required=True,
    help="built-in config (quickstart, smoke, voc, cityscapes; the gpu overlay) or YAML path; "
    "several are layered left to right: voc,gpu",
)
root_option = click.option(
    "--root", default="runs", show_default=True, help="storage root (folder or URL)"
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override, e.g. student.steps=50"
)


@main.command()
@config_option
@root_option
@set_option
@click.option("--until", default=None, metavar="STAGE", help="stop after this stage")
@click.option(
    "--report/--no-report",
    default=True,
    show_default=True,
    help="write the HTML report of a completed run (see `pseudoflow report`)",
)
def run(
    config: str, root: str, overrides: tuple[str, ...], until: str | None, report: bool
) -> None:
    """Run the pipeline (reusing cached stages) and print a summary."""
    from pipeline.runner import run_pipeline

    cfg = _load(config, overrides)
    summary = run_pipeline(cfg, root, until=until)
    click.echo(format_summary(summary))
    if report and until is None:
        _report_after_run(summary)


grid_option = click.option(
    "--grid",
    "grids",
    multiple=True,
    metavar="KEY=V1,V2,...",
    help="an axis of the sweep (adds to or replaces the config's sweep.grid), e.g. "
    "pseudolabel.policy=threshold,s4mc; the sweep runs the cross product",
)
seeds_option = click.option(
    "--seeds",
    type=click.IntRange(1, 20),
    default=None,
    help="runs per row, seeds seed, seed+1, ... [default: the config's sweep.seeds]",
)
parallel_option = click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    default=None,
    help="pipeline runs at once, sharing one Ray [default: the config's sweep.parallel]",
)
references_option = click.option(
    "--references/--no-references",
    default=True,
    show_default=True,
    help="run the config's sweep.references rows (supervised, full) once per seed",
)


def _sweep_config(
    config: str,
    overrides: tuple[str, ...],
    grids: tuple[str, ...],
    seeds: int | None,
    refs: bool,
    parallel: int | None = None,
) -> PipelineConfig:
    from pipeline.config import ConfigError
    from pipeline.sweep import expand, parse_grid, with_sweep

    cfg = _load(config, overrides)
    try:
        cfg = with_sweep(cfg, parse_grid(grids), seeds, refs, parallel)
        expand(cfg)  # every run's config checked before anything runs
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    return cfg


@main.command()
@config_option
@root_option
@set_option
@grid_option
@seeds_option
@references_option
@parallel_option
@click.option("--json", "json_path", default=None, help="also write the table as JSON here")
def sweep(
    config: str,
    root: str,
    overrides: tuple[str, ...],
    grids: tuple[str, ...],
    seeds: int | None,
    references: bool,
    parallel: int | None,
    json_path: str | None,
) -> None:
    """Run the grid (x seeds, plus the reference rows) as pipeline runs on one root and cache,
    and print one table: val mIoU mean ± std, gap-closing g, pseudo-label coverage and
    precision. The table (JSON, CSV, plot) is logged to one MLflow run whose children are the
    pipeline runs, and written under ROOT/sweeps/."""
    cfg = _sweep_config(config, overrides, grids, seeds, references, parallel)
    _run_sweep(cfg, root, json_path)


def _run_sweep(cfg: PipelineConfig, root: str, json_path: str | None) -> None:
    import json

    from pipeline.redact import redact
    from pipeline.sweep import run_sweep
    from pipeline.sweep_table import format_table

    result = run_sweep(cfg, root)
    click.echo(format_table(result.rows))
    click.echo(f"wall time {result.seconds:.0f} s, {len(result.outcomes)} runs")
    click.echo(f"table, CSV and plot: {result.folder}/")
    click.echo(f"MLflow run {result.mlflow_run_id} ({redact(result.tracking_uri)})")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result.rows, handle, indent=2)
    if result.failed:
        for outcome in result.failed:
            click.echo(
                f"failed: {outcome.row} (seed {outcome.seed}): {redact(outcome.error or '')}",
                err=True,
            )
        sys.exit(1)


def _report_after_run(summary: RunSummary) -> None:
    """The run's report; a report that cannot be made is a warning, never a failed run."""
    from pipeline.report import write_report
    from stages.core.storage import Storage

    try:
        made = write_report(
            Storage(summary.root), summary.run_id, tracking_uri=summary.tracking_uri
        )
    except Exception as exc:  # the run itself succeeded: say why, keep its exit code
        logging.getLogger(__name__).warning("no report for %s: %s", summary.run_id, exc)
        return
    from pipeline.redact import redact

    click.echo(f"report: {redact(made.location)}/index.html")


@main.command()
@click.argument("run", required=False)
@root_option
@click.option("--out", default=None, help="folder or URL to write to [default: ROOT/reports/RUN]")
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="MLflow to log the report to [default: where the run was tracked]",
)
@click.option("--no-mlflow", is_flag=True, help="write the files only")
@click.option(
    "--samples",
    default=6,
    show_default=True,
    help="images in the overlay grid and the val predictions",
)
@click.option(
    "--max-images",
    default=200,
    show_default=True,
    help="unlabeled images with ground truth the per-policy figures use",
)
def report(
    run: str | None,
    root: str,
    out: str | None,
    tracking_uri: str | None,
    no_mlflow: bool,
    samples: int,
    max_images: int,
) -> None:
    """Write RUN's report (the newest run if omitted): a static HTML page and PNGs, also
    logged to the run's MLflow parent run."""
    from pipeline.report import write_report
    from pipeline.runner import resolve_root
    from stages.core.storage import Storage

    made = write_report(
        Storage(resolve_root(root)),
        run,
        out=out,
        tracking_uri=tracking_uri,
        log=not no_mlflow,
        samples=samples,
        limit=max_images,
    )
    click.echo(f"report: {made.location}/index.html")
    width = max((len(q.policy) for q in made.quality), default=0)
    for quality in made.quality:
        click.echo(
            f"  {quality.policy:{width}}  coverage {quality.coverage:.4f}  precision "
            f"{quality.precision:.4f}  ({quality.source})"
        )
    if made.mlflow_run_id:
        click.echo(f"logged to MLflow run {made.mlflow_run_id} (artifacts: report/)")


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--model",
    "model_ref",
    required=True,
    help="a pipeline or stage run id, an MLflow model URI (runs:/<id>/model), an MLflow model "
    "folder, or a pseudoflow .pt model file",
)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="folder to write to")
@root_option
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="MLflow that holds the run [default: sqlite:///<root>/mlflow.db]",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--no-overlay", is_flag=True, help="write the label PNGs only")
def predict(
    images: tuple[str, ...],
    model_ref: str,
    out: str,
    root: str,
    tracking_uri: str | None,
    device: str,
    batch_size: int,
    no_overlay: bool,
) -> None:
    """Label IMAGES (PNG/JPEG files or folders of them) with a trained segmenter: OUT/<stem>.png
    holds each pixel's class index, OUT/<stem>_overlay.png the picture with the class colours.
    Pictures are resized to the model's training size and the labels scaled back to each
    picture's own size, exactly as the evaluate stage scores them. An unreadable file is named
    and skipped; the exit code is then 1."""
    from pathlib import Path

    from pipeline.models import image_files, load_model, parse_device, predict_images
    from pipeline.models import write_prediction as write
    from pipeline.redact import redact
    from pipeline.runner import resolve_root
    from pipeline.tracking import local_uri

    try:
        target = parse_device(device)
        files = image_files(images)
        uri = tracking_uri or local_uri(resolve_root(root))
        model = load_model(model_ref, tracking_uri=uri, device=target)
    except (ValueError, OSError) as exc:
        click.echo(f"error: {redact(str(exc))}", err=True)
        sys.exit(2)
    except Exception as exc:  # MLflow's own errors: an unknown run or URI
        click.echo(f"error: cannot load model {model_ref!r}: {redact(str(exc))}", err=True)
        sys.exit(2)
    click.echo(
        f"model {redact(model.source)}: {model.num_classes} classes, trained at "
        f"{model.image_size} px; {len(files)} images"
    )
    skipped = 0
    with click.progressbar(length=len(files), label="predicting", file=sys.stderr) as bar:
        for result in predict_images(model, files, batch_size=batch_size, device=target):
            if isinstance(result, tuple):
                skipped += 1
                click.echo(f"skipped {result[0]}: {result[1]}", err=True)
            else:
                write(result, Path(out), overlay=not no_overlay)
            bar.update(1)
    click.echo(f"wrote {len(files) - skipped} label maps to {out}; {skipped} skipped")
    if skipped:
        sys.exit(1)


@main.command()
@config_option
@root_option
@set_option
def plan(config: str, root: str, overrides: tuple[str, ...]) -> None:
    """For each stage: reuse (cache key) or run, and why. Writes nothing."""
    from pipeline.cache.plan import plan as make_plan
    from pipeline.runner import resolve_root

    cfg = _load(config, overrides)
    rows = make_plan(cfg, resolve_root(root))
    name = max([15, *(len(row.stage) for row in rows)])
    for row in rows:
        key = row.key[:12] if row.key else "-"
        click.echo(f"{row.action:6} {row.stage:{name}} {key:12}  {row.reason}")


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
    from pipeline.submit import Cluster, find_token

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

    from pipeline import submit as jobs
    from pipeline.redact import redact

    if not address and not dry_run:
        raise click.UsageError("Missing option '--address' (or RAY_API_SERVER_ADDRESS).")
    if not as_sweep and (grids or seeds is not None or not references or parallel is not None):
        raise click.UsageError("--grid, --seeds, --parallel and --no-references go with --sweep")
    if as_sweep and until:
        raise click.UsageError("--until stops a single run; a sweep runs whole pipelines")
    if as_sweep:
        cfg = _sweep_config(config, overrides, grids, seeds, references, parallel)
    else:
        cfg = _load(config, overrides)
    with _submit_errors():
        uri = jobs.check_tracking_uri(cfg.tracking.uri or tracking_uri)
        env = jobs.parse_env(env_values, env_refs)
        root = jobs.check_root(root)
        jobs.check_config(cfg)
        cluster = None if dry_run else _cluster(address or "", token_file)
        with tempfile.TemporaryDirectory(prefix="pseudoflow-submit-") as tmp:
            staged = Path(tmp) / "job"
            source = jobs.project_root()
            shipped = jobs.stage_working_dir(source, staged, cfg)
            untracked = jobs.untracked_package_files(source)
            if untracked:
                names = ", ".join(p.as_posix() for p in untracked)
                click.echo(
                    f"warning: not shipped (untracked in git; git add them): {names}", err=True
                )
            submission = jobs.build_submission(
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
            job_id, existing = jobs.submit(cluster, submission, again=again)
    if existing is not None:
        click.echo(
            f"an identical run was already submitted: {job_id} ({jobs.status_name(existing)}); "
            "--again submits it anew"
        )
    else:
        click.echo(f"submitted {job_id}")
    click.echo(
        f"follow it with: pseudoflow logs {job_id} --follow --address {redact(address or '')}"
    )


def _print_dry_run(shipped: list[tuple[str, int]], submission: Submission) -> None:
    from pipeline.redact import redact
    from pipeline.submit import human_size

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
    from pipeline.submit import ID_PREFIX, status_name

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
    from pipeline.submit import status_name

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
    from pipeline.submit import SubmitError

    try:
        yield
    except SubmitError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@main.group("config")
def config_group() -> None:
    """Configs: a resolved config, and the reference of every key."""


@config_group.command("show")
@click.option(
    "--config",
    "name",
    default=None,
    help="built-in config name or YAML path [default: every key at its default]",
)
@set_option
@click.option(
    "--defaults",
    is_flag=True,
    help="print the reference instead: every key with its type, default and description "
    "(Markdown, as docs/config.md)",
)
def config_show(name: str | None, overrides: tuple[str, ...], defaults: bool) -> None:
    """Print the config a run would use (YAML: the named config with its --set overrides,
    validated; credentials masked), or with --defaults the reference of every key."""
    from pipeline.config import ConfigError, apply_overrides, reference_markdown, to_yaml, validate

    if defaults:
        click.echo(reference_markdown(), nl=False)
        return
    try:
        if name is None:
            config = validate(apply_overrides({}, list(overrides)))
        else:
            config = _load(name, overrides)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    click.echo(to_yaml(config), nl=False)


@main.group()
def cache() -> None:
    """The pseudo-label and model cache under a storage root."""


@cache.command("ls")
@root_option
def cache_ls(root: str) -> None:
    """List committed entries with size, age and rows (a damaged one: DAMAGED and why)."""
    from pipeline.cache.entries import entry_bytes, iter_entries
    from pipeline.cache.gc import human_age, human_bytes
    from pipeline.runner import resolve_root
    from stages.core.storage import Storage

    storage = Storage(resolve_root(root))
    entries = list(iter_entries(storage))
    sizes = [0 if e.damage else entry_bytes(storage, e.record) for e in entries]
    click.echo(f"{'stage':15} {'key':12} {'size':>10} {'age':>7}  outputs")
    for e, size_bytes in zip(entries, sizes, strict=True):
        outputs = f"DAMAGED: {e.damage}" if e.damage else ""
        outputs = outputs or ", ".join(
            f"{n} ({o['rows']} rows)" if o["kind"] == "dataset" else n
            for n, o in e.record["outputs"].items()
        )
        size, age = human_bytes(size_bytes), human_age(e.age_s)
        click.echo(f"{e.stage:15} {e.key[:12]:12} {size:>10} {age:>7}  {outputs}")
    total = human_bytes(sum(sizes))
    damaged = sum(e.damage is not None for e in entries)
    click.echo(f"{len(entries)} entries, {total}" + (f", {damaged} damaged" if damaged else ""))


@cache.command("verify")
@root_option
@click.option(
    "--repair",
    is_flag=True,
    help="uncommit what is damaged (entries' records, pool shards) so the next run recomputes it",
)
def cache_verify(root: str, repair: bool) -> None:
    """Check every entry and pool shard against its data; exit 1 if any is damaged (0 once
    ``--repair`` uncommitted them all)."""
    from pipeline.cache.entries import iter_entries
    from pipeline.cache.verify import repair as uncommit
    from pipeline.cache.verify import verify_entry, verify_pools
    from pipeline.runner import resolve_root
    from stages.core.storage import Storage

    storage = Storage(resolve_root(root))
    entries = list(iter_entries(storage))
    damaged = {}
    for entry in entries:
        problems = verify_entry(storage, entry)
        if problems:
            damaged[entry.stage, entry.key] = problems
        for problem in problems:
            click.echo(f"DAMAGED {entry.stage} {entry.key[:12]}: {problem}")
    shards = verify_pools(storage)
    for shard in shards:
        click.echo(f"DAMAGED {shard.stage} shard {shard.manifest}: {shard.problem}")
    click.echo(
        f"{len(entries)} entries checked, {len(damaged)} damaged; {len(shards)} damaged shards"
    )
    if repair:
        for item in uncommit(storage, damaged, shards):
            click.echo(f"removed {item.path} ({item.why})")
        if damaged or shards:
            click.echo("repaired: the next run recomputes what was removed")
    elif damaged or shards:
        sys.exit(1)


@cache.command("gc")
@root_option
@click.option(
    "--tracking-uri",
    default=None,
    help="read only this store [default: the store each pipeline run under the root recorded; "
    "for runs that recorded none, MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db]",
)
@click.option(
    "--min-age",
    default=24.0,
    show_default=True,
    help="hours: nothing written more recently goes (entries, leftovers)",
)
@click.option("--delete", is_flag=True, help="delete (default: only list what would go)")
@click.option(
    "--allow-empty-tracking",
    is_flag=True,
    help="collect even if a store the root's runs logged to holds no pseudoflow runs",
)
def cache_gc(
    root: str, tracking_uri: str | None, min_age: float, delete: bool, allow_empty_tracking: bool
) -> None:
    """Collect entries no MLflow run references and stale leftovers (dry run by default)."""
    from pipeline.cache.gc import TrackingError, collect_garbage, gc_references, human_bytes
    from pipeline.runner import resolve_root
    from stages.core.storage import Storage

    storage = Storage(resolve_root(root))
    try:
        referenced = gc_references(storage, tracking_uri, allow_empty=allow_empty_tracking)
    except TrackingError as exc:
        click.echo(f"error: {exc}; nothing collected", err=True)
        sys.exit(2)
    garbage = collect_garbage(storage, referenced, min_age_s=min_age * 3600, delete=delete)
    for item in garbage:
        click.echo(f"{'deleted' if delete else 'would delete'} {item.path} ({item.why})")
    verb = "freed" if delete else "would free (dry run; --delete to collect)"
    click.echo(f"{len(garbage)} items, {verb} {human_bytes(sum(g.bytes for g in garbage))}")


@main.group()
def bench() -> None:
    """Benchmarks: ratios measured side by side in one run."""


@bench.command("policies")
@click.option("--size", default=64, show_default=True, help="image side in pixels")
@click.option("--classes", default=5, show_default=True, help="number of classes")
@click.option("--images", default=20, show_default=True, help="images timed per policy")
@click.option("--json", "json_path", default=None, help="also write the rows as JSON here")
def bench_policies(size: int, classes: int, images: int, json_path: str | None) -> None:
    """Per-image cost of each pseudo-label policy's math and of its stored-row path."""
    import json

    from pipeline.bench import format_costs, policy_costs, rows_as_dicts

    costs = policy_costs(size=size, num_classes=classes, images=images)
    click.echo(format_costs(costs, size=size, num_classes=classes))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(rows_as_dicts(costs), handle, indent=2)


@bench.command("step")
@click.option("--arch", default="lraspp_mobilenet_v3_large", show_default=True)
@click.option("--size", type=click.IntRange(16), default=64, show_default=True, help="image side")
@click.option(
    "--batch", type=click.IntRange(1), default=16, show_default=True, help="images a step"
)
@click.option("--classes", type=click.IntRange(2), default=6, show_default=True, help="classes")
@click.option("--steps", type=click.IntRange(2), default=20, show_default=True)
@click.option("--json", "json_path", default=None, help="also write the result as JSON here")
def bench_step(
    arch: str, size: int, batch: int, classes: int, steps: int, json_path: str | None
) -> None:
    """A training step of the network as torchvision builds it and as pseudoflow trains it."""
    import json
    from dataclasses import asdict

    from pipeline.bench import format_step, step_cost
    from stages.core.models import check_arch

    try:
        check_arch(arch)
    except ValueError as exc:  # the message lists the valid ones
        raise click.BadParameter(str(exc), param_hint="--arch") from exc
    cost = step_cost(arch=arch, size=size, batch=batch, num_classes=classes, steps=steps)
    click.echo(format_step(cost, arch=arch, size=size, batch=batch))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(asdict(cost), handle, indent=2)


@bench.command("detectors")
@click.option("--quick", is_flag=True, help="tiny images, 2 images a call, 3 calls: checks it runs")
@click.option(
    "--backend",
    "backends",
    type=click.Choice(["torchvision", "detectron2"]),
    multiple=True,
    help="backends to time (repeatable; default both; torchvision is always the baseline)",
)
@click.option(
    "--detectron2-arch",
    "d2_archs",
    multiple=True,
    help="detectron2 model-zoo configs to time (repeatable; default: the backend's default)",
)
@click.option("--torchvision-arch", default=None, help="default: the backend's default")
@click.option("--size", type=click.IntRange(16), default=None, help="image side [64; quick 32]")
@click.option(
    "--min-size",
    type=click.IntRange(32),
    default=None,
    help="the detectors' internal size (detector.min_size) [128; quick 64]",
)
@click.option("--batch", type=click.IntRange(1), default=None, help="images a call [16; quick 2]")
@click.option("--reps", type=click.IntRange(1), default=None, help="timed calls [5; quick 3]")
@click.option(
    "--classes",
    type=click.IntRange(2, 19),
    default=4,
    show_default=True,
    help="classes, background included (every RoI scores each 1/C, above the 0.05 cut)",
)
@click.option("--json", "json_path", default=None, help="also write the rows as JSON here")
def bench_detectors(
    quick: bool,
    backends: tuple[str, ...],
    d2_archs: tuple[str, ...],
    torchvision_arch: str | None,
    size: int | None,
    min_size: int | None,
    batch: int | None,
    reps: int | None,
    classes: int,
    json_path: str | None,
) -> None:
    """Per-image cost of the detect stage's predictor with each detector backend, on the same
    synthetic images, timed alternately; ratios to torchvision's. detectron2 is skipped, with
    the reason, where it cannot be imported."""
    import json
    from dataclasses import asdict

    import torch

    from pipeline.bench import detector_costs, format_detector_costs
    from stages.core.detectors import (
        DEFAULT_ARCHITECTURES,
        BackendUnavailable,
        check_arch,
        detector_backend,
    )

    wanted = set(backends or ("torchvision", "detectron2"))
    models = [("torchvision", torchvision_arch or DEFAULT_ARCHITECTURES["torchvision"])]
    skipped = []
    if "detectron2" in wanted:
        try:
            detector_backend("detectron2")
        except BackendUnavailable as exc:
            skipped.append(f"detectron2: not timed: {exc}")
        else:
            models += [("detectron2", a) for a in d2_archs or [DEFAULT_ARCHITECTURES["detectron2"]]]
    elif d2_archs:
        raise click.UsageError("--detectron2-arch without the detectron2 backend")
    for backend, arch in models:
        try:
            check_arch(backend, arch)
        except ValueError as exc:  # the message lists the valid ones
            raise click.BadParameter(str(exc), param_hint=f"--{backend}-arch") from exc
    size = size or (32 if quick else 64)
    min_size = min_size or (64 if quick else 128)
    batch = batch or (2 if quick else 16)
    reps = reps or (3 if quick else 5)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    costs = detector_costs(
        models,
        size=size,
        batch=batch,
        min_size=min_size,
        num_classes=classes,
        reps=reps,
        device=device,
    )
    click.echo(
        format_detector_costs(
            costs,
            size=size,
            batch=batch,
            min_size=min_size,
            reps=reps,
            device=device,
            skipped=skipped,
        )
    )
    if json_path:
        with open(json_path, "w") as handle:
            json.dump([asdict(c) for c in costs], handle, indent=2)


@bench.command("throughput")
@click.option("--quick", is_flag=True, help="64² images, 2 a batch, 2 repetitions, no Ray")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="default: cuda where available, else cpu",
)
@click.option("--json", "json_path", default=None, help="also write the results as JSON here")
@click.option("--arch", default="lraspp_mobilenet_v3_large", show_default=True)
@click.option("--size", type=click.IntRange(32), default=None, help="image side [512; quick 64]")
@click.option("--classes", type=click.IntRange(2, 255), default=21, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=None, help="images a batch [8; quick 2]")
@click.option("--reps", type=click.IntRange(1), default=None, help="timed calls [5; quick 2]")
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="log to MLflow here (default: MLFLOW_TRACKING_URI; neither: not logged)",
)
def bench_throughput(
    quick: bool,
    device: str | None,
    json_path: str | None,
    arch: str,
    size: int | None,
    classes: int,
    batch: int | None,
    reps: int | None,
    tracking_uri: str | None,
) -> None:
    """The teach and detect predictors, the pseudolabel stage and the student step against the
    bare network on the same device: ratios, per-image costs and stored bytes, each against
    its goal."""
    import json

    import torch

    from pipeline.throughput import as_json, format_table, log_results, make_plan
    from pipeline.throughput import measure_throughput as measure
    from stages.core.models import check_arch

    try:
        check_arch(arch)
    except ValueError as exc:  # the message lists the valid ones
        raise click.BadParameter(str(exc), param_hint="--arch") from exc
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = make_plan(
        quick=quick, device=device, arch=arch, size=size, classes=classes, batch=batch, reps=reps
    )
    results = measure(plan)
    table = format_table(results, plan)
    click.echo(table)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(as_json(results), handle, indent=2)
    if tracking_uri:
        run_id = log_results(tracking_uri, plan, results, table)
        click.echo(f"MLflow run {run_id} in {tracking_uri} (experiment pseudoflow-bench)")


@bench.command("quality")
@click.option(
    "--config",
    "config",
    default="bench",
    show_default=True,
    help="the base config (built-in name or YAML path; layers: a,b): the named `quality` sweep "
    "is layered over it, so it runs unchanged on a VOC, Cityscapes or folder source",
)
@click.option("--quick", is_flag=True, help="a few steps of everything, 2 seeds: every row runs")
@root_option
@set_option
@seeds_option
@parallel_option
@click.option("--json", "json_path", default=None, help="also write the table as JSON here")
def bench_quality(
    config: str,
    quick: bool,
    root: str,
    overrides: tuple[str, ...],
    seeds: int | None,
    parallel: int | None,
    json_path: str | None,
) -> None:
    """Do the pseudo-labels pay? The `quality` sweep: every policy, one and two rounds, over
    seeds, with the supervised, full and oracle reference rows (`pseudoflow sweep --config
    bench,quality`): val mIoU mean ± std, gap-closing g, pseudo-label coverage and precision."""
    layers = f"{config},quality" + (",quality-quick" if quick else "")
    _run_sweep(_sweep_config(layers, overrides, (), seeds, True, parallel), root, json_path)


def format_summary(summary: RunSummary) -> str:
    m = summary.metrics
    reused = sum(hit for _, hit in summary.cache.values())

    def fmt(key: str) -> str:
        return f"{m[key]:.4f}" if key in m else "n/a"

    rows = [
        ("teacher mIoU (val)", fmt("evaluate.teacher_miou")),
        ("student mIoU (val)", fmt("evaluate.student_miou")),
        ("pseudo-label coverage", fmt("evaluate.pseudolabel_coverage")),
        ("pseudo-label precision", fmt("evaluate.pseudolabel_precision")),
        ("quarantined images", str(int(m.get("ingest.quarantined_images", 0)))),
        ("wall time (s)", f"{sum(summary.stage_seconds.values()):.1f}"),
        ("stages reused / run", f"{reused} / {len(summary.cache) - reused}"),
        ("pipeline run", summary.run_id),
        ("MLflow run id", summary.mlflow_run_id),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"open it: {summary.ui_command}")
    lines.append("")
    name = max([15, *map(len, summary.cache)])  # later rounds' names are longer
    lines.append(f"{'stage':<{name}} {'how':<10} {'seconds':>8}  key")
    for stage, (key, hit) in summary.cache.items():
        how = "cache hit" if hit else "ran"
        seconds = summary.stage_seconds.get(stage, 0.0)
        lines.append(f"{stage:<{name}} {how:<10} {seconds:>8.1f}  {key[:12]}")
    return "\n".join(lines)
