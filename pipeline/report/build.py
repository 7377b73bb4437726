"""Building the report of a run (its data, then its figures and page) and writing it."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline import figures
from pipeline.config import PipelineConfig
from pipeline.report.page import render_html
from pipeline.report.pictures import (
    RELIABILITY,
    SAMPLES,
    overlay_samples,
    training_curves,
    val_predictions,
)
from pipeline.report.quality import MAX_IMAGES, PolicyQuality, policy_quality
from pipeline.report.runs import RunRecords, find_run, load_run
from stages.core.storage import Storage
from stages.evaluate.plot import iou_plot

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- report
@dataclass
class Report:
    run_id: str
    location: str  # where index.html and the PNGs were written (folder or URL)
    files: list[str]
    mlflow_run_id: str | None
    quality: list[PolicyQuality]


def timeline(records: RunRecords) -> list[figures.Span]:
    """Stages with known timings, positioned from the run's first stage start."""
    timed = [u for u in records.stages.values() if u.started is not None and u.seconds is not None]
    if not timed:
        return []
    first = min(u.started for u in timed if u.started is not None)
    return [
        figures.Span(u.stage, float(u.started or 0.0) - first, float(u.seconds or 0.0), u.hit)
        for u in timed
    ]


def build_report(
    storage: Storage,
    run_id: str,
    *,
    samples: int = SAMPLES,
    limit: int = MAX_IMAGES,
    tracking_uri: str | None = None,
) -> tuple[dict[str, bytes], list[PolicyQuality], RunRecords]:
    """The page and its figures (file name -> bytes) for ``run_id``; training curves are read
    from MLflow at ``tracking_uri`` (default: where the run was tracked)."""
    records = load_run(storage, run_id)
    config = records.config
    names = config.data.names()
    files: dict[str, bytes] = {}
    shown = overlay_samples(storage, records, samples)
    policy = config.pseudolabel.policy
    if shown:
        top = max(1.0, *(float(s.weight.max()) for s in shown))
        files["overlays.png"] = figures.overlay_grid(shown, RELIABILITY[policy], top, names)
    predicted = val_predictions(storage, records, samples)
    if predicted:
        files["predictions.png"] = figures.prediction_grid(predicted, names)
    quality, sweep, missing = policy_quality(storage, records, limit)
    if quality:
        points = {q.policy: (q.coverage, q.precision) for q in quality}
        files["quality.png"] = figures.quality_plot(sweep.curve(), points)
        files["weights.png"] = figures.weight_histograms(
            {q.policy: q.weight_values() for q in quality}
        )
    evaluated = records.stages.get("evaluate")
    per_class = evaluated.record.get("results", {}).get("per_class_iou") if evaluated else None
    if per_class:
        files["iou_per_class.png"] = iou_plot(config.data.names(), per_class)
    curves, notes = training_curves(records, _read_uri(storage, config, tracking_uri))
    if curves or notes:
        files["training.png"] = figures.training_curves(curves, notes)
    spans = timeline(records)
    if spans:
        files["timeline.png"] = figures.timeline_plot(spans)
    page = render_html(records, quality, missing, files, len(shown), limit, len(predicted))
    return {"index.html": page.encode(), **files}, quality, records


def write_report(
    storage: Storage,
    run: str | None = None,
    *,
    out: str | None = None,
    tracking_uri: str | None = None,
    log: bool = True,
    samples: int = SAMPLES,
    limit: int = MAX_IMAGES,
) -> Report:
    """Build the report of ``run`` (newest if ``None``), write it to ``out`` (default
    ``<root>/reports/<run id>``) and, if ``log``, add it to the run's MLflow parent run at
    ``tracking_uri`` (default: where the run was tracked; skipped with a warning when no MLflow
    run there is tagged with this run id)."""
    from pipeline.runner import tracking_uri as run_tracking_uri

    run_id = find_run(storage, run)
    content, quality, records = build_report(
        storage, run_id, samples=samples, limit=limit, tracking_uri=tracking_uri
    )
    if log and tracking_uri is None:
        tracking_uri = run_tracking_uri(
            records.config, storage.root if storage.is_local else storage.url
        )
    location = out or storage.path("reports", run_id)
    target = Storage(location) if out else storage
    target_dir = target.root if out else location
    with tempfile.TemporaryDirectory() as local:
        for name, data in content.items():
            (Path(local) / name).write_bytes(data)
        target.fs.makedirs(target_dir, exist_ok=True)
        for name in content:  # the page last: a reader never sees it without its figures
            if name != "index.html":
                target.fs.put_file(f"{local}/{name}", f"{target_dir}/{name}")
        target.fs.put_file(f"{local}/index.html", f"{target_dir}/index.html")
        mlflow_run = _log_to_mlflow(tracking_uri, records, local) if log and tracking_uri else None
    return Report(run_id, target_dir, sorted(content), mlflow_run, quality)


def _log_to_mlflow(uri: str, records: RunRecords, folder: str) -> str | None:
    from pipeline.tracking import find_pipeline_run, log_folder

    parent = find_pipeline_run(uri, records.config.tracking.experiment, records.run_id)
    if parent is None:
        logger.warning("no MLflow run at %s is tagged with run %s: not logged", uri, records.run_id)
        return None
    log_folder(uri, parent, folder, "report")
    return parent


def _read_uri(storage: Storage, config: PipelineConfig, given: str | None) -> str | None:
    """Where the run's metrics are: ``given``, else where the run was tracked; ``None`` when
    that is a SQLite file that does not exist (reading would create it)."""
    from pipeline.runner import tracking_uri as run_tracking_uri
    from stages.core.errors import SourceError

    try:
        uri = given or run_tracking_uri(config, storage.root if storage.is_local else storage.url)
    except SourceError:
        return None
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    return uri
