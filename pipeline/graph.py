"""The stage graph: each stage is a plain function plus the names of what it reads and writes,
wired in one explicit list. The functions here only map config to the stages' arguments."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import PipelineConfig, to_yaml
from stages import detect, evaluate, segtrain, teach, train_detector
from stages.core.storage import DatasetRef, Storage
from stages.ingest import stage as ingest
from stages.ingest.folder import SourceItem
from stages.pseudolabel import stage as pseudolabel


@dataclass
class Context:
    """What a stage function gets: config, storage, where this run writes, and shared results."""

    config: PipelineConfig
    storage: Storage
    run_id: str
    items: list[SourceItem]
    sink: Any = None
    results: dict[str, Any] = field(default_factory=dict)

    def dataset(self, name: str) -> DatasetRef:
        return DatasetRef(
            self.storage, self.storage.path("pipelines", self.run_id, "data", name), name
        )

    def model_path(self, name: str) -> str:
        return self.storage.path("pipelines", self.run_id, "models", f"{name}.pt")

    def loop_extra(self) -> dict[str, Any]:
        threads = self.config.runtime.torch_threads or os.cpu_count() or 1
        return {
            "seed": self.config.seed,
            "image_size": self.config.data.image_size,
            "torch_threads": threads,
            "sink": self.sink,
            "resolved_config": to_yaml(self.config),
        }


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    run: Callable[[Context], dict[str, float]]
    enabled: Callable[[PipelineConfig], bool] = lambda config: True


def _ingest(ctx: Context) -> dict[str, float]:
    data = ctx.config.data
    result = ingest.run(
        ctx.items,
        num_classes=data.num_classes,
        out=ctx.dataset("images"),
        quarantine=ctx.dataset("quarantine"),
        num_blocks=data.blocks,
    )
    ctx.results["quarantined_images"] = result.quarantined
    metrics = {f"images_{split}": float(n) for split, n in result.per_split.items()}
    return {
        **metrics,
        "images": float(result.rows),
        "quarantined_images": float(result.quarantined),
    }


def _train_teacher(ctx: Context) -> dict[str, float]:
    cfg, data = ctx.config.teacher, ctx.config.data
    datasets = (
        {}
        if cfg.weights
        else {"labeled": segtrain.labeled_dataset(ctx.dataset("images"), data.image_size)}
    )
    return segtrain.run_segmenter(
        cfg,
        datasets=datasets,
        num_classes=data.num_classes,
        storage=ctx.storage,
        out_path=ctx.model_path("teacher"),
        name=f"{ctx.run_id}-teacher",
        loop_extra=ctx.loop_extra(),
        use_gpu=ctx.config.runtime.use_gpu,
    )


def _train_detector(ctx: Context) -> dict[str, float]:
    cfg = ctx.config.detector
    labeled = (
        None
        if cfg.weights
        else segtrain.labeled_dataset(ctx.dataset("images"), ctx.config.data.image_size)
    )
    return train_detector.run(
        cfg,
        labeled=labeled,
        num_classes=ctx.config.data.num_classes,
        storage=ctx.storage,
        out_path=ctx.model_path("detector"),
        name=f"{ctx.run_id}-detector",
        loop_extra=ctx.loop_extra(),
        use_gpu=ctx.config.runtime.use_gpu,
    )


def _detect(ctx: Context) -> dict[str, float]:
    return detect.run(
        ctx.config.detect,
        images=ctx.dataset("images"),
        checkpoint_path=ctx.model_path("detector"),
        image_size=ctx.config.data.image_size,
        out=ctx.dataset("detections"),
    )


def _teach(ctx: Context) -> dict[str, float]:
    return teach.run(
        ctx.config.teach,
        images=ctx.dataset("images"),
        checkpoint_path=ctx.model_path("teacher"),
        image_size=ctx.config.data.image_size,
        out=ctx.dataset("teacher_signals"),
    )


def _pseudolabel(ctx: Context) -> dict[str, float]:
    detected = ctx.config.detector.enabled
    return pseudolabel.run(
        ctx.config.pseudolabel,
        signals=ctx.dataset("teacher_signals"),
        out=ctx.dataset("pseudolabels"),
        detections=ctx.dataset("detections") if detected else None,
    )


def _train_student(ctx: Context) -> dict[str, float]:
    cfg, data = ctx.config.student, ctx.config.data
    images = ctx.dataset("images")
    datasets = {
        "labeled": segtrain.labeled_dataset(images, data.image_size),
        "unlabeled": segtrain.unlabeled_dataset(
            images, ctx.dataset("pseudolabels"), data.image_size
        ),
    }
    extra = {
        **ctx.loop_extra(),
        "alpha": cfg.alpha,
        "unlabeled_batch_size": cfg.unlabeled_batch_size,
        "pseudolabel": ctx.config.pseudolabel.model_dump(),
    }
    return segtrain.run_segmenter(
        cfg,
        datasets=datasets,
        num_classes=data.num_classes,
        storage=ctx.storage,
        out_path=ctx.model_path("student"),
        name=f"{ctx.run_id}-student",
        loop_extra=extra,
        use_gpu=ctx.config.runtime.use_gpu,
    )


def _evaluate(ctx: Context) -> dict[str, float]:
    data, images = ctx.config.data, ctx.dataset("images")
    metrics: dict[str, float] = {}
    per_class: dict[str, list[float]] = {}
    results = evaluate.evaluate_models(
        ctx.config.evaluate,
        images=images,
        checkpoints={m: ctx.model_path(m) for m in ("teacher", "student")},
        num_classes=data.num_classes,
        image_size=data.image_size,
    )
    for model, result in results.items():
        metrics[f"{model}_miou"] = result["miou"]
        per_class[model] = result["iou"]
        for name, iou in zip(data.names(), result["iou"], strict=True):
            if iou == iou:  # not NaN
                metrics[f"{model}_iou.{name}"] = iou
    metrics.update(evaluate.pseudolabel_quality(images, ctx.dataset("pseudolabels")))
    ctx.results["figures"] = {"iou_per_class.png": evaluate.iou_plot(data.names(), per_class)}
    ctx.results["per_class_iou"] = per_class
    return metrics


STAGES: tuple[Stage, ...] = (
    Stage("ingest", ("source",), ("images", "quarantine"), _ingest),
    Stage("train_teacher", ("images",), ("teacher",), _train_teacher),
    Stage(
        "train_detector", ("images",), ("detector",), _train_detector, lambda c: c.detector.enabled
    ),
    Stage("detect", ("images", "detector"), ("detections",), _detect, lambda c: c.detector.enabled),
    Stage("teach", ("images", "teacher"), ("teacher_signals",), _teach),
    Stage(
        "pseudolabel",
        ("teacher_signals", "detections"),
        ("pseudolabels",),
        _pseudolabel,
    ),
    Stage("train_student", ("images", "pseudolabels"), ("student",), _train_student),
    Stage("evaluate", ("images", "teacher", "student", "pseudolabels"), ("metrics",), _evaluate),
)


def planned(config: PipelineConfig) -> list[Stage]:
    return [s for s in STAGES if s.enabled(config)]
