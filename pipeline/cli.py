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
def run(config: str, root: str, overrides: tuple[str, ...], until: str | None) -> None:
    """Run the pipeline (reusing cached stages) and print a summary."""
    from pipeline.runner import run_pipeline

    cfg = _load(config, overrides)
    try:
        summary = run_pipeline(cfg, root, until=until)
    except SourceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(format_summary(summary))


@main.command()
@config_option
@root_option
@set_option
def plan(config: str, root: str, overrides: tuple[str, ...]) -> None:
    """For each stage: reuse (cache key) or run, and why. Writes nothing."""
    from pipeline.cache import plan as make_plan
    from pipeline.runner import resolve_root

    cfg = _load(config, overrides)
    try:
        rows = make_plan(cfg, resolve_root(root))
    except SourceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    for row in rows:
        key = row.key[:12] if row.key else "-"
        click.echo(f"{row.action:6} {row.stage:15} {key:12}  {row.reason}")


@main.group()
def cache() -> None:
    """The pseudo-label and model cache under a storage root."""


@cache.command("ls")
@root_option
def cache_ls(root: str) -> None:
    """List committed entries with size, age and rows."""
    from pipeline.cache import entry_bytes, human_age, human_bytes, iter_entries
    from pipeline.runner import resolve_root
    from stages.core.storage import Storage

    storage = Storage(resolve_root(root))
    entries = list(iter_entries(storage))
    sizes = [entry_bytes(storage, e.record) for e in entries]
    click.echo(f"{'stage':15} {'key':12} {'size':>10} {'age':>7}  outputs")
    for e, size_bytes in zip(entries, sizes, strict=True):
        outputs = ", ".join(
            f"{n} ({o['rows']} rows)" if o["kind"] == "dataset" else n
            for n, o in e.record["outputs"].items()
        )
        size, age = human_bytes(size_bytes), human_age(e.age_s)
        click.echo(f"{e.stage:15} {e.key[:12]:12} {size:>10} {age:>7}  {outputs}")
    total = human_bytes(sum(sizes))
    click.echo(f"{len(entries)} entries, {total}")


@cache.command("verify")
@root_option
def cache_verify(root: str) -> None:
    """Check every entry's manifests against its data; exit 1 if any is damaged."""
    from pipeline.cache import iter_entries, verify_entry
    from pipeline.runner import resolve_root
    from stages.core.storage import Storage

    storage = Storage(resolve_root(root))
    bad = 0
    entries = list(iter_entries(storage))
    for entry in entries:
        problems = verify_entry(storage, entry)
        bad += bool(problems)
        for problem in problems:
            click.echo(f"DAMAGED {entry.stage} {entry.key[:12]}: {problem}")
    click.echo(f"{len(entries)} entries checked, {bad} damaged")
    if bad:
        sys.exit(1)


@cache.command("gc")
@root_option
@click.option("--tracking-uri", default=None, help="default: sqlite:///<root>/mlflow.db")
@click.option("--min-age", default=24.0, show_default=True, help="hours before leftovers go")
@click.option("--delete", is_flag=True, help="delete (default: only list what would go)")
def cache_gc(root: str, tracking_uri: str | None, min_age: float, delete: bool) -> None:
    """Collect entries no MLflow run references and stale leftovers (dry run by default)."""
    from pipeline.cache import collect_garbage, human_bytes
    from pipeline.runner import resolve_root
    from pipeline.tracking import referenced_keys
    from stages.core.storage import Storage

    root = resolve_root(root)
    if tracking_uri is None:
        if "://" in root:
            click.echo("error: a remote root needs --tracking-uri", err=True)
            sys.exit(2)
        tracking_uri = f"sqlite:///{root}/mlflow.db"
    storage = Storage(root)
    garbage = collect_garbage(
        storage, referenced_keys(tracking_uri), min_age_s=min_age * 3600, delete=delete
    )
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
    lines.append(f"open it with: {summary.ui_command}")
    return "\n".join(lines)
