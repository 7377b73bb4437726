"""Box targets from ground-truth masks: the 8-connected components of each object class.

Detector class ``d`` is segmentation class ``d`` (1..C-1); 0 is the detector's background."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def boxes_from_mask(
    mask: np.ndarray, num_classes: int, min_area: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of the 8-connected components of each object class in a label map.

    mask: uint8[H, W] with values 0..C-1 (0 = background) or 255 (ignored).
    Returns boxes float32[N, 4] as (x1, y1, x2, y2) with x2, y2 exclusive (a component covering
    columns 3..5 gives x1 = 3, x2 = 6), and labels int64[N] in 1..C-1.
    """
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    structure = np.ones((3, 3), dtype=bool)
    for cls in range(1, num_classes):
        components, count = ndimage.label(mask == cls, structure=structure)
        if count == 0:
            continue
        areas = np.bincount(components.ravel(), minlength=count + 1)
        for index, region in enumerate(ndimage.find_objects(components), start=1):
            if region is not None and areas[index] >= min_area:
                rows, cols = region
                boxes.append((cols.start, rows.start, cols.stop, rows.stop))
                labels.append(cls)
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def flipped_targets(
    batch: dict[str, torch.Tensor], num_classes: int, min_area: int
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Random horizontal flip, then images in [0, 1] and box targets from the (flipped) masks."""
    images, targets = [], []
    for image, label in zip(batch["image"], batch["label"], strict=True):
        if torch.rand(()) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        boxes, labels = boxes_from_mask(label.numpy(), num_classes, min_area)
        images.append(image.float() / 255.0)
        targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)})
    return images, targets
