"""Running a pipeline: checks before any work, a local (or joined) Ray, one MLflow parent run
with a nested run per stage, and a summary at the end."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, flatten, to_yaml
from pipeline.graph import Context, planned
from pipeline.tracking import STAGE_TAG, Tracker
from stages.core.storage import Storage
from stages.ingest.folder import SourceError, SourceItem, enumerate_folder
from stages.ingest.generated import generate_dataset

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    mlflow_run_id: str
    tracking_uri: str
    root: str
    metrics: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"


def resolve_root(root: str) -> str:
    """Local roots become absolute paths; URLs (s3://...) stay as they are."""
    return root if "://" in root else str(Path(root).expanduser().resolve())


def tracking_uri(config: PipelineConfig, root: str) -> str:
    if config.tracking.uri:
        return config.tracking.uri
    if "://" in root:
        raise SourceError(f"root {root!r} is remote: set tracking.uri to an MLflow server URL")
    return f"sqlite:///{root}/mlflow.db"


def source_items(config: PipelineConfig, storage: Storage) -> list[SourceItem]:
    """Enumerate (and for the generated source, first write) the input images. Raises
    :class:`SourceError` before any other work when the source is unusable."""
    data = config.data
    if data.source == "folder":
        assert data.root is not None  # checked by DataConfig
        return enumerate_folder(data.root, val_fraction=data.val_fraction)
    spec = data.generated.spec(data.num_classes)
    key = hashlib.sha256(json.dumps(spec.__dict__, sort_keys=True).encode()).hexdigest()[:16]
    folder = storage.path("sources", f"generated-{key}")
    marker = f"{folder}/_COMPLETE"
    if not storage.fs.exists(marker):
        if not storage.is_local:
            raise SourceError("the generated source is written locally: use a local --root")
        generate_dataset(spec, folder)
        storage.write_json(marker, {"spec": spec.__dict__})
    return enumerate_folder(folder, val_fraction=data.val_fraction)


def new_run_id(config: PipelineConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{config.name}-{stamp}-{secrets.token_hex(3)}"


def init_ray(config: PipelineConfig, uri: str) -> None:
    """Join ``RAY_ADDRESS`` if set, else start a local Ray; MLflow's URI reaches every worker."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    env = {"MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": "0"}
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if not address:
        kwargs["num_cpus"] = config.runtime.ray_num_cpus or max(4, os.cpu_count() or 1)
        kwargs["include_dashboard"] = False
    ray.init(address=address or None, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = _is_terminal()


def _is_terminal() -> bool:
    import sys

    return sys.stderr.isatty()


def run_pipeline(config: PipelineConfig, root: str) -> RunSummary:
    """Run every planned stage in order under ``root`` and return the summary."""
    root = resolve_root(root)
    storage = Storage(root)
    uri = tracking_uri(config, root)
    items = source_items(config, storage)  # fails here, before anything is written
    storage.fs.makedirs(storage.root, exist_ok=True)
    run_id = new_run_id(config)
    storage.write_bytes(storage.path("pipelines", run_id, "config.yaml"), to_yaml(config).encode())
    artifacts = f"{root}/mlartifacts" if "://" not in root else None
    tracker = Tracker(uri, config.tracking.experiment, artifacts)
    init_ray(config, uri)
    parent = tracker.start_run(run_id, {"pseudoflow.run_id": run_id})
    tracker.log_params(parent, flatten(config))
    tracker.log_text(parent, to_yaml(config), "config.yaml")
    summary = RunSummary(run_id, parent, uri, root)
    ctx = Context(config, storage, run_id, items)
    ok = False
    try:
        for stage in planned(config):
            summary.metrics.update(_run_stage(stage, ctx, tracker, parent, summary))
        ok = True
    finally:
        tracker.log_metrics(parent, _parent_metrics(summary, ctx))
        tracker.end_run(parent, ok)
    return summary


def _run_stage(
    stage: Any, ctx: Context, tracker: Tracker, parent: str, summary: RunSummary
) -> dict:
    logger.info("stage %s: reads %s, writes %s", stage.name, stage.reads, stage.writes)
    run = tracker.start_run(stage.name, {STAGE_TAG: stage.name}, parent_id=parent)
    section = getattr(ctx.config, stage.name.removeprefix("train_"), None)
    params = {k: v for k, v in flatten(ctx.config).items() if k.split(".")[0] in {"data", "seed"}}
    if section is not None:
        params.update(
            {f"{stage.name}.{k}": str(v) for k, v in section.model_dump(mode="json").items()}
        )
    tracker.log_params(run, params)
    tracker.log_text(run, to_yaml(ctx.config), "config.yaml")
    ctx.sink = tracker.sink(run)
    started = time.perf_counter()
    try:
        metrics = stage.run(ctx)
    except BaseException:
        tracker.end_run(run, ok=False)
        raise
    seconds = time.perf_counter() - started
    summary.stage_seconds[stage.name] = seconds
    tracker.log_metrics(run, {**metrics, "seconds": seconds})
    for name, png in ctx.results.pop("figures", {}).items():
        tracker.log_bytes(run, png, f"plots/{name}")
        tracker.log_bytes(parent, png, f"plots/{name}")
    tracker.end_run(run, True)
    logger.info("stage %s done in %.1fs: %s", stage.name, seconds, _brief(metrics))
    return {f"{stage.name}.{k}": v for k, v in metrics.items()}


def _parent_metrics(summary: RunSummary, ctx: Context) -> dict[str, float]:
    keep = {
        "evaluate.teacher_miou": "teacher_miou",
        "evaluate.student_miou": "student_miou",
        "evaluate.pseudolabel_coverage": "pseudolabel_coverage",
        "evaluate.pseudolabel_precision": "pseudolabel_precision",
    }
    metrics = {short: summary.metrics[k] for k, short in keep.items() if k in summary.metrics}
    metrics["quarantined_images"] = float(ctx.results.get("quarantined_images", 0))
    metrics["total_seconds"] = sum(summary.stage_seconds.values())
    return metrics


def _brief(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:6])
