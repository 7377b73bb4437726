"""The segmentation metrics, defined once: confusion counts and IoU for a model's predictions,
coverage and precision for pseudo-labels. Every stage, the report and the sweep table compute
them here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.core.constants import IGNORE_INDEX


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion counts ``int64[C, C]`` (rows: truth, columns: prediction); target 255 ignored."""
    valid = target != IGNORE_INDEX
    index = target[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(matrix: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class IoU = TP / (TP + FP + FN) (NaN for a class absent from truth and prediction),
    and their mean over the classes that are present."""
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return iou, float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0


def _plus(a: Any, b: Any) -> Any:
    """Sum of two optional counts: None is the empty count."""
    return b if a is None else a if b is None else a + b


@dataclass(eq=False)
class LabelCounts:
    """Pseudo-labels against ground truth, in pixels: ``valid`` (ground truth known), ``kept``
    (kept and valid), ``correct`` (kept, valid and the label right). Counted with a class count
    (:meth:`of`'s ``num_classes``), also per class: ``truth`` ``int64[C]``, the valid pixels of
    each true class, and ``matrix`` ``int64[C, C]``, the kept ones (rows: truth, columns: the
    pseudo-label). Counted with the training weight, ``weight`` and ``weight_correct``: its sums
    over the kept and over the kept and right pixels.

    Coverage is kept / valid, precision correct / kept, the weighted precision weight_correct /
    weight (what share of the weight the student trains with is on right labels: CSL's and WPL's
    weights are not all 1)."""

    valid: int = 0
    kept: int = 0
    correct: int = 0
    weight: float | None = None
    weight_correct: float | None = None
    truth: np.ndarray | None = None
    matrix: np.ndarray | None = None

    @classmethod
    def zero(cls, num_classes: int) -> LabelCounts:
        """No pixel yet, counted per class of ``num_classes`` and with weights."""
        return cls(
            weight=0.0,
            weight_correct=0.0,
            truth=np.zeros(num_classes, np.int64),
            matrix=np.zeros((num_classes, num_classes), np.int64),
        )

    @classmethod
    def of(
        cls,
        label: np.ndarray,
        keep: np.ndarray,
        truth: np.ndarray,
        *,
        num_classes: int | None = None,
        weight: np.ndarray | None = None,
    ) -> LabelCounts:
        """One image's counts: label int[H, W], keep bool[H, W], truth int[H, W] (255 unknown),
        weight float[H, W] (the training weight). Per class with ``num_classes``: a true class or
        a kept label outside ``[0, num_classes)`` is a ValueError."""
        known = truth != IGNORE_INDEX
        kept = keep & known
        right = kept & (label == truth)
        counts = cls(int(known.sum()), int(kept.sum()), int(right.sum()))
        if weight is not None:
            counts.weight = float(weight[kept].sum(dtype=np.float64))
            counts.weight_correct = float(weight[right].sum(dtype=np.float64))
        if num_classes is not None:
            true, given = truth[known].astype(np.int64), label[kept].astype(np.int64)
            for name, values in (("ground truth", true), ("kept pseudo-label", given)):
                if values.size and (values.min() < 0 or values.max() >= num_classes):
                    raise ValueError(
                        f"{name} holds class {int(values.max())}, outside the "
                        f"{num_classes} classes 0..{num_classes - 1}"
                    )
            counts.truth = np.bincount(true, minlength=num_classes)
            counts.matrix = confusion(given, truth[kept], num_classes)
        return counts

    def __add__(self, other: LabelCounts) -> LabelCounts:
        return LabelCounts(
            self.valid + other.valid,
            self.kept + other.kept,
            self.correct + other.correct,
            _plus(self.weight, other.weight),
            _plus(self.weight_correct, other.weight_correct),
            _plus(self.truth, other.truth),
            _plus(self.matrix, other.matrix),
        )

    @property
    def coverage(self) -> float:
        return self.kept / self.valid if self.valid else 0.0

    @property
    def precision(self) -> float:
        return self.correct / self.kept if self.kept else 0.0

    @property
    def weighted_precision(self) -> float | None:
        """Σ w over kept right pixels / Σ w over kept pixels (None: counted without weights)."""
        if self.weight is None or self.weight_correct is None:
            return None
        return self.weight_correct / self.weight if self.weight > 0 else 0.0

    def class_recall(self) -> np.ndarray | None:
        """Per true class, the share of its valid pixels kept with the right label ``float[C]``
        (NaN where the class has no pixel; None: counted without classes)."""
        if self.truth is None or self.matrix is None:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.truth > 0, np.diag(self.matrix) / self.truth, np.nan)

    def class_precision(self) -> np.ndarray | None:
        """Per pseudo-label class, the share of the kept pixels labelled it that are right
        ``float[C]`` (NaN where none is kept with that label; None: counted without classes)."""
        if self.matrix is None:
            return None
        labelled = self.matrix.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(labelled > 0, np.diag(self.matrix) / labelled, np.nan)
