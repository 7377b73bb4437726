"""The evaluate stage: mIoU and per-class IoU on val for each model, and pseudo-label quality
(coverage, precision, weighted and per class) against ground truth where the unlabeled images
have it."""

from __future__ import annotations

from stages.core.declaration import Declaration
from stages.core.storage import DatasetRef
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.models import evaluate_models
from stages.evaluate.quality import pseudolabel_quality

# the figures the pipeline run logs as its own (``teacher_miou``, ...)
SUMMARY = ("teacher_miou", "student_miou", "pseudolabel_coverage", "pseudolabel_precision")

# reads every round's student and pseudo-labels: the pipeline adds later rounds'
DECLARATION = Declaration(
    "evaluate",
    reads=("images", "teacher", "student", "pseudolabels"),
    writes=("metrics",),
    schema="metrics/2",
    section="evaluate",
    image_inputs=(("val", "eval"), ("unlabeled", "eval")),
    key_figures=SUMMARY,
    summary=SUMMARY,
)


def run(
    cfg: EvaluateConfig,
    *,
    images: DatasetRef,
    checkpoints: dict[str, str],
    pseudolabels: dict[str, DatasetRef],
    class_names: list[str],
    image_size: int,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The evaluate stage: each checkpoint's (label -> storage path) val mIoU and per-class IoU,
    in one pass over the val images, and each pseudo-label set's (metric prefix -> dataset)
    quality against the unlabeled images' ground truth, where there is any.

    Returns the metrics (``<label>_miou``, ``<label>_iou.<class>`` for the classes present,
    ``<prefix>_coverage``, ``<prefix>_precision``, ``<prefix>_weighted_precision``,
    ``<prefix>_recall.<class>``, ``<prefix>_precision.<class>``, ``<prefix>_images_with_truth``:
    :func:`~stages.evaluate.quality.pseudolabel_quality`) and each label's per-class IoU (NaN for
    an absent class), for the plot."""
    metrics: dict[str, float] = {}
    per_class: dict[str, list[float]] = {}
    results = evaluate_models(
        cfg,
        images=images,
        checkpoints=checkpoints,
        num_classes=len(class_names),
        image_size=image_size,
    )
    for model, result in results.items():
        metrics[f"{model}_miou"] = result["miou"]
        per_class[model] = result["iou"]
        for name, iou in zip(class_names, result["iou"], strict=True):
            if iou == iou:  # not NaN
                metrics[f"{model}_iou.{name}"] = iou
    for prefix, labels in pseudolabels.items():
        quality = pseudolabel_quality(images, labels, class_names)
        metrics |= {key.replace("pseudolabel", prefix, 1): v for key, v in quality.items()}
    return metrics, per_class
