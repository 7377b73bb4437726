from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from stages.core.errors import StorageError
from stages.core.storage import DatasetRef, Storage, id_digest


def _ref(tmp_path: Path, name: str = "images") -> DatasetRef:
    storage = Storage(str(tmp_path))
    return DatasetRef(storage, storage.path("data", name), name)


def _table(ids: list[str]) -> pa.Table:
    return pa.table({"image_id": ids, "value": list(range(len(ids)))})


def test_commit_writes_manifest_with_rows_and_id_digest(tmp_path: Path) -> None:
    ref = _ref(tmp_path)
    ref.prepare()
    ref.write_table(_table(["a", "b"]), "part-0.parquet")
    ref.write_table(_table(["c"]), "part-1.parquet")
    assert not ref.is_committed()
    manifest = ref.commit()
    assert ref.is_committed()
    assert manifest["rows"] == 3
    assert [f["rows"] for f in manifest["files"]] == [2, 1]
    assert manifest["id_digest"] == id_digest(["c", "b", "a"])
    assert sorted(ref.read_table()["image_id"].to_pylist()) == ["a", "b", "c"]


def test_uncommitted_dataset_is_not_trusted(tmp_path: Path) -> None:
    ref = _ref(tmp_path)
    ref.prepare()
    ref.write_table(_table(["a"]))
    with pytest.raises(StorageError, match="not committed"):
        ref.read_table()


def test_files_come_from_manifest_not_listing(tmp_path: Path) -> None:
    ref = _ref(tmp_path)
    ref.prepare()
    ref.write_table(_table(["a", "b"]), "part-0.parquet")
    ref.commit()
    ref.write_table(_table(["zzz"]), "stray.parquet")  # written after commit: never read
    assert ref.read_table()["image_id"].to_pylist() == ["a", "b"]


def test_verify_catches_truncated_and_deleted_shard(tmp_path: Path) -> None:
    ref = _ref(tmp_path)
    ref.prepare()
    ref.write_table(_table(["a", "b"]), "part-0.parquet")
    ref.commit()
    shard = Path(ref.files()[0])
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(StorageError, match="unreadable"):
        ref.verify()
    shard.unlink()
    with pytest.raises(StorageError, match=r"part-0\.parquet"):
        ref.verify()


def test_duplicate_ids_refuse_to_commit(tmp_path: Path) -> None:
    ref = _ref(tmp_path)
    ref.prepare()
    ref.write_table(_table(["a", "a"]))
    with pytest.raises(StorageError, match="duplicate"):
        ref.commit()
    assert not ref.is_committed()


@pytest.mark.parametrize("part", ["..", "a/b", "/etc", "", "x y"])
def test_paths_cannot_escape_root(tmp_path: Path, part: str) -> None:
    with pytest.raises(ValueError, match="unsafe path component"):
        Storage(str(tmp_path)).path("data", part)
