"""What each stage does with its context: the config mapped to the stage functions' arguments,
their returns to an :class:`~pipeline.graph.model.Outcome`."""

from __future__ import annotations

import logging
import posixpath
import time
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.graph.checks import check_splits
from pipeline.graph.keys import (
    detect_family,
    stored_signals,
    teach_family,
    uses_ground_truth,
    uses_wpl,
)
from pipeline.graph.model import Context, Outcome, Round, StageResults, final_round
from pipeline.models import store_export
from stages import segtrain
from stages.core.errors import SourceError
from stages.core.inference import resolve_gpus
from stages.detect import stage as detect
from stages.evaluate import stage as evaluate
from stages.evaluate.plot import iou_plot
from stages.ingest import stage as ingest
from stages.pseudolabel import stage as pseudolabel
from stages.teach import stage as teach_stage
from stages.train_detector import stage as train_detector

logger = logging.getLogger(__name__)


def _check_bad_fraction(ctx: Context, quarantined: int, rows: int) -> None:
    """Fail the run when more than ``data.max_bad_fraction`` of the source's items were
    quarantined: a folder of mostly unreadable files is a broken source, not a dataset."""
    total = quarantined + rows
    limit = ctx.config.data.max_bad_fraction
    if total and quarantined / total > limit:
        directory = ctx.dataset("quarantine").directory
        table = directory if ctx.storage.is_local else ctx.storage.fs.unstrip_protocol(directory)
        raise SourceError(
            f"{quarantined} of {total} items ({quarantined / total:.1%}) were quarantined, more "
            f"than data.max_bad_fraction={limit}; the reasons are in the quarantine table at "
            f"{table}"
        )


def run_ingest(ctx: Context) -> Outcome:
    data = ctx.config.data
    result = ingest.run(
        ctx.items,
        num_classes=data.num_classes,
        out=ctx.dataset("images"),
        quarantine=ctx.dataset("quarantine"),
        num_blocks=data.blocks,
    )
    _check_bad_fraction(ctx, result.quarantined, result.rows)
    check_splits(ctx.config, result.per_split, "after ingest (quarantined items removed)")
    metrics = {f"images_{split}": float(n) for split, n in result.per_split.items()}
    metrics.update({f"images_{kind}": float(n) for kind, n in result.notes.items()})
    metrics |= {"images": float(result.rows), "quarantined_images": float(result.quarantined)}
    return Outcome(metrics, StageResults(digests=result.digests))


def run_train_teacher(ctx: Context) -> Outcome:
    cfg, data = ctx.config.teacher, ctx.config.data
    datasets = (
        {}
        if cfg.weights
        else {"labeled": segtrain.labeled_dataset(ctx.dataset("images"), data.image_size)}
    )
    metrics = segtrain.run(
        cfg,
        datasets=datasets,
        num_classes=data.num_classes,
        storage=ctx.storage,
        out_path=ctx.model_path("teacher"),
        name=ctx.train_name("train_teacher"),
        loop_extra=ctx.loop_extra(),
        use_gpu=ctx.config.runtime.use_gpu,
    )
    return Outcome(metrics, _export(ctx, "teacher"))


def _export(ctx: Context, name: str) -> StageResults:
    """The trained segmenter ``name`` as an MLflow model in the entry (``tracking.log_models``);
    the runner logs it with every run that uses the entry."""
    if not ctx.config.tracking.log_models:
        return StageResults()
    started = time.perf_counter()
    directory = posixpath.join(ctx.attempt, f"{name}_mlflow")
    store_export(ctx.storage, ctx.model_path(name), directory)
    logger.debug("%s exported as an MLflow model in %.1fs", name, time.perf_counter() - started)
    return StageResults(mlflow_models={name: ctx.storage.relative(directory)})


def run_train_detector(ctx: Context) -> Outcome:
    cfg = ctx.config.detector
    labeled = (
        None
        if cfg.weights
        else segtrain.labeled_dataset(ctx.dataset("images"), ctx.config.data.image_size)
    )
    metrics = train_detector.run(
        cfg,
        labeled=labeled,
        num_classes=ctx.config.data.num_classes,
        storage=ctx.storage,
        out_path=ctx.model_path("detector"),
        name=ctx.train_name("train_detector"),
        loop_extra=ctx.loop_extra(),
        use_gpu=ctx.config.runtime.use_gpu,
    )
    return Outcome(metrics)


