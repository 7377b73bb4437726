"""Ray Datasets over committed tables: only the shards a manifest lists are read."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from stages.core.constants import SPLITS
from stages.core.storage import DatasetRef


@contextlib.contextmanager
def ordered() -> Iterator[None]:
    """Ray Datasets created inside keep their rows in order through every operator
    (``preserve_order``), so a run's batches, and so its results, do not depend on which task
    finished first. A Dataset copies the current DataContext when it is created and its derived
    datasets share that copy: the setting stays with the datasets made here, and nothing else."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    saved = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = saved


def even_blocks(dataset: Any, rows: int) -> Any:
    """``dataset`` materialised, its rows in their order, in blocks cut where the row count
    alone says: ceil(rows in all / ``rows``) blocks of near-equal size (``repartition``
    without a shuffle splits at equal row indices), whatever blocks the operators before made.

    Those differ run to run: ``sort`` takes its range boundaries from a random sample of keys
    (``random.sample`` in Ray Data's sampling tasks), so one split sorted twice lands in
    different blocks. The rows are the same, but what consumes blocks is not: a local shuffle
    buffer draws over the rows it holds when it refills (block by block), and
    ``streaming_split`` deals whole blocks to the workers. (Ray 2.60's streaming
    ``repartition(target_num_rows_per_block=..., strict=True)`` keeps some of the sort's
    boundaries, so it is not used.)"""
    done = dataset.materialize()
    return done.repartition(max(1, math.ceil(done.count() / rows))).materialize()


def even_cuts(rows: int, blocks: int) -> list[int]:
    """Where ``even_blocks`` cuts ``rows`` rows into ``blocks`` blocks: the row index each block
    but the first starts at, as Ray Data's split repartition computes them (a running float sum
    of rows / blocks, truncated), so that blocks made on the driver are the blocks it makes."""
    cuts, position = [], 0.0
    for _ in range(blocks - 1):
        position += rows / blocks
        cuts.append(int(position))
    return cuts


# A split up to this size (its share of the stored table's bytes) is decoded or scored on the
# driver. Through Ray Data the read, sort, map and two materialisations of a few dozen rows cost
# 12 to 17 s of task scheduling on 2 cores (measured on the smoke config's 12 labeled images): a
# fixed cost the student paid twice, the teacher, the detector and evaluate once or twice each.
DRIVER_SPLIT_BYTES = 64 << 20


def small_split_ids(
    images: DatasetRef, split: str, budget: int, extra_bytes: int = 0
) -> set[str] | None:
    """The ids of one split where it is small enough for the driver: it has rows, and its
    estimated stored bytes (the table's size times the split's share of its rows) plus
    ``extra_bytes`` are at most ``budget``; else ``None``. One read of two columns."""
    table = images.read_table(["image_id", "split"])
    ids = table.filter(pc.equal(table["split"], split))["image_id"]
    if len(ids) == 0:
        return None
    estimate = images.size_bytes() * len(ids) // table.num_rows
    return set(ids.to_pylist()) if estimate + extra_bytes <= budget else None


