"""The image-id join both ways (broadcast lookup and hash shuffle) gives the same inner join."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from stages.core.storage import DatasetRef, Storage
from stages.core.tables import join_on_image_id
from tests.conftest import local_ray

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    with local_ray():
        yield


def _committed(tmp_path: Path, name: str, table: pa.Table) -> DatasetRef:
    storage = Storage(str(tmp_path))
    ref = DatasetRef(storage, storage.path(name), name)
    ref.prepare()
    half = table.num_rows // 2
    ref.write_table(table.slice(0, half), "part-0.parquet")
    ref.write_table(table.slice(half), "part-1.parquet")
    ref.commit()
    return ref


@pytest.mark.parametrize("broadcast_bytes", [1 << 30, 0], ids=["broadcast", "hash-shuffle"])
def test_join_keeps_matching_ids_with_their_columns(
    ray_session: None, tmp_path: Path, broadcast_bytes: int
) -> None:
    import ray.data

    # "d" has no label and "x" no image: neither is in an inner join.
    images = ray.data.from_items([{"image_id": i, "pixels": i * 3} for i in "abcd"])
    labels = pa.table(
        {"image_id": ["c", "a", "x", "b"], "label": [30, 10, 99, 20], "junk": [0] * 4}
    )
    ref = _committed(tmp_path, "labels", labels)
    assert ref.size_bytes() > 0
    joined = join_on_image_id(images, ref, ["label"], 2, broadcast_bytes=broadcast_bytes)
    rows = sorted(joined.take_all(), key=lambda row: row["image_id"])
    assert [(r["image_id"], r["pixels"], r["label"]) for r in rows] == [
        ("a", "aaa", 10),
        ("b", "bbb", 20),
        ("c", "ccc", 30),
    ]
    assert all("junk" not in row for row in rows)
