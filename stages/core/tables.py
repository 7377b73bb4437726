"""Ray Datasets over committed tables: only the shards a manifest lists are read."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from stages.core.storage import DatasetRef

SPLITS = ("labeled", "unlabeled", "val")


def read_dataset(ref: DatasetRef, columns: list[str] | None = None) -> Any:
    """A lazy Ray Dataset of a committed table (verified against its manifest first)."""
    import ray

    ref.verify()
    return ray.data.read_parquet(ref.files(), filesystem=ref.storage.arrow_fs(), columns=columns)


def read_split(images: DatasetRef, split: str, columns: list[str]) -> Any:
    """The ``images`` rows of one split, with only ``columns``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    dataset = read_dataset(images, [*columns, "split"])
    return dataset.filter(expr=f"split == '{split}'").select_columns(columns)


def join_on_image_id(left: Any, right: Any, num_partitions: int) -> Any:
    """Inner join of two Ray Datasets on ``image_id`` (hash shuffle; scales past one node)."""
    return left.join(right, join_type="inner", num_partitions=num_partitions, on=("image_id",))


def _non_null(table: pa.Table, column: str) -> pa.Table:
    return table.filter(pc.is_valid(table[column]))


def drop_null(dataset: Any, column: str) -> Any:
    """Rows of ``dataset`` whose ``column`` is not null."""
    return dataset.map_batches(_non_null, fn_kwargs={"column": column}, batch_format="pyarrow")
