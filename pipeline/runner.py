"""Running a pipeline: checks before any work, one MLflow parent run with a nested run per stage,
and a summary at the end.

Every stage's output is a cache entry (:mod:`pipeline.cache`): a stage whose key is committed
is not run (its nested run is tagged as a cache hit with the key it reused, and its recorded
metrics are logged again); a stage that runs writes into its own attempt folder and commits the
entry at the end. Ray is started only when a stage actually runs.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.cache.commit import execute
from pipeline.cache.gc import TRACKING_FILE, tracking_record
from pipeline.cache.walk import look_up
from pipeline.config import PipelineConfig, run_params, to_yaml
from pipeline.graph import (
    Context,
    Stage,
    check_splits,
    check_weights,
    final_round,
    planned,
    random_start_warnings,
    split_counts,
)
from pipeline.models import MODEL_TAG, STUDENT_TAG
from pipeline.redact import redact
from pipeline.source import source_items
from pipeline.tracking import (
    HIT_TAG,
    KEY_TAG,
    RUN_TAG,
    STAGE_TAG,
    Tracker,
    artifact_location,
    local_uri,
    source_tags,
)
from stages.core import progress
from stages.core.errors import ConfigError
from stages.core.storage import Storage
from stages.ingest.folder import SourceItem
from stages.train_detector.config import check_detector_backend

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    mlflow_run_id: str
    tracking_uri: str
    root: str
    metrics: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_started: dict[str, float] = field(default_factory=dict)  # epoch seconds
    cache: dict[str, tuple[str, bool]] = field(default_factory=dict)  # stage -> (key, hit)
    experiment_id: str = ""

    @property
    def ui_command(self) -> str:
        """How to open the run (credentials in the URI shown as ``***``): a tracking server's
        page of the run, or for a database store the ``mlflow ui`` command that serves it."""
        uri = redact(self.tracking_uri)
        if uri.startswith(("http://", "https://")):
            return f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.mlflow_run_id}"
        return f"mlflow ui --backend-store-uri {uri}"


def resolve_root(root: str) -> str:
    """Local roots become absolute paths; URLs (s3://...) stay as they are."""
    return root if "://" in root else str(Path(root).expanduser().resolve())


def tracking_uri(config: PipelineConfig, root: str) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI`` (how a submitted job gets its server),
    else a SQLite file under a local root."""
    uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if "://" in root:
        raise ConfigError(
            f"root {root!r} is remote: set tracking.uri (or MLFLOW_TRACKING_URI) to an MLflow "
            "server URL"
        )
    return local_uri(root)


def new_run_id(config: PipelineConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{config.name}-{stamp}-{secrets.token_hex(3)}"


# One ``ray.init`` per process: a parallel sweep's runs call :func:`init_ray` from several threads
# at once (where their ingest came from the cache, nothing started Ray before them).
_RAY_INIT = threading.Lock()


def init_ray(config: PipelineConfig, uri: str) -> None:
    """Join the cluster at ``RAY_ADDRESS`` if set (``local``: always start a new local Ray), else
    Ray's default (the cluster ``ray start`` left on this machine, or a new local Ray); MLflow's
    URI reaches every worker. Thread-safe: the first caller starts Ray, the others wait for it.

    What the workers print (Ray Train's and Ray Data's chatter, each training step, Ray's C++
    errors and deprecation warnings) reaches this console only when it is verbose; otherwise it
    stays in Ray's log files. Off a terminal, Ray's worker-line prefixes carry no colour codes."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    interactive = _is_terminal()
    progress.set_interactive(interactive)
    if not interactive:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray reads it as it prints each line
    with _RAY_INIT:
        if not ray.is_initialized():
            _start_ray(config, uri, interactive)


def _start_ray(config: PipelineConfig, uri: str, interactive: bool) -> None:
    import ray

    env = {"MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": "0"}
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": progress.verbose()}
    # A submitted job's runtime env (working dir, env vars: see pipeline.submit) already reaches
    # every worker, and Ray refuses to merge a second one that names the same variables.
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        kwargs["runtime_env"] = {
            "env_vars": env,
            "worker_process_setup_hook": progress.WORKER_SETUP_HOOK,
        }
    if not address or address == "local":
        kwargs["num_cpus"] = config.runtime.ray_num_cpus or max(4, os.cpu_count() or 1)
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls
        # (without it, it warns every few seconds); it listens on loopback only.
        kwargs["include_dashboard"] = True
        kwargs["dashboard_host"] = "127.0.0.1"
    ray_worker_log = logging.getLogger("ray._private.worker")
    if _not_ray_dashboard_line not in ray_worker_log.filters:  # ours below says it, once
        ray_worker_log.addFilter(_not_ray_dashboard_line)
    if not progress.verbose():
        for name in RAY_NOTICES:
            logging.getLogger(name).setLevel(logging.ERROR)
    context = ray.init(address=address or None, **kwargs)
    if context.dashboard_url:
        host_port = context.dashboard_url.split("://")[-1]
        where = " (loopback only: reach it through an SSH tunnel)"
        loopback = host_port.rsplit(":", 1)[0] == "127.0.0.1"
        logger.info("Ray dashboard listening on http://%s%s", host_port, where if loopback else "")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = interactive
    if not interactive:  # which datasets started and ended stays in Ray Data's log file
        progress.quiet_console("ray.data")


# Ray's driver-side notices that ask nothing of a pseudoflow user, shown only when verbose: that the
# cluster uses token authentication (as it should), and that Ray Data draws no progress bars (off a
# terminal, by our choice).
RAY_NOTICES = (
    "ray._private.authentication.authentication_token_setup",
    "ray.data._internal.progress",
)


def _is_terminal() -> bool:
    import sys

    return sys.stderr.isatty()


def _not_ray_dashboard_line(record: logging.LogRecord) -> bool:
    """Drop Ray's own "View the dashboard at" line: :func:`init_ray` says where it listens."""
    return "View the dashboard at" not in str(record.msg)


def run_pipeline(
    config: PipelineConfig,
    root: str,
    until: str | None = None,
    *,
    parent_id: str | None = None,
    tags: dict[str, str] | None = None,
    source: tuple[list[SourceItem], str] | None = None,
) -> RunSummary:
    """Run every planned stage in order (up to and including ``until``, if given) under ``root``,
    reusing committed cache entries, and return the summary. ``parent_id``: the MLflow run this
    pipeline run is nested in (a sweep's), with ``tags`` added to its own run; ``source``: the
    :func:`source_items` of this config's data, where the caller has listed it already."""
    stages = planned(config)
    if until is not None:
        names = [s.name for s in stages]
        if until not in names:
            raise ConfigError(
                f"unknown stage {until!r} for --until; choose one of {', '.join(names)}"
            )
        stages = stages[: names.index(until) + 1]
    check_detector_backend(config.detector)  # before anything runs or is written
    root = resolve_root(root)
    storage = Storage(root)
    uri = tracking_uri(config, root)
    check_weights(config)
    for warning in random_start_warnings(config):
        logger.warning(warning)
    # fails here, before anything is written
    items, digest = source if source is not None else source_items(config, storage)
    check_splits(config, split_counts(items), f"data source {config.data.source}")
    storage.fs.makedirs(storage.root, exist_ok=True)
    run_id = new_run_id(config)
    storage.write_bytes(storage.path("pipelines", run_id, "config.yaml"), to_yaml(config).encode())
    tracker = Tracker(uri, config.tracking.experiment, artifact_location(uri, root))
    command = "pseudoflow sweep" if parent_id else "pseudoflow run"
    parent = tracker.start_run(
        run_id, {RUN_TAG: run_id, **source_tags(command), **(tags or {})}, parent_id=parent_id
    )
    tracker.log_params(parent, run_params(config))
    tracker.log_text(parent, to_yaml(config), "config.yaml")
    summary = RunSummary(run_id, parent, uri, root, experiment_id=tracker.experiment_id)
    ctx = Context(config, storage, run_id, items, source_digest=digest)
    ok = False
    try:
        for stage in stages:
            summary.metrics.update(_run_stage(stage, ctx, tracker, parent, summary))
        ok = True
    finally:
        tracker.log_metrics(parent, _parent_metrics(summary, stages))
        tracker.set_tags(parent, {f"{KEY_TAG}.{s}": k for s, (k, _) in summary.cache.items()})
        tracker.end_run(parent, ok)
        record = {
            s: {
                "key": k,
                "hit": hit,
                "started": summary.stage_started.get(s),
                "seconds": summary.stage_seconds.get(s),
            }
            for s, (k, hit) in summary.cache.items()
        }
        storage.write_json(storage.path("pipelines", run_id, "stages.json"), record)
    return summary


def _run_stage(
    stage: Stage, ctx: Context, tracker: Tracker, parent: str, summary: RunSummary
) -> dict[str, float]:
    _record_tracking(ctx, summary.tracking_uri)
    found = look_up(stage, ctx)
    key, record = found.key, found.record
    if found.damage is not None:  # never reused: recomputed, and the commit replaces it
        logger.warning(
            "stage %s: committed entry %s is damaged (%s)", stage.name, key[:12], found.damage
        )
    hit = record is not None
    summary.cache[stage.name] = (key, hit)
    tags = {STAGE_TAG: stage.name, KEY_TAG: key, HIT_TAG: str(hit).lower()}
    run = tracker.start_run(stage.name, tags, parent_id=parent)
    tracker.log_params(run, {**_stage_params(stage, ctx.config), "cache_key": key})
    tracker.log_text(run, to_yaml(ctx.config), "config.yaml")
    started = time.perf_counter()
    summary.stage_started[stage.name] = time.time()
    try:
        if record is None:
            logger.info("stage %s: running (key %s)", stage.name, key[:12])
            sink = tracker.sink(run)
            init_ray(ctx.config, sink.uri)
            record = execute(stage, ctx, found.entry, found.fields, sink)
        else:
            logger.info("stage %s: cache hit, reusing %s", stage.name, key[:12])
    except BaseException:
        tracker.end_run(run, ok=False)
        raise
    seconds = time.perf_counter() - started
    summary.stage_seconds[stage.name] = seconds
    metrics = {k: float(v) for k, v in record["metrics"].items()}
    for name, output in record["outputs"].items():
        if "bytes_per_pixel" in output:
            metrics[f"{name}.bytes_per_pixel"] = output["bytes_per_pixel"]
    found.adopt(ctx, record)
    results = record.get("results", {})
    tracker.log_metrics(run, {**metrics, "seconds": seconds})
    tracker.log_text(run, json.dumps(record, indent=2, sort_keys=True), "cache_entry.json")
    _log_image_inputs(tracker, run, ctx, stage)
    if stage.label_input is not None:
        _log_pseudolabel_input(tracker, run, ctx, stage.label_input)
    _log_models(tracker, run, parent, ctx, stage, record)
    for name, png in (stage.figures(ctx.config, results) if stage.figures else {}).items():
        tracker.log_bytes(run, png, f"plots/{name}")
        tracker.log_bytes(parent, png, f"plots/{name}")
    figures = key_figures(stage, tracker.latest_metrics(run))
    tracker.end_run(run, True)
    logger.info("stage %s done in %.1fs: %s", stage.name, seconds, figures)
    return {f"{stage.name}.{k}": v for k, v in metrics.items()}


def _record_tracking(ctx: Context, uri: str) -> None:
    """``pipelines/<run_id>/tracking.json``: the tracking store this run logs to (credentials
    removed), for ``cache gc``; written before the run's first stage uses or commits an entry."""
    path = ctx.storage.path("pipelines", ctx.run_id, TRACKING_FILE)
    if not ctx.storage.fs.exists(path):
        ctx.storage.write_json(path, tracking_record(uri, ctx.storage.root))


def _log_image_inputs(tracker: Tracker, run: str, ctx: Context, stage: Stage) -> None:
    """The image splits a stage read, as MLflow dataset inputs with their content digests (the
    same digests its cache key holds): the UI shows which labeled, unlabeled and val sets a
    model was trained and scored on."""
    images = ctx.outputs.get("images")
    if images is None:
        return
    source = f"{ctx.storage.url.rstrip('/')}/{images['directory']}"
    for split, context in stage.image_inputs:
        digest = str(images["digests"].get(split, "empty"))
        tracker.log_dataset(
            run,
            name=f"images-{split}",
            digest=digest,
            source=source,
            profile={"split": split, "digest": digest},
            context=context,
        )


def _log_pseudolabel_input(tracker: Tracker, run: str, ctx: Context, name: str) -> None:
    """The pseudo-label set (``pseudolabels`` or a later round's) a student run trained on."""
    output = ctx.outputs.get(name)
    if output is None:
        return
    tracker.log_dataset(
        run,
        name=f"{name}-{ctx.config.pseudolabel.policy}",
        digest=output["key"],
        source=f"{ctx.storage.url.rstrip('/')}/{output['directory']}",
        profile={"rows": output["rows"], "schema": output["schema"], "key": output["key"]},
    )


def _log_models(
    tracker: Tracker, run: str, parent: str, ctx: Context, stage: Stage, record: dict[str, Any]
) -> None:
    """The MLflow model an entry holds (``tracking.log_models``), logged as this stage run's
    ``model`` artifact (a hit logs the entry's copy: nothing runs); the final student's URI is
    also a tag of the pipeline run, so ``pseudoflow predict --model <pipeline run id>`` finds
    it."""
    if not ctx.config.tracking.log_models:
        return
    for name, directory in record.get("results", {}).get("mlflow_models", {}).items():
        uri = tracker.log_model_folder(run, ctx.storage, ctx.storage.resolve(directory))
        tracker.set_tags(run, {MODEL_TAG: uri})
        if name == final_round(ctx.config).name("student"):
            tracker.set_tags(parent, {STUDENT_TAG: uri})


def _stage_params(stage: Stage, config: PipelineConfig) -> dict[str, str]:
    """A stage run's params: the data keys, the seed and its own section's (as the pipeline
    run logs them), under the stage's name."""
    section = stage.section
    params = run_params(config)
    own = {k for k in params if k.split(".")[0] in {"data", "seed"}}
    mine = {
        f"{stage.name}.{k.split('.', 1)[1]}": v
        for k, v in params.items()
        if k.split(".")[0] == section and "." in k
    }
    return {**{k: params[k] for k in own}, **mine}


def _parent_metrics(summary: RunSummary, stages: list[Stage]) -> dict[str, float]:
    """The pipeline run's own metrics: each stage's ``summary`` figures under their own name
    (ingest's ``quarantined_images``, evaluate's ``teacher_miou``, ...) and the stages' total
    seconds."""
    metrics = {
        name: summary.metrics[f"{stage.name}.{name}"]
        for stage in stages
        for name in stage.summary
        if f"{stage.name}.{name}" in summary.metrics
    }
    metrics["total_seconds"] = sum(summary.stage_seconds.values())
    return metrics


def key_figures(stage: Stage, metrics: dict[str, float]) -> str:
    """``images_inferred=400, shards_reused=0``: the stage's ``key_figures`` that ``metrics``
    (its MLflow run's latest: a training stage's last logged step) holds, in that order; all of
    them, sorted, for a stage that declares none."""
    names = stage.key_figures or tuple(sorted(metrics))
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in names if k in metrics)
