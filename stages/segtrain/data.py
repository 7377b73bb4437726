"""The training sets: stored rows (labeled images and masks; unlabeled images joined with their
pseudo-labels) as fixed-size canvas arrays, in ``image_id`` order and even blocks, built through
Ray Data or, for small splits, on the driver."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stages.core import data, tables
from stages.core.storage import DatasetRef
from stages.pseudolabel.table import decode_pseudolabels


def labeled_rows_to_arrays(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data CPU step: stored labeled rows -> canvas arrays for ``iter_torch_batches``
    (``data.fit_and_pad``: aspect ratio kept, padded with ignore).

    Returns image ``uint8[B, 3, S, S]``, label ``uint8[B, S, S]``, weight ``float32[B, S, S]``
    (1 on the image, 0 on the padding) and extent ``int32[B, 2]`` (the fitted height, width).
    """
    out: dict[str, list[np.ndarray]] = {"image": [], "label": [], "weight": [], "extent": []}
    for png, mask, h, w in zip(
        batch["image"], batch["mask"], batch["height"], batch["width"], strict=True
    ):
        label = data.decode_mask(mask, int(h), int(w)).to(torch.uint8)
        weight = torch.ones((int(h), int(w)), dtype=torch.float32)
        image, maps, fitted = data.fit_and_pad(
            data.decode_image(png), {"label": label, "weight": weight}, image_size
        )
        out["image"].append(image.numpy())
        out["label"].append(maps["label"].numpy())
        out["weight"].append(maps["weight"].numpy())
        out["extent"].append(np.asarray(fitted, np.int32))
    return {k: np.stack(v) for k, v in out.items()}


def pseudolabel_rows_to_arrays(
    batch: dict[str, np.ndarray], image_size: int
) -> dict[str, np.ndarray]:
    """Ray Data CPU step: unlabeled images joined with their pseudo-labels -> canvas arrays.

    Returns image ``uint8[B, 3, S, S]``, label ``uint8[B, S, S]``, weight ``float32[B, S, S]``
    (already multiplied by keep, as ``weighted_unsup_loss`` expects), keep ``uint8[B, S, S]``,
    the policy's own maps where stored: margin and refined_margin ``float32`` (S4MC), trusted
    (CSL) and reliable (WPL) ``uint8``, and extent ``int32[B, 2]``; the padding is ignore,
    weight 0 and not kept.
    """
    out: dict[str, list[np.ndarray]] = {}
    for i in range(len(batch["image_id"])):
        maps = _stored_maps({k: v[i] for k, v in batch.items()})
        image, maps, fitted = data.fit_and_pad(
            data.decode_image(batch["image"][i]), maps, image_size
        )
        for name, value in (("image", image), *maps.items()):
            out.setdefault(name, []).append(value.numpy())
        out.setdefault("extent", []).append(np.asarray(fitted, np.int32))
    return {k: np.stack(v) for k, v in out.items()}


def _stored_maps(row: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A pseudo-label row's maps as the joint transforms take them (masks as uint8)."""
    maps = decode_pseudolabels(row)
    return {
        name: torch.from_numpy(value.astype(np.uint8) if value.dtype == bool else value)
        for name, value in maps.items()
    }


# Rows a block of the training datasets holds: every run cuts them alike (``even_blocks``).
TRAIN_BLOCK_ROWS = 16


def labeled_dataset(
    images: DatasetRef, image_size: int, driver_bytes: int = tables.DRIVER_SPLIT_BYTES
) -> Any:
    """The labeled split as fixed-size arrays, in ``image_id`` order (materialised: it is iterated
    every epoch; ordered, so a run's batches are the same whichever task finished first), in
    blocks of about ``TRAIN_BLOCK_ROWS`` rows (``even_blocks``: the sort's blocks differ run to run,
    and the loop's local shuffle with them).

    A split of at most ``driver_bytes`` (estimated) is decoded on the driver into the same rows
    and blocks (``tables.driver_blocks``); a larger one through Ray Data."""
    columns = ["image_id", "height", "width", "image", "mask"]
    ids = tables.small_split_ids(images, "labeled", driver_bytes)
    if ids is not None:
        table = images.read_rows(columns[1:], ids).sort_by("image_id")
        return tables.driver_blocks(
            table, labeled_rows_to_arrays, TRAIN_BLOCK_ROWS, image_size=image_size
        )
    with tables.ordered():
        arrays = (
            tables.read_split(images, "labeled", columns)
            .sort("image_id")
            .map_batches(
                labeled_rows_to_arrays,
                fn_kwargs={"image_size": image_size},
                batch_size=TRAIN_BLOCK_ROWS,
            )
        )
        return tables.even_blocks(arrays, TRAIN_BLOCK_ROWS)


def unlabeled_dataset(
    images: DatasetRef,
    pseudolabels: DatasetRef,
    image_size: int,
    driver_bytes: int = tables.DRIVER_SPLIT_BYTES,
) -> Any:
    """Unlabeled images joined with their pseudo-labels, as fixed-size arrays (materialised), in
    ``image_id`` order and blocks of about ``TRAIN_BLOCK_ROWS`` rows, as ``labeled_dataset``
    (on the driver too where the split and the pseudo-labels together hold at most
    ``driver_bytes``).

    Only image columns are read from ``images``: the ground truth that generated data keeps for
    unlabeled images is never seen by training (but through the ``ground_truth`` policy's
    pseudo-labels, the reference rows made from it on purpose).
    """
    columns = ["height", "width", "label", "keep", "weight", "weight_offset"]
    columns += ["margin", "refined_margin", "trusted", "reliable"]
    ids = tables.small_split_ids(images, "unlabeled", driver_bytes, pseudolabels.size_bytes())
    if ids is not None:
        labels = pseudolabels.read_rows(columns, ids)
        pixels = images.read_rows(["image"], labels["image_id"].to_pylist())
        joined = tables.lookup_inner(pixels.sort_by("image_id"), labels, columns)
        if joined.num_rows:  # none: Ray Data's path makes the empty set the loop refuses
            return tables.driver_blocks(
                joined, pseudolabel_rows_to_arrays, TRAIN_BLOCK_ROWS, image_size=image_size
            )
    with tables.ordered():
        pixels = tables.read_split(images, "unlabeled", ["image_id", "image"])
        joined = tables.join_on_image_id(pixels, pseudolabels, columns, num_partitions=4)
        arrays = joined.sort("image_id").map_batches(
            pseudolabel_rows_to_arrays,
            fn_kwargs={"image_size": image_size},
            batch_size=TRAIN_BLOCK_ROWS,
        )
        return tables.even_blocks(arrays, TRAIN_BLOCK_ROWS)
