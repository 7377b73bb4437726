"""The cache's storage protocol on a local folder and on a real S3-protocol server: keys,
exclusive commits under racing writers, shard pools, and verification."""

from __future__ import annotations

import json
import secrets
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.cache import entries as cache
from pipeline.cache.entries import CacheEntry, cache_key, output_dataset
from stages.core import shards
from stages.core.errors import StorageError
from stages.core.shards import ShardPool, write_shard
from stages.core.storage import DatasetRef, Storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3")
    return Storage(f"{bucket}/{secrets.token_hex(4)}")


def _rows(ids: list[str]) -> pa.Table:
    return pa.table({"image_id": ids, "value": list(range(len(ids)))})


def test_key_depends_on_every_part_and_not_on_field_order(monkeypatch: pytest.MonkeyPatch) -> None:
    base = cache_key("teach", "s/1", {"a": 1, "b": {"c": 2, "d": 3}})
    assert base == cache_key("teach", "s/1", {"b": {"d": 3, "c": 2}, "a": 1})
    assert len(base) == 64
    assert base != cache_key("detect", "s/1", {"a": 1, "b": {"c": 2, "d": 3}})
    assert base != cache_key("teach", "s/2", {"a": 1, "b": {"c": 2, "d": 3}})
    assert base != cache_key("teach", "s/1", {"a": 1, "b": {"c": 2, "d": 4}})
    monkeypatch.setattr(shards, "package_version", lambda: "9.9.9")
    assert base != cache_key("teach", "s/1", {"a": 1, "b": {"c": 2, "d": 3}})


def test_exclusive_create_has_exactly_one_winner(storage: Storage) -> None:
    path = storage.path("race", "marker.json")
    results: dict[int, bool] = {}

    def write(n: int) -> None:
        results[n] = Storage(storage.url).create_exclusive(path, {"writer": n})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [n for n, won in results.items() if won]
    assert len(winners) == 1
    assert storage.read_json(path) == {"writer": winners[0]}


def test_racing_writers_leave_one_committed_copy_and_no_torn_read(storage: Storage) -> None:
    entry = CacheEntry(storage, "teach", "k" * 64)
    ids = [f"img{n:02d}" for n in range(12)]
    records: dict[int, tuple[dict, bool]] = {}
    seen: list[int] = []
    done = threading.Event()

    def writer(n: int) -> None:
        token = f"t{n}"
        ref = DatasetRef(storage, f"{entry.attempt_dir(token)}/signals", "signals")
        ref.prepare()
        for part in range(3):  # several shards, so a torn read would show missing rows
            ref.write_table(_rows(ids[part * 4 : part * 4 + 4]), f"part-{part}.parquet")
        ref.commit()
        output = cache.dataset_output(ref)
        records[n] = entry.commit(token, {"outputs": {"signals": output}, "metrics": {}})

    def reader() -> None:
        while True:
            finished = done.is_set()  # one more read after the writers are done
            record = entry.record()
            if record is not None:
                table = output_dataset(storage, "signals", record["outputs"]["signals"])
                seen.append(table.read_table().num_rows)
            if finished:
                return

    watcher = threading.Thread(target=reader)
    watcher.start()
    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    watcher.join()

    final = entry.record()
    assert final is not None
    assert [ours for _, ours in records.values()].count(True) == 1
    assert all(record == final for record, _ in records.values())
    attempts = storage.fs.ls(f"{entry.directory}/attempts", detail=False)
    assert [a.rsplit("/", 1)[-1] for a in attempts] == [final["attempt"]]
    assert seen  # the reader saw the entry at least once
    assert set(seen) == {12}  # and whenever it saw one, it saw all of it
    table = output_dataset(storage, "signals", final["outputs"]["signals"]).read_table()
    assert sorted(table["image_id"].to_pylist()) == ids


def _pool(storage: Storage, family: str) -> ShardPool:
    """A pool of any schema (the rows here are not a stage's)."""
    return ShardPool(storage, storage.path("cache", "teach", "pool", family), family)