def run_detect(ctx: Context) -> Outcome:
    metrics = detect.run(
        resolve_gpus(ctx.config.detect, ctx.config.runtime.use_gpu),
        images=ctx.dataset("images"),
        checkpoint_path=ctx.model_path("detector"),
        image_size=ctx.config.data.image_size,
        out=ctx.dataset("detections"),
        pool=ctx.pool("detect", detect_family(ctx)),
    )
    return Outcome(metrics)


def run_teach(ctx: Context, round_: Round) -> Outcome:
    metrics = teach_stage.run(
        resolve_gpus(ctx.config.teach, ctx.config.runtime.use_gpu),
        spec=stored_signals(ctx),
        images=ctx.dataset("images"),
        checkpoint_path=ctx.model_path(round_.teacher),
        image_size=ctx.config.data.image_size,
        out=ctx.dataset(round_.name("teacher_signals")),
        pool=ctx.pool("teach", teach_family(ctx, round_)),
    )
    return Outcome(metrics)


def run_pseudolabel(ctx: Context, round_: Round) -> Outcome:
    metrics = pseudolabel.run(
        ctx.config.pseudolabel,
        signals=ctx.dataset(round_.name("teacher_signals")),
        out=ctx.dataset(round_.name("pseudolabels")),
        detections=ctx.dataset("detections") if uses_wpl(ctx.config) else None,
        images=ctx.dataset("images") if uses_ground_truth(ctx.config) else None,
    )
    return Outcome(metrics)


def run_train_student(ctx: Context, round_: Round) -> Outcome:
    cfg, data = ctx.config.student, ctx.config.data
    images = ctx.dataset("images")
    datasets = {
        "labeled": segtrain.labeled_dataset(images, data.image_size),
        "unlabeled": segtrain.unlabeled_dataset(
            images, ctx.dataset(round_.name("pseudolabels")), data.image_size
        ),
    }
    extra = {
        **ctx.loop_extra(),
        "policy": ctx.config.pseudolabel,
    }
    stage = round_.name("train_student")
    metrics = segtrain.run(
        cfg,
        datasets=datasets,
        num_classes=data.num_classes,
        storage=ctx.storage,
        out_path=ctx.model_path(round_.name("student")),
        name=ctx.train_name(stage),
        loop_extra=extra,
        use_gpu=ctx.config.runtime.use_gpu,
    )
    return Outcome(metrics, _export(ctx, round_.name("student")))


def run_evaluate(ctx: Context) -> Outcome:
    data, images = ctx.config.data, ctx.dataset("images")
    last = final_round(ctx.config)
    rounds = [Round(r) for r in range(1, last.number + 1)]
    # the final student is "student"; an earlier round's is "student_r<r>" in the metrics
    names = {"teacher": "teacher", "student": last.name("student")}
    names |= {f"student_r{r.number}": r.name("student") for r in rounds[:-1]}
    # round 1's pseudo-labels keep their names: pseudolabel_coverage, ...
    labels = {
        "pseudolabel" if r.number == 1 else f"pseudolabel_r{r.number}": ctx.dataset(
            r.name("pseudolabels")
        )
        for r in rounds
    }
    metrics, per_class = evaluate.run(
        resolve_gpus(ctx.config.evaluate, ctx.config.runtime.use_gpu),
        images=images,
        checkpoints={label: ctx.model_path(name) for label, name in names.items()},
        pseudolabels=labels,
        class_names=data.names(),
        image_size=data.image_size,
    )
    return Outcome(metrics, StageResults(per_class_iou=per_class))


def evaluate_figures(config: PipelineConfig, results: dict[str, Any]) -> dict[str, bytes]:
    per_class = results.get("per_class_iou")
    if not per_class:
        return {}
    return {"iou_per_class.png": iou_plot(config.data.names(), per_class)}
