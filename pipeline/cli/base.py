"""The command group and what its commands share: logging, loading a config, the common
options. Configs, stages and torch are imported by the commands that need them, so that the
cluster verbs (status, logs, stop) answer in a second."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig


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


def load_or_exit(config: str, overrides: tuple[str, ...]) -> PipelineConfig:
    """The config NAME or PATH with its overrides; a config error ends the command (exit 2)."""
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


def sweep_config(
    config: str,
    overrides: tuple[str, ...],
    grids: tuple[str, ...],
    seeds: int | None,
    refs: bool,
    parallel: int | None = None,
) -> PipelineConfig:
    from pipeline.config import ConfigError
    from pipeline.sweep.grid import expand, parse_grid, with_sweep

    cfg = load_or_exit(config, overrides)
    try:
        cfg = with_sweep(cfg, parse_grid(grids), seeds, refs, parallel)
        expand(cfg)  # every run's config checked before anything runs
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    return cfg


def run_and_show_sweep(cfg: PipelineConfig, root: str, json_path: str | None) -> None:
    import json

    from pipeline.redact import redact
    from pipeline.sweep.run import run_sweep
    from pipeline.sweep.table import format_table

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