def test_shard_pool_reuses_only_wanted_disjoint_shards(storage: Storage) -> None:
    pool = _pool(storage, "family-a")
    for ids in (["a", "b"], ["c"], ["b", "d"]):
        write_shard(_rows(ids), **pool.writer_kwargs(shards.new_token()))
    other = _pool(storage, "family-b")
    write_shard(_rows(["e"]), **other.writer_kwargs(shards.new_token()))

    def cover(wanted: set[str]) -> tuple[list[list[str]], set[str]]:
        chosen, missing = pool.cover(wanted)
        return [s["ids"] for s in chosen], missing

    assert cover({"a", "b", "c"}) == ([["a", "b"], ["c"]], set())
    assert cover({"a", "b", "c", "d", "e"}) == ([["a", "b"], ["c"]], {"d", "e"})
    assert cover({"c", "d"}) == ([["c"]], {"d"})
    assert cover({"e"}) == ([], {"e"})  # another family's shard is never used
    manifest = pool.committed()[0]
    assert manifest["rows"] == 2
    assert manifest["family"] == "family-a"
    assert manifest["id_digest"]


def test_deep_verify_catches_deleted_truncated_and_swapped_shards(storage: Storage) -> None:
    ref = DatasetRef(storage, storage.path("d"), "d")
    ref.prepare()
    ref.write_table(_rows(["a", "b"]), "part-0.parquet")
    ref.write_table(_rows(["c", "d"]), "part-1.parquet")
    ref.commit()
    ref.verify(deep=True)
    first, second = ref.files()
    storage.write_bytes(second, _parquet(_rows(["x", "y"])))  # same row count, other ids
    ref.verify()  # the footers still agree
    with pytest.raises(StorageError, match="ids differ"):
        ref.verify(deep=True)
    storage.write_bytes(second, storage.read_bytes(first)[:30])
    with pytest.raises(StorageError, match="unreadable"):
        ref.verify()
    storage.fs.rm(first)
    with pytest.raises(StorageError, match=r"part-0\.parquet"):
        ref.verify()


def _parquet(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def test_manifest_paths_cannot_leave_the_root(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    ref = DatasetRef(storage, storage.path("d"), "d")
    ref.prepare()
    ref.write_table(_rows(["a"]))
    ref.commit()
    manifest = json.loads(Path(ref.manifest_path).read_text())
    manifest["files"][0]["path"] = "../../etc/passwd"
    Path(ref.manifest_path).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unsafe path component"):
        ref.files()


def test_a_losing_writer_removes_the_pool_shards_the_winner_does_not_use(tmp_path: Path) -> None:
    from pipeline.cache.entries import drop_unused, entry_files

    storage = Storage(str(tmp_path / "root"))
    pool = _pool(storage, "family")
    entry = CacheEntry(storage, "teach", "k" * 64)
    outputs = {}
    for token in ("winner", "loser"):
        shard = write_shard(_rows(["a", "b"]), **pool.writer_kwargs(token))["shard"][0].as_py()
        ref = DatasetRef(storage, f"{entry.attempt_dir(token)}/signals", "signals")
        ref.prepare()
        ref.commit_files([shard])
        outputs[token] = {"outputs": {"signals": cache.dataset_output(ref)}}
    winner, won = entry.commit("winner", outputs["winner"])
    assert won
    ours = entry_files(storage, outputs["loser"])
    record, won = entry.commit("loser", outputs["loser"])
    assert not won
    assert record == winner
    dropped = drop_unused(storage, ours, record)
    assert len(dropped) == 3  # the loser's shard, and its dataset's manifest and marker
    assert [s["file"].split("-")[0] for s in pool.committed()] == ["winner"]
    table = output_dataset(storage, "signals", record["outputs"]["signals"]).read_table()
    assert sorted(table["image_id"].to_pylist()) == ["a", "b"]
