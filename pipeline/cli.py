"""The ``pseudoflow`` command line."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import click

from pipeline.config import ConfigError, PipelineConfig, load_config
from stages.ingest.folder import SourceError

if TYPE_CHECKING:
    from pipeline.runner import RunSummary


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _load(config: str, overrides: tuple[str, ...]) -> PipelineConfig:
    try:
        return load_config(config, list(overrides))
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """pseudoflow: semi-supervised segmentation with offline pseudo-labels on Ray."""
    _setup_logging(verbose)


config_option = click.option(
    "--config",
    "config",
    required=True,
    help="built-in config name (quickstart, smoke) or YAML path",
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override, e.g. student.steps=50"
)


@main.command()
@config_option
@click.option("--root", default="runs", show_default=True, help="storage root (folder or URL)")
@set_option
def run(config: str, root: str, overrides: tuple[str, ...]) -> None:
    """Run the whole pipeline and print a summary."""
    from pipeline.runner import run_pipeline

    cfg = _load(config, overrides)
    try:
        summary = run_pipeline(cfg, root)
    except SourceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(format_summary(summary))


@main.command()
@config_option
@set_option
def plan(config: str, overrides: tuple[str, ...]) -> None:
    """Print the stages a run would execute, in order, with what each reads and writes."""
    from pipeline.graph import STAGES

    cfg = _load(config, overrides)
    for stage in STAGES:
        status = "run " if stage.enabled(cfg) else "skip (disabled)"
        reads, writes = ", ".join(stage.reads), ", ".join(stage.writes)
        click.echo(f"{status:16} {stage.name:15} reads {reads:40} writes {writes}")


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


def format_summary(summary: RunSummary) -> str:
    m = summary.metrics

    def fmt(key: str) -> str:
        return f"{m[key]:.4f}" if key in m else "n/a"

    rows = [
        ("teacher mIoU (val)", fmt("evaluate.teacher_miou")),
        ("student mIoU (val)", fmt("evaluate.student_miou")),
        ("pseudo-label coverage", fmt("evaluate.pseudolabel_coverage")),
        ("pseudo-label precision", fmt("evaluate.pseudolabel_precision")),
        ("quarantined images", str(int(m.get("ingest.quarantined_images", 0)))),
        ("wall time (s)", f"{sum(summary.stage_seconds.values()):.1f}"),
        ("pipeline run", summary.run_id),
        ("MLflow run id", summary.mlflow_run_id),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"open it with: {summary.ui_command}")
    return "\n".join(lines)
