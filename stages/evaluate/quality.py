"""Pseudo-label quality against the unlabeled images' ground truth: coverage (kept / valid
pixels) and precision (correct / kept)."""

from __future__ import annotations

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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's ground truth ``uint8[H, W]`` (255 = ignore), and its stored pseudo-label
    ``uint8[H, W]`` and keep map ``bool[H, W]`` from its ``pseudolabels`` row, the keep map
    restricted to the valid pixels."""
    truth = data.decode_mask(mask, int(row["height"]), int(row["width"])).numpy()
    maps = decode_pseudolabels(row, ("label", "keep"))
    return truth, maps["label"], maps["keep"] & (truth != IGNORE_INDEX)


def pseudolabel_counts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image: valid ground-truth pixels, kept pixels, and kept pixels whose label is right."""
    out: dict[str, list[int]] = {"valid": [], "kept": [], "correct": []}
    for i in range(len(batch["image_id"])):
        row = {name: batch[name][i] for name in ("label", "keep", "height", "width")}
        truth, label, keep = decode_pseudolabel(batch["mask"][i], row)
        counts = LabelCounts.of(label, keep, truth)
        out["valid"].append(counts.valid)
        out["kept"].append(counts.kept)
        out["correct"].append(counts.correct)
    return {k: np.asarray(v, np.int64) for k, v in out.items()}


def pseudolabel_quality(
    images: DatasetRef,
    pseudolabels: DatasetRef,
    max_images: int = 2000,
    driver_bytes: int = DRIVER_SPLIT_BYTES,
) -> dict[str, float]:
    """Coverage (kept / valid pixels) and precision (correct / kept) over the unlabeled images
    that have ground truth (generated data, benchmarks): at most ``max_images`` of them, the
    first by image id, a fixed sample. Their masks (small PNGs) are read on this process and
    looked up by id: no shuffle join. Pseudo-labels of at most ``driver_bytes`` are counted here
    too; larger ones by Ray tasks, the masks broadcast through the object store."""
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
    columns = ["height", "width", "label", "keep"]
    if pseudolabels.size_bytes() <= driver_bytes:  # on this process: no Ray task to start
        labels = pseudolabels.read_rows(columns, truth["image_id"].to_pylist())
        counts = pseudolabel_counts(numpy_batch(lookup_columns(labels, truth, ["mask"])))
    else:
        labels = read_dataset(pseudolabels, ["image_id", *columns])
        counts = (
            keep_ids(labels, set(truth["image_id"].to_pylist()))
            .map_batches(
                lookup_columns,
                fn_kwargs={"source": ray.put(truth), "names": ["mask"]},
                batch_format="pyarrow",
            )
            .map_batches(pseudolabel_counts, batch_format="numpy")
            .to_pandas()
        )
        counts = {name: counts[name].to_numpy() for name in ("valid", "kept", "correct")}
    total = LabelCounts(*(int(counts[name].sum()) for name in ("valid", "kept", "correct")))
    if total.valid == 0:
        return {}
    return {
        "pseudolabel_coverage": total.coverage,
        "pseudolabel_precision": total.precision,
        "pseudolabel_images_with_truth": float(len(counts["valid"])),
    }
