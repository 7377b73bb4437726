"""WPL's teacher prototypes: the teacher features that enter the queues (per image, a Ray Data
batch function) and the memory filled from the newest images."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from stages.core import codec
from stages.pseudolabel.batches import attach_detections
from stages.pseudolabel.config import (
    PseudolabelConfig,
)
from stages.pseudolabel.maps import box_masks_of, pixel_features, wpl_reliable
from stages.pseudolabel.memory import PrototypeMemory, select_confident, select_reliable
from stages.teach.table import decode_signals

logger = logging.getLogger(__name__)


PROTOTYPE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("queue", pa.string()),
        ("cls", pa.int32()),
        ("count", pa.int32()),
        ("features", pa.binary()),  # float32[count, D], in push order
    ]
)


def queue_batch(table: pa.Table, cfg: dict[str, Any], detections: Any = None) -> pa.Table:
    """Ray Data batch function: per image, the teacher features that enter WPL's queues.

    Labeled rows (carrying their ground-truth ``mask``) feed the ``labeled`` queue with pixels
    the teacher predicts correctly with conf > conf_thresh; unlabeled rows (with ``detections``
    attached) feed the ``unlabeled`` queue with reliable pixels (R = 1). Pixels enter in an order
    shuffled by a generator seeded from the image id; at most ``memory_size`` per class are kept.
    """
    policy = PseudolabelConfig.model_validate(cfg)
    if detections is not None:
        table = attach_detections(table, detections)
    rows = []
    for row in table.to_pylist():
        num_classes = int(row["num_classes"])
        signals = decode_signals(row)
        conf, label = signals["conf"][None], signals["label"][None]
        features = pixel_features(row)[None]
        if row["split"] == "labeled":
            target = torch.from_numpy(codec.decode_png(row["mask"]).astype(np.int64))[None]
            vectors, classes = select_confident(
                features, label, conf, target, policy.wpl.conf_thresh
            )
        else:
            reliable = wpl_reliable(
                policy, label, conf, box_masks_of(row, policy, num_classes)[None]
            )
            vectors, classes = select_reliable(features, label, reliable)
        generator = torch.Generator().manual_seed(int(row["image_id"][:15], 16))
        order = torch.randperm(len(classes), generator=generator)
        vectors, classes = vectors[order], classes[order]
        for c in classes.unique().tolist():
            chosen = vectors[classes == c][-policy.wpl.memory_size :]
            rows.append(
                {
                    "image_id": row["image_id"],
                    "queue": "labeled" if row["split"] == "labeled" else "unlabeled",
                    "cls": c,
                    "count": len(chosen),
                    "features": codec.to_bytes(chosen.numpy().astype(np.float32)),
                }
            )
    return pa.Table.from_pylist(rows, schema=PROTOTYPE_SCHEMA)


def detection_figures(
    detections: pa.Table, cfg: PseudolabelConfig, num_classes: int
) -> dict[str, float]:
    """What WPL can use of the ``detections`` table (columns ``labels``, ``scores``):
    ``confident_boxes_per_image``, the detections per image that ``ops.rasterize_boxes``
    draws (score >= ``wpl.score_thresh``, compared in the scores' float32 as there, and a class
    in the class map; a box covering no pixel counted too), and ``best_detection_score`` (0
    without any detection)."""
    scores = pc.list_flatten(detections["scores"])
    labels = pc.list_flatten(detections["labels"])
    if not len(scores):
        return {"confident_boxes_per_image": 0.0, "best_detection_score": 0.0}
    mapped = pa.array(sorted(cfg.class_map(num_classes)), labels.type)
    used = pc.and_(
        pc.greater_equal(scores, pa.scalar(cfg.wpl.score_thresh, scores.type)),
        pc.is_in(labels, value_set=mapped),
    )
    return {
        "confident_boxes_per_image": pc.sum(used).as_py() / detections.num_rows,
        "best_detection_score": float(pc.max(scores).as_py()),
    }


def teacher_prototypes(
    cfg: PseudolabelConfig,
    *,
    labeled: Any,
    unlabeled: Any,
    detections: Any,
    num_classes: int,
    dim: int,
) -> tuple[np.ndarray, int]:
    """WPL's offline prototypes ``float32[C, D]`` (NaN rows: no prototype) from teacher
    features, and the number of unlabeled images with a reliable pixel (R = 1).

    ``labeled``: labeled signal rows (with their masks); ``unlabeled``: unlabeled signal rows;
    ``detections``: the detections table (or a reference to it). Images are pushed in
    ``image_id`` order, so a queue holds the newest ``memory_size`` vectors of its class (FIFO).
    Only the contributions' counts come to the driver first; then only the vectors of the
    images that end up in a queue.
    """
    common = {"batch_format": "pyarrow", "batch_size": 8}
    contributions = (
        labeled.map_batches(queue_batch, fn_kwargs={"cfg": cfg.model_dump()}, **common)
        .union(
            unlabeled.map_batches(
                queue_batch,
                fn_kwargs={"cfg": cfg.model_dump(), "detections": detections},
                **common,
            )
        )
        .materialize()
    )
    counts = contributions.select_columns(["image_id", "queue", "cls", "count"]).take_all()
    wanted = newest_images(counts, cfg.wpl.memory_size)
    chosen = contributions.map_batches(
        _rows_of, fn_kwargs={"image_ids": sorted(wanted)}, batch_format="pyarrow"
    ).take_all()
    chosen.sort(key=lambda row: row["image_id"], reverse=True)
    reliable = {row["image_id"] for row in counts if row["queue"] == "unlabeled"}
    return fill_memory(chosen, cfg.wpl.memory_size, num_classes, dim), len(reliable)


def newest_images(counts: Iterable[dict[str, Any]], size: int) -> set[str]:
    """The images whose vectors a FIFO queue of ``size`` still holds after every image was pushed
    in ``image_id`` order (``counts``: rows with image_id, queue, cls, count)."""
    remaining: dict[tuple[str, int], int] = {}
    wanted = set()
    for row in sorted(counts, key=lambda r: r["image_id"], reverse=True):
        key = (row["queue"], int(row["cls"]))
        left = remaining.get(key, size)
        if left > 0 and row["count"] > 0:
            wanted.add(row["image_id"])
            remaining[key] = left - int(row["count"])
    return wanted


def _rows_of(table: pa.Table, image_ids: list[str]) -> pa.Table:
    return table.filter(pc.is_in(table["image_id"], value_set=pa.array(image_ids, pa.string())))


def fill_memory(
    newest_first: Iterable[dict[str, Any]], size: int, num_classes: int, dim: int
) -> np.ndarray:
    """Queue contributions (``PROTOTYPE_SCHEMA`` rows, newest image first) -> prototypes
    ``float32[C, D]``: each queue holds the newest ``size`` vectors of its class, as if every
    image had been pushed oldest first."""
    newest: dict[tuple[str, int], list[np.ndarray]] = {}
    for row in newest_first:
        key = (row["queue"], int(row["cls"]))
        have = sum(len(v) for v in newest.get(key, []))
        if have >= size or row["count"] == 0:
            continue
        vectors = codec.from_bytes(row["features"], np.float32, (row["count"], dim))
        newest.setdefault(key, []).append(vectors)
    memory = PrototypeMemory(num_classes, dim, size=size)
    for (queue, cls), chunks in sorted(newest.items()):
        stacked = torch.from_numpy(np.concatenate(chunks[::-1]))
        memory.push(queue, stacked, torch.full((len(stacked),), cls, dtype=torch.int64))
    prototypes = memory.refresh().numpy()
    found = int((~np.isnan(prototypes).any(axis=1)).sum())
    logger.info("wpl: teacher prototypes for %d of %d classes", found, num_classes)
    return prototypes
