"""``pseudoflow run | sweep | plan | report | predict``: pipeline runs and what they made."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from pipeline.runner import RunSummary

from pipeline.cli.base import (
    config_option,
    grid_option,
    load_or_exit,
    main,
    parallel_option,
    references_option,
    root_option,
    run_and_show_sweep,
    seeds_option,
    set_option,
    sweep_config,
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

    cfg = load_or_exit(config, overrides)
    summary = run_pipeline(cfg, root, until=until)
    click.echo(format_summary(summary))
    if report and until is None:
        _report_after_run(summary)


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
    cfg = sweep_config(config, overrides, grids, seeds, references, parallel)
    run_and_show_sweep(cfg, root, json_path)


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
        weighted = quality.weighted_precision
        click.echo(
            f"  {quality.policy:{width}}  coverage {quality.coverage:.4f}  precision "
            f"{quality.precision:.4f}"
            + ("" if weighted is None else f"  weighted {weighted:.4f}")
            + f"  ({quality.source})"
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

    cfg = load_or_exit(config, overrides)
    rows = make_plan(cfg, resolve_root(root))
    name = max([15, *(len(row.stage) for row in rows)])
    for row in rows:
        key = row.key[:12] if row.key else "-"
        click.echo(f"{row.action:6} {row.stage:{name}} {key:12}  {row.reason}")


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