def numpy_batch(table: pa.Table) -> dict[str, Any]:
    """``table`` as the numpy batch Ray Data's ``map_batches`` hands a function."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(table).to_batch_format("numpy")


def driver_blocks(
    table: pa.Table, to_arrays: Callable[..., dict[str, Any]], rows: int, **kwargs: Any
) -> Any:
    """A materialised Ray Dataset of ``to_arrays`` (a numpy batch function, applied on this
    process) over ``table``'s rows in their order, in the blocks ``even_blocks`` would cut:
    what ``even_blocks(dataset.map_batches(to_arrays), rows)`` gives for a small table, without a
    Ray task. ``table`` must hold at least one row."""
    import ray
    from ray.data.block import BlockAccessor

    count = table.num_rows
    bounds = [0, *even_cuts(count, max(1, math.ceil(count / rows))), count]
    blocks = []
    for start, end in itertools.pairwise(bounds):
        batch = numpy_batch(table.slice(start, end - start))
        blocks.append(BlockAccessor.batch_to_block(to_arrays(batch, **kwargs)))
    return ray.data.from_blocks(blocks)


def read_dataset(ref: DatasetRef, columns: list[str] | None = None) -> Any:
    """A lazy Ray Dataset of a committed table (verified against its manifest first)."""
    import ray

    ref.verify()
    return ray.data.read_parquet(ref.files(), filesystem=ref.storage.arrow_fs(), columns=columns)


def read_split(images: DatasetRef, split: str | tuple[str, ...], columns: list[str]) -> Any:
    """The rows of ``images`` (or any table with a ``split`` column) in one split or several,
    with only ``columns``."""
    wanted = (split,) if isinstance(split, str) else split
    for name in wanted:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
    dataset = read_dataset(images, list(dict.fromkeys([*columns, "split"])))
    if len(wanted) == 1:
        return dataset.filter(expr=f"split == '{wanted[0]}'").select_columns(columns)
    return dataset.map_batches(
        _in_splits, fn_kwargs={"splits": list(wanted)}, batch_format="pyarrow"
    ).select_columns(columns)


def _in_splits(table: pa.Table, splits: list[str]) -> pa.Table:
    return table.filter(pc.is_in(table["split"], value_set=pa.array(splits)))


def split_ids(images: DatasetRef, split: str | tuple[str, ...]) -> set[str]:
    """The image ids of one split or several (read on the driver: ids only)."""
    wanted = (split,) if isinstance(split, str) else split
    table = images.read_table(["image_id", "split"])
    chosen = table.filter(pc.is_in(table["split"], value_set=pa.array(list(wanted))))
    return set(chosen["image_id"].to_pylist())


def _with_ids(table: pa.Table, ids: Any) -> pa.Table:
    if not isinstance(ids, pa.Array):
        import ray

        ids = ray.get(ids)
    return table.filter(pc.is_in(table["image_id"], value_set=ids))


def lookup_columns(table: pa.Table, source: Any, names: list[str]) -> pa.Table:
    """Append ``names`` from ``source`` (a small table keyed by ``image_id``, or the ``ObjectRef``
    it was broadcast as) to each row of ``table``; rows without a match get nulls."""
    if not isinstance(source, pa.Table):
        import ray

        source = ray.get(source)
    position = pc.index_in(table["image_id"], value_set=source["image_id"])
    for name in names:
        table = table.append_column(name, source[name].take(position))
    return table


def keep_ids(dataset: Any, ids: set[str]) -> Any:
    """Rows of ``dataset`` whose ``image_id`` is in ``ids`` (broadcast once via the object
    store)."""
    import ray

    value_set = ray.put(pa.array(sorted(ids), pa.string()))
    return dataset.map_batches(_with_ids, fn_kwargs={"ids": value_set}, batch_format="pyarrow")


# A table up to this size is joined by broadcast (Spark's autoBroadcastJoinThreshold idea):
# one copy in the object store beats a hash shuffle's aggregator actors on small data.
BROADCAST_JOIN_BYTES = 64 << 20


def join_on_image_id(
    large: Any,
    small: DatasetRef,
    columns: list[str],
    num_partitions: int,
    broadcast_bytes: int = BROADCAST_JOIN_BYTES,
) -> Any:
    """Inner join of a Ray Dataset with ``columns`` of a committed table on ``image_id``.

    When ``small``'s shards total at most ``broadcast_bytes`` it is read once on the driver,
    put in the object store and looked up per batch of ``large``; otherwise both sides go through
    Ray Data's hash-shuffle join (scales past one node).
    """
    import ray

    names = list(dict.fromkeys(["image_id", *columns]))
    if small.size_bytes() > broadcast_bytes:
        right = read_dataset(small, names)
        return right.join(large, join_type="inner", num_partitions=num_partitions, on=("image_id",))
    table = small.read_table(names)
    added = [name for name in names if name != "image_id"]
    return large.map_batches(
        lookup_inner, fn_kwargs={"source": ray.put(table), "names": added}, batch_format="pyarrow"
    )


def lookup_inner(table: pa.Table, source: Any, names: list[str]) -> pa.Table:
    """The rows of ``table`` with a match in ``source``, with ``names`` appended from it."""
    if not isinstance(source, pa.Table):
        import ray

        source = ray.get(source)
    matched = table.filter(pc.is_in(table["image_id"], value_set=source["image_id"]))
    return lookup_columns(matched, source, names)


def _non_null(table: pa.Table, column: str) -> pa.Table:
    return table.filter(pc.is_valid(table[column]))


def drop_null(dataset: Any, column: str) -> Any:
    """Rows of ``dataset`` whose ``column`` is not null."""
    return dataset.map_batches(_non_null, fn_kwargs={"column": column}, batch_format="pyarrow")
