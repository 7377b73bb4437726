"""Running a sweep: its pipeline runs on one root (in order of their dependencies, some at once),
one MLflow parent run, and its table written after each run."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.config import PipelineConfig, to_yaml
from pipeline.graph import check_splits, split_counts
from pipeline.runner import RunSummary, resolve_root, run_pipeline, tracking_uri
from pipeline.source import source_items
from pipeline.sweep.grid import SweepRun, _show, dependencies, expand, unusable_references
from pipeline.sweep.table import RunOutcome, format_table, row_metrics, summarize, to_csv
from pipeline.tracking import Tracker, artifact_location, source_tags
from stages.core.storage import Storage
from stages.ingest.folder import SourceItem

logger = logging.getLogger(__name__)

SWEEP_TAG = "pseudoflow.sweep"
ROW_TAG = "pseudoflow.sweep_row"


# ------------------------------------------------------------------------------ the outcome
def outcome_of(run: SweepRun, summary: RunSummary, seconds: float) -> RunOutcome:
    """The run's row figures from its summary: the final student's val mIoU, the teacher's, and
    the final round's pseudo-label coverage, precision, weighted precision and per-class recall
    and precision (where it learns from them: alpha > 0)."""
    metrics, config = summary.metrics, run.config
    prefix = "pseudolabel" if config.rounds == 1 else f"pseudolabel_r{config.rounds}"
    learns = config.student.alpha > 0
    hits = sum(hit for _, hit in summary.cache.values())

    def figure(name: str) -> float | None:
        return metrics.get(f"evaluate.{prefix}_{name}") if learns else None

    def per_class(what: str) -> dict[str, float]:
        start = f"evaluate.{prefix}_{what}."
        if not learns:
            return {}
        return {k.removeprefix(start): v for k, v in metrics.items() if k.startswith(start)}

    return RunOutcome(
        run.row,
        run.reference,
        run.seed,
        summary.run_id,
        summary.mlflow_run_id,
        miou=metrics.get("evaluate.student_miou"),
        teacher_miou=metrics.get("evaluate.teacher_miou"),
        coverage=figure("coverage"),
        precision=figure("precision"),
        stages_run=len(summary.cache) - hits,
        stages_reused=hits,
        seconds=seconds,
        weighted_precision=figure("weighted_precision"),
        recall_per_class=per_class("recall"),
        precision_per_class=per_class("precision"),
    )


# ------------------------------------------------------------------------------------ running
class Sources:
    """Each distinct ``data`` section's :func:`source_items`, listed once for the whole sweep
    (a listing digests every file: at a million images on S3, minutes) and handed to its runs;
    thread-safe for parallel runs."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.listed: dict[str, tuple[list[SourceItem], str]] = {}
        self.lock = threading.Lock()

    def of(self, config: PipelineConfig) -> tuple[list[SourceItem], str]:
        key = json.dumps(config.data.model_dump(mode="json"), sort_keys=True)
        with self.lock:
            if key not in self.listed:
                self.listed[key] = source_items(config, self.storage)
            return self.listed[key]


@dataclass
class SweepResult:
    sweep_id: str
    mlflow_run_id: str
    tracking_uri: str
    folder: str  # where the table's files are, under the root
    rows: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[RunOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.error is not None]


