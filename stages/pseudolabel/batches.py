"""The pseudolabel stage's batch functions on Arrow tables (Ray Data calls them): signal rows, or
for ground_truth image rows, to ``pseudolabels`` rows, batched per image size on the task's
device."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from stages.core import codec
from stages.core.inference import pick_device
from stages.core.tables import lookup_columns
from stages.pseudolabel.config import (
    PseudolabelConfig,
)
from stages.pseudolabel.maps import (
    batch_policy_maps,
    box_mask_batch,
    ground_truth_maps,
    pixel_feature_batch,
)
from stages.pseudolabel.table import PSEUDOLABELS_SCHEMA, encode_rows
from stages.teach.table import decode_signal_batch, size_groups

logger = logging.getLogger(__name__)


# Upper bound on the elements of one chunk's WPL features at pixel resolution (float32: 1 GiB),
# so a batch of large images is labelled in pieces instead of running out of memory.
FEATURE_ELEMENTS = 1 << 28


def label_batch(
    table: pa.Table,
    cfg: dict[str, Any],
    prototypes: np.ndarray | None = None,
    detections: Any = None,
    device: str = "cpu",
) -> pa.Table:
    """Ray Data batch function: signal rows -> pseudo-label rows, in input order. WPL also takes
    ``detections`` (a table, or an object-store reference to one, see
    :func:`attach_detections`).

    The rows of each image size are decoded into one batch on ``device`` (``"cuda"`` where the
    task was given a GPU; CPU where the worker has no CUDA), labelled there by
    :func:`batch_policy_maps` and quantised by :func:`encode_rows` with one copy back to the host.
    """
    policy = PseudolabelConfig.model_validate(cfg)
    if detections is not None:
        table = attach_detections(table, detections)
    target = pick_device(1.0) if device == "cuda" else torch.device("cpu")
    protos = None if prototypes is None else torch.from_numpy(np.array(prototypes)).to(target)
    rows = table.to_pylist()
    out: list[dict[str, Any]] = [{} for _ in rows]
    heights, widths = table["height"].to_numpy(), table["width"].to_numpy()
    for h, w, group in size_groups(heights, widths):
        classes = {int(rows[i]["num_classes"]) for i in group}
        if len(classes) != 1:
            raise ValueError(f"signal rows of {h}x{w} images disagree on num_classes: {classes}")
        (num_classes,) = classes
        step = len(group)
        if policy.policy == "wpl":
            step = max(1, FEATURE_ELEMENTS // (int(rows[group[0]]["feature_dim"]) * h * w))
        for start in range(0, len(group), step):
            index = group[start : start + step]
            chunk = [rows[i] for i in index]
            extras: dict[str, torch.Tensor] = {}
            if policy.policy == "wpl":
                extras = {
                    "box_masks": box_mask_batch(chunk, policy, num_classes, target),
                    "features": pixel_feature_batch(chunk, target),
                }
            signals = decode_signal_batch(chunk, target)
            maps = batch_policy_maps(policy, signals, prototypes=protos, **extras)
            encoded = encode_rows(policy, [r["image_id"] for r in chunk], maps)
            for i, row in zip(index, encoded, strict=True):
                out[i] = row
    return pa.Table.from_pylist(out, schema=PSEUDOLABELS_SCHEMA)


def ground_truth_batch(table: pa.Table, cfg: dict[str, Any]) -> pa.Table:
    """Ray Data batch function: unlabeled image rows (``image_id``, ``height``, ``width``,
    ``mask``) -> the ground_truth policy's pseudo-label rows, in input order. The masks of each
    image size are decoded into one batch, mapped by :func:`ground_truth_maps` and encoded by
    :func:`encode_rows` (the table's only encoder), at the image's own resolution."""
    policy = PseudolabelConfig.model_validate(cfg)
    rows = table.to_pylist()
    out: list[dict[str, Any]] = [{} for _ in rows]
    heights, widths = table["height"].to_numpy(), table["width"].to_numpy()
    for _, _, group in size_groups(heights, widths):
        chunk = [rows[i] for i in group]
        if any(r["mask"] is None for r in chunk):  # run() checks first; never a silent hole
            missing = next(r["image_id"] for r in chunk if r["mask"] is None)
            raise ValueError(f"the ground_truth policy: unlabeled image {missing} has no mask")
        masks = torch.from_numpy(np.stack([codec.decode_png(r["mask"]) for r in chunk]))
        encoded = encode_rows(policy, [r["image_id"] for r in chunk], ground_truth_maps(masks))
        for i, row in zip(group, encoded, strict=True):
            out[i] = row
    return pa.Table.from_pylist(out, schema=PSEUDOLABELS_SCHEMA)


def attach_detections(table: pa.Table, detections: Any) -> pa.Table:
    """Add each row's ``boxes``, ``labels`` and ``scores`` from the ``detections`` table.

    Detections are boxes only (tens of bytes per image), so they are broadcast to the tasks through
    the object store (``detections`` may be an ``ObjectRef``) and looked up by ``image_id`` with a
    vectorised index, instead of a hash join that would shuffle the much larger signal rows.
    """
    table = lookup_columns(table, detections, ["boxes", "labels", "scores"])
    if table["boxes"].null_count:  # an image without boxes has an empty list, never null
        missing = table["image_id"].filter(pc.is_null(table["boxes"])).to_pylist()
        raise ValueError(f"no detections row for images {missing[:5]}: run the detect stage again")
    return table
