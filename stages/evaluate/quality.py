"""Pseudo-label quality against the unlabeled images' ground truth: coverage (kept / valid
pixels), precision (correct / kept), the weighted precision, and recall and precision per class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc

from stages.core import data
from stages.core.constants import IGNORE_INDEX
from stages.core.metrics import LabelCounts
from stages.core.storage import DatasetRef
from stages.core.tables import (
    DRIVER_SPLIT_BYTES,
    keep_ids,
    lookup_columns,
    numpy_batch,
    read_dataset,
)
from stages.pseudolabel.table import decode_pseudolabels


def decode_pseudolabel(
    mask: bytes, row: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's ground truth ``uint8[H, W]`` (255 = ignore), and its stored pseudo-label
    ``uint8[H, W]``, keep map ``bool[H, W]`` (restricted to the valid pixels) and training
    weight ``float32[H, W]`` from its ``pseudolabels`` row."""
    truth = data.decode_mask(mask, int(row["height"]), int(row["width"])).numpy()
    maps = decode_pseudolabels(row, ("label", "keep", "weight"))
    return truth, maps["label"], maps["keep"] & (truth != IGNORE_INDEX), maps["weight"]


COLUMNS = ["height", "width", "label", "keep", "weight", "weight_offset"]


def pseudolabel_counts(batch: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """A batch of pseudo-label rows with their ground truth -> one row of its summed
    :class:`LabelCounts` (``truth`` ``[1, C]``, ``matrix`` ``[1, C * C]``) and its image count."""
    total = LabelCounts.zero(num_classes)
    for i in range(len(batch["image_id"])):
        row = {name: batch[name][i] for name in COLUMNS}
        truth, label, keep, weight = decode_pseudolabel(batch["mask"][i], row)
        try:
            total += LabelCounts.of(label, keep, truth, num_classes=num_classes, weight=weight)
        except ValueError as error:
            raise ValueError(f"pseudo-labels of image {batch['image_id'][i]!r}: {error}") from None
    assert total.truth is not None
    assert total.matrix is not None
    return {
        "images": np.asarray([len(batch["image_id"])], np.int64),
        "valid": np.asarray([total.valid], np.int64),
        "kept": np.asarray([total.kept], np.int64),
        "correct": np.asarray([total.correct], np.int64),
        "weight": np.asarray([total.weight], np.float64),
        "weight_correct": np.asarray([total.weight_correct], np.float64),
        "truth": total.truth[None],
        "matrix": total.matrix.reshape(1, -1),
    }


def _sum_counts(rows: list[dict[str, Any]], num_classes: int) -> tuple[LabelCounts, int]:
    """:func:`pseudolabel_counts`' rows (one per batch, as Ray's ``take_all`` gives them) ->
    their total and image count."""
    total, images = LabelCounts.zero(num_classes), 0
    for row in rows:
        images += int(row["images"])
        total += LabelCounts(
            int(row["valid"]),
            int(row["kept"]),
            int(row["correct"]),
            float(row["weight"]),
            float(row["weight_correct"]),
            np.asarray(row["truth"], np.int64).reshape(num_classes),
            np.asarray(row["matrix"], np.int64).reshape(num_classes, num_classes),
        )
    return total, images


def pseudolabel_quality(
    images: DatasetRef,
    pseudolabels: DatasetRef,
    class_names: Sequence[str],
    max_images: int = 2000,
    driver_bytes: int = DRIVER_SPLIT_BYTES,
) -> dict[str, float]:
    """Coverage (kept / valid pixels), precision (correct / kept), the weighted precision (the
    share of the training weight on right labels) and, per class of ``class_names``, recall (the
    share of the class's pixels kept with the right label: ``_recall.<class>``, for the classes
    in the ground truth) and precision (``_precision.<class>``, for the labels kept) over the
    unlabeled images that have ground truth (generated data, benchmarks): at most
    ``max_images`` of them, the first by image id, a fixed sample. Their masks (small PNGs) are
    read on this process and looked up by id: no shuffle join. Pseudo-labels of at most
    ``driver_bytes`` are counted here too; larger ones by Ray tasks, the masks broadcast through
    the object store, a batch's counts summed on its task."""
    import ray

    table = images.read_table(["image_id", "split"])
    unlabeled = table.filter(pc.equal(table["split"], "unlabeled"))["image_id"].to_pylist()
    sample = set(sorted(unlabeled)[:max_images])
    if not sample:
        return {}
    masks = images.read_rows(["mask"], sample)
    truth = masks.filter(pc.is_valid(masks["mask"]))
    if truth.num_rows == 0:
        return {}
    num_classes = len(class_names)
    if pseudolabels.size_bytes() <= driver_bytes:  # on this process: no Ray task to start
        labels = pseudolabels.read_rows(COLUMNS, truth["image_id"].to_pylist())
        batch = numpy_batch(lookup_columns(labels, truth, ["mask"]))
        one = pseudolabel_counts(batch, num_classes)
        rows = [{name: values[0] for name, values in one.items()}]
    else:
        labels = read_dataset(pseudolabels, ["image_id", *COLUMNS])
        rows = (
            keep_ids(labels, set(truth["image_id"].to_pylist()))
            .map_batches(
                lookup_columns,
                fn_kwargs={"source": ray.put(truth), "names": ["mask"]},
                batch_format="pyarrow",
            )
            .map_batches(
                pseudolabel_counts, fn_kwargs={"num_classes": num_classes}, batch_format="numpy"
            )
            .take_all()
        )
    total, images_counted = _sum_counts(rows, num_classes)
    if total.valid == 0:
        return {}
    out = {
        "pseudolabel_coverage": total.coverage,
        "pseudolabel_precision": total.precision,
        "pseudolabel_weighted_precision": float(total.weighted_precision or 0.0),
        "pseudolabel_images_with_truth": float(images_counted),
    }
    for what, values in (("recall", total.class_recall()), ("precision", total.class_precision())):
        assert values is not None
        for name, value in zip(class_names, values.tolist(), strict=True):
            if value == value:  # not NaN: the class is in the ground truth / among the labels
                out[f"pseudolabel_{what}.{name}"] = float(value)
    return out