def new_sweep_id(config: PipelineConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"sweep-{config.name}-{stamp}-{secrets.token_hex(3)}"


def sweep_params(config: PipelineConfig, runs: Sequence[SweepRun]) -> dict[str, str]:
    """The sweep run's params: its grid, seeds, references and base config."""
    sweep = config.sweep
    params = {f"grid.{key}": ",".join(map(_show, values)) for key, values in sweep.grid.items()}
    params |= {f"reference.{name}": _show(o) for name, o in sweep.references.items()}
    params |= {"seeds": str(sweep.seeds), "runs": str(len(runs)), "config": config.name}
    params["parallel"] = str(sweep.parallel)
    return params


def run_sweep(
    config: PipelineConfig,
    root: str,
    *,
    run: Callable[..., RunSummary] = run_pipeline,
) -> SweepResult:
    """Every run of ``config``'s sweep, one after the other on ``root`` (one Ray, one cache),
    nested under one MLflow parent run; the table written and logged after each run."""
    root = resolve_root(root)
    storage = Storage(root)
    storage.fs.makedirs(storage.root, exist_ok=True)
    sources = Sources(storage)
    items, _ = sources.of(config)  # a source no run can use fails here, once
    unusable = unusable_references(config, items)
    for name, why in unusable.items():
        logger.warning("sweep: reference row %r left out: %s", name, why)
    kept = [name for name in config.sweep.references if name not in unusable]
    runs = expand(config, kept)
    for item in runs:  # with its own listing where a grid axis changes data.*
        where = f"data source {item.config.data.source} (row {item.row!r})"
        check_splits(item.config, split_counts(sources.of(item.config)[0]), where)
    uri = tracking_uri(config, root)
    sweep_id = new_sweep_id(config)
    folder = storage.path("sweeps", sweep_id)
    tracker = Tracker(uri, config.tracking.experiment, artifact_location(uri, root))
    parent = tracker.start_run(sweep_id, {SWEEP_TAG: sweep_id, **source_tags("pseudoflow sweep")})
    tracker.log_params(parent, sweep_params(config, runs))
    tracker.log_text(parent, to_yaml(config), "config.yaml")
    result = SweepResult(sweep_id, parent, uri, folder)
    rows_total = len({r.row for r in runs})
    logger.info(
        "sweep %s: %d runs (%d rows x %d seeds) on %s",
        sweep_id,
        len(runs),
        rows_total,
        config.sweep.seeds,
        root,
    )
    started = time.perf_counter()
    ok = False
    try:
        if config.sweep.parallel > 1:  # the stages every run shares, before runs race for them
            first = runs[0].config
            tags = {SWEEP_TAG: sweep_id}
            run(first, root, "ingest", parent_id=parent, tags=tags, source=sources.of(first))
        context = RunContext(root, parent, sweep_id, run, sources)
        for index, outcome in enumerate(_in_order(runs, config.sweep.parallel, context), 1):
            result.outcomes.append(outcome)
            result.rows = summarize(result.outcomes, [r.row for r in runs])
            result.seconds = time.perf_counter() - started
            tracker.log_metrics(parent, {"runs_done": float(index)}, step=index)
            _write(storage, result)
        ok = not result.failed
    finally:
        result.seconds = time.perf_counter() - started
        if result.rows:
            files = _files(result)
            for name, data in files.items():
                tracker.log_bytes(parent, data, name)
            tracker.log_metrics(
                parent,
                row_metrics(result.rows)
                | {"wall_seconds": result.seconds, "failed_runs": float(len(result.failed))},
            )
        tracker.end_run(parent, ok)
    return result


@dataclass(frozen=True)
class RunContext:
    """What every run of one sweep is started with."""

    root: str
    parent: str  # the sweep's MLflow run
    sweep_id: str
    run: Callable[..., RunSummary]
    sources: Sources


def _in_order(runs: Sequence[SweepRun], parallel: int, context: RunContext) -> Iterator[RunOutcome]:
    """Each run's outcome as it ends: one after the other, or ``parallel`` at a time in threads
    (one driver, one Ray), each run started once the runs it waits for (:func:`dependencies`)
    have ended."""
    total = len(runs)
    if parallel == 1:
        for index, item in enumerate(runs, 1):
            logger.info("sweep run %d/%d: %s", index, total, item.label)
            yield _one_run(item, context)
        return
    waits, done = dependencies(runs), set[int]()
    pending = list(range(total))
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="sweep") as pool:
        active: dict[Future[RunOutcome], int] = {}
        while pending or active:
            for index in [i for i in pending if waits[i] <= done][: parallel - len(active)]:
                pending.remove(index)
                item = runs[index]
                logger.info("sweep run %d/%d: %s", total - len(pending), total, item.label)
                active[pool.submit(_one_run, item, context)] = index
            finished, _ = wait(active, return_when=FIRST_COMPLETED)
            for future in finished:
                done.add(active.pop(future))
                yield future.result()


def _one_run(item: SweepRun, context: RunContext) -> RunOutcome:
    started = time.perf_counter()
    tags = {SWEEP_TAG: context.sweep_id, ROW_TAG: item.row, "pseudoflow.seed": str(item.seed)}
    try:
        summary = context.run(
            item.config,
            context.root,
            parent_id=context.parent,
            tags=tags,
            source=context.sources.of(item.config),
        )
    except Exception as exc:  # the sweep goes on: the row counts the failure
        logger.error("sweep run %s failed: %s", item.label, exc)
        outcome = RunOutcome(item.row, item.reference, item.seed, error=str(exc) or repr(exc))
        outcome.seconds = time.perf_counter() - started
        return outcome
    outcome = outcome_of(item, summary, time.perf_counter() - started)
    miou = "n/a" if outcome.miou is None else f"{outcome.miou:.4f}"
    logger.info(
        "sweep run %s: student mIoU %s, %d stages run, %d reused",
        item.label,
        miou,
        outcome.stages_run,
        outcome.stages_reused,
    )
    return outcome


def _files(result: SweepResult) -> dict[str, bytes]:
    from pipeline.sweep.plot import sweep_plot

    document = {
        "sweep_id": result.sweep_id,
        "wall_seconds": result.seconds,
        "rows": result.rows,
        "runs": [vars(o) for o in result.outcomes],
    }
    return {
        "sweep.json": (json.dumps(document, indent=2) + "\n").encode(),
        "sweep.csv": to_csv(result.rows).encode(),
        "sweep.txt": (format_table(result.rows) + "\n").encode(),
        "sweep.png": sweep_plot(result.rows),
    }


def _write(storage: Storage, result: SweepResult) -> None:
    for name, data in _files(result).items():
        storage.write_bytes(f"{result.folder}/{name}", data)
