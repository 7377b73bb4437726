"""The segmentation metrics, defined once: confusion counts and IoU for a model's predictions,
coverage and precision for pseudo-labels. Every stage, the report and the sweep table compute
them here."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class LabelCounts:
    """Pseudo-labels against ground truth, in pixels: ``valid`` (ground truth known), ``kept``
    (kept and valid), ``correct`` (kept, valid and the label right). Coverage is kept / valid,
    precision correct / kept."""

    valid: int = 0
    kept: int = 0
    correct: int = 0

    @classmethod
    def of(cls, label: np.ndarray, keep: np.ndarray, truth: np.ndarray) -> LabelCounts:
        """One image's counts: label int[H, W], keep bool[H, W], truth int[H, W] (255 unknown)."""
        known = truth != IGNORE_INDEX
        kept = keep & known
        return cls(int(known.sum()), int(kept.sum()), int((kept & (label == truth)).sum()))

    def __add__(self, other: LabelCounts) -> LabelCounts:
        return LabelCounts(
            self.valid + other.valid, self.kept + other.kept, self.correct + other.correct
        )

    @property
    def coverage(self) -> float:
        return self.kept / self.valid if self.valid else 0.0

    @property
    def precision(self) -> float:
        return self.correct / self.kept if self.kept else 0.0
