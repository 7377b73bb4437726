"""Issue 28 in the cache's storage protocol (no Ray): damaged entries are recognised and replaced,
what a commit marker vouches for is fsync'ed first, a dead attempt is taken over once, and pool
shards carry their stage's schema and package version."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.cache import entries as cache
from pipeline.cache.entries import CacheEntry, DamagedEntry, dataset_output
from stages.core import shards
from stages.core.errors import StorageError
from stages.core.shards import ShardPool, write_shard
from stages.core.storage import DatasetRef, Storage
from stages.teach import table as teach_table


def _rows(ids: list[str]) -> pa.Table:
    return pa.table({"image_id": ids, "value": list(range(len(ids)))})


def _commit_dataset_entry(storage: Storage, entry: CacheEntry, token: str) -> dict:
    ref = DatasetRef(storage, f"{entry.attempt_dir(token)}/signals", "signals")
    ref.prepare()
    ref.write_table(_rows(["a", "b", "c"]))
    ref.commit()
    record, won = entry.commit(token, {"outputs": {"signals": dataset_output(ref)}, "metrics": {}})
    assert won
    return record


# --------------------------------------------------------------------------- damaged entries
def test_an_empty_entry_file_is_damaged_and_the_next_writer_replaces_it(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    entry = CacheEntry(storage, "teach", "k" * 64)
    _commit_dataset_entry(storage, entry, "first")
    Path(entry.record_path).write_bytes(b"")  # a crash between create and write, a full disk

    record, damage = entry.load()
    assert record is None
    assert damage is not None
    assert damage.startswith("_ENTRY.json does not parse (0 bytes)")
    with pytest.raises(DamagedEntry, match=r"teach/k{64}/_ENTRY\.json: _ENTRY\.json does not"):
        entry.record()

    replaced = _commit_dataset_entry(storage, entry, "second")  # won over the damaged one
    assert entry.load() == (replaced, None)
    assert replaced["attempt"] == "second"
    stored = json.loads(Path(entry.record_path).read_text())
    assert stored["attempt"] == "second"
    table = cache.output_dataset(storage, "signals", stored["outputs"]["signals"]).read_table()
    assert sorted(table["image_id"].to_pylist()) == ["a", "b", "c"]


@pytest.mark.parametrize("lost", ["_manifest.json", "_COMMITTED"])
def test_an_entry_whose_output_manifest_is_missing_is_damaged(tmp_path: Path, lost: str) -> None:
    storage = Storage(str(tmp_path / "root"))
    entry = CacheEntry(storage, "teach", "k" * 64)
    record = _commit_dataset_entry(storage, entry, "first")
    assert entry.load() == (record, None)
    missing = Path(entry.attempt_dir("first")) / "signals" / lost
    missing.unlink()
    assert entry.load() == (record, f"signals: {missing} is missing")
    assert entry.record() == record  # it parses: report and friends can still read it


def test_an_entry_whose_model_file_is_missing_is_damaged(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    entry = CacheEntry(storage, "train_teacher", "m" * 64)
    model = f"{entry.attempt_dir('t')}/teacher.pt"
    storage.write_bytes(model, b"weights")
    entry.commit("t", {"outputs": {"teacher": cache.model_output(storage, model)}, "metrics": {}})
    assert entry.load()[1] is None
    os.unlink(model)
    assert entry.load()[1] == f"teacher: model file {model} is missing"


# --------------------------------------------------------------------------------- durability
def test_data_and_manifest_are_fsynced_before_each_commit_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(str(tmp_path / "root"))
    entry = CacheEntry(storage, "teach", "k" * 64)
    ref = DatasetRef(storage, f"{entry.attempt_dir('t')}/signals", "signals")
    ref.prepare()
    ref.write_table(_rows(["a", "b"]))
    (shard,) = [str(p) for p in Path(ref.directory).glob("*.parquet")]
    synced: list[tuple[str, bool, bool]] = []  # path, dataset marker there?, entry record there?
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, Path(ref.marker_path).exists(), Path(entry.record_path).exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ref.commit()
    paths = [p for p, _, _ in synced]
    manifest_temp = next(p for p in paths if p.startswith(f"{ref.manifest_path}."))
    marker_temp = next(p for p in paths if p.startswith(f"{ref.marker_path}."))
    # the shard, its directory, the manifest's content and its directory entry, then the marker
    assert paths.index(shard) < paths.index(manifest_temp) < paths.index(marker_temp)
    assert ref.directory in paths[paths.index(manifest_temp) : paths.index(marker_temp)]
    assert not any(marker for _, marker, _ in synced[: paths.index(marker_temp) + 1])
    assert paths[-1] == ref.directory  # the marker's own directory entry

    synced.clear()
    entry.commit("t", {"outputs": {"signals": dataset_output(ref)}, "metrics": {}})
    before_record = {path for path, _, record in synced if not record}
    assert {shard, ref.manifest_path, ref.marker_path, ref.directory} <= before_record
    assert any(p.startswith(f"{entry.record_path}.") for p in before_record)  # its content
    assert synced[-1] == (entry.directory, True, True)  # and its directory entry, last


# ---------------------------------------------------------------------------------- takeover
def test_a_dead_attempt_is_taken_over_once_and_a_live_one_never(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    entry = CacheEntry(storage, "train_teacher", "k" * 64)
    for token in ("20260101T000000-dead0001", "20260101T000001-live0002"):
        storage.write_bytes(entry.heartbeat_path(token), b"0\n")
    old = time.time() - 3600
    os.utime(entry.heartbeat_path("20260101T000000-dead0001"), (old, old))
    always = lambda token: True  # noqa: E731

    assert entry.take_over(always) == "20260101T000000-dead0001"
    assert entry.take_over(always) is None  # the claim counts as a heartbeat
    assert entry.take_over(lambda token: False) is None
    claims = sorted(p.name for p in Path(entry.attempt_dir("20260101T000000-dead0001")).iterdir())
    assert claims == ["_ALIVE", "_TAKEN-0.json"]
    # once the claimer died too, the next rerun takes it over again
    claim = Path(entry.attempt_dir("20260101T000000-dead0001")) / "_TAKEN-0.json"
    os.utime(claim, (old, old))
    assert entry.take_over(always) == "20260101T000000-dead0001"
    assert (claim.parent / "_TAKEN-1.json").exists()


def test_a_heartbeat_keeps_its_file_fresh_while_running(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    path = storage.path("beat", "_ALIVE")
    with cache.Heartbeat(storage, path, interval=0.05):
        first = float(Path(path).read_text())
        time.sleep(0.3)
        later = float(Path(path).read_text())
    assert later > first


# ------------------------------------------------------------------------------ shard schemas
def _signals(ids: list[str]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"image_id": i, "num_classes": 2} for i in ids], teach_table.SIGNALS_SCHEMA
    )


def test_the_pool_family_covers_the_schema_version_and_the_package_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(str(tmp_path / "root"))
    base = ShardPool.of(storage, "teach", "model-and-settings")
    assert base.family != "model-and-settings"
    assert base.directory == storage.path("cache", "teach", "pool", base.family)
    assert base.schema is teach_table.SIGNALS_SCHEMA
    assert ShardPool.of(storage, "teach", "model-and-settings") == base  # stable
    assert ShardPool.of(storage, "teach", "other-model").family != base.family
    monkeypatch.setattr(teach_table, "SCHEMA", "teacher_signals/99")
    assert ShardPool.of(storage, "teach", "model-and-settings").family != base.family
    monkeypatch.undo()
    monkeypatch.setattr(shards, "package_version", lambda: "9.9.9")
    assert ShardPool.of(storage, "teach", "model-and-settings").family != base.family
    with pytest.raises(
        ValueError, match="stage 'evaluate' has no shard pool; pools: detect, teach"
    ):
        ShardPool.of(storage, "evaluate", "x")


def test_a_shard_of_another_schema_is_refused_at_write_commit_and_verify(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    pool = ShardPool.of(storage, "teach", "family")
    good = write_shard(_signals(["a", "b"]), **pool.writer_kwargs("t1"))["shard"][0].as_py()
    drifted = _signals(["c"]).drop_columns(["features"])
    with pytest.raises(StorageError, match=r"shard .*/t2-\w+\.parquet .*missing column 'features'"):
        write_shard(drifted, **pool.writer_kwargs("t2"))
    assert [s["ids"] for s in pool.committed()] == [["a", "b"]]  # nothing of it committed

    # a drifted shard that got into the pool anyway (older code, same family)
    unchecked = {**pool.writer_kwargs("t3"), "schema": None}
    bad = write_shard(drifted.set_column(3, "num_classes", pa.array([2], pa.int64())), **unchecked)
    bad_path = bad["shard"][0].as_py()
    ref = DatasetRef(storage, storage.path("d"), "teacher_signals")
    ref.prepare()
    with pytest.raises(StorageError) as refused:
        ref.commit_files([good, bad_path], schema=teach_table.SIGNALS_SCHEMA)
    assert str(refused.value) == (
        f"dataset 'teacher_signals': {bad_path}: schema differs from the expected one: "
        "missing column 'features' (binary); column 'num_classes' is int64, expected int32"
    )
    assert not ref.is_committed()
    ref.commit_files([good, bad_path])  # without a schema, only rows and ids are checked
    ref.verify(deep=True)
    with pytest.raises(StorageError, match=f"{bad_path}: schema differs"):
        ref.verify(deep=True, schema=teach_table.SIGNALS_SCHEMA)
