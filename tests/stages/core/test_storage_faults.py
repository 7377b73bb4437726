"""Storage faults (issue 28): a filesystem that fails the n-th write or rename, or cuts a file in
half without a word, at every point of an inference stage's commit sequence. Whatever the fault,
nothing half-written is ever trusted, the rerun heals, and ``cache verify`` names what is damaged
and ``--repair`` uncommits it so that the next run recomputes it. No Ray: the sequence is the
runner's for an inference stage (pool shards, the dataset over them, the entry)."""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline.cache.commit import check_output_schemas
from pipeline.cache.entries import CacheEntry, dataset_output, iter_entries
from pipeline.cache.verify import verify_entry, verify_pools
from pipeline.cli import main
from stages.core.faults import FAULTS_ENV, FaultPlan, InjectedFault, operations
from stages.core.shards import ShardPool, new_token, write_shard
from stages.core.storage import CorruptFile, DatasetRef, Storage
from stages.detect import table as detect

IDS = [f"img{i:02d}" for i in range(10)]
SHARD_ROWS = 4  # three shards: 4, 4 and 2 images
KEY = "d" * 64
FAMILY = "detector-weights-and-settings"


def _detections(ids: list[str]) -> pa.Table:
    rows = [
        {
            "image_id": i,
            "boxes": [0.0, 0.0, 8.0, 8.0],
            "labels": [1],
            "scores": [0.5],
            "num_boxes": 1,
        }
        for i in ids
    ]
    return pa.Table.from_pylist(rows, schema=detect.DETECTIONS_SCHEMA)


def produce(storage: Storage) -> dict:
    """The detect stage as the runner runs it: reuse a sound entry; else infer the images no
    committed pool shard covers (a shard committed every SHARD_ROWS), commit the dataset of the
    reused and new shards, check its schema, commit the entry."""
    entry = CacheEntry(storage, "detect", KEY)
    record, damage = entry.load()
    if record is not None and damage is None:
        return record
    pool = ShardPool.of(storage, "detect", FAMILY)
    reused, missing = pool.cover(set(IDS))
    token, todo, new = new_token(), sorted(missing), []
    for start in range(0, len(todo), SHARD_ROWS):
        written = write_shard(
            _detections(todo[start : start + SHARD_ROWS]), **pool.writer_kwargs(token)
        )
        new.append(written.column("shard")[0].as_py())
    out = DatasetRef(storage, posixpath.join(entry.attempt_dir(token), "detections"), "detections")
    out.prepare()
    out.commit_files([s["path"] for s in reused] + new, {"schema": detect.SCHEMA})
    outputs = {"detections": dataset_output(out, schema=detect.SCHEMA)}
    check_output_schemas(storage, outputs)
    return entry.commit(token, {"outputs": outputs, "metrics": {}})[0]


def _ids(storage: Storage, record: dict) -> list[str]:
    ref = DatasetRef(storage, storage.resolve(record["outputs"]["detections"]["directory"]), "d")
    return sorted(ref.read_table(["image_id"]).column(0).to_pylist())


def _assert_nothing_damaged_is_trusted(storage: Storage) -> None:
    """Every entry the runner would reuse verifies deeply, and every shard a pool would hand
    out verifies (a damaged shard manifest is skipped by the pool, and only reported)."""
    for entry in iter_entries(storage):
        if entry.damage is None:
            assert verify_entry(storage, entry) == [], entry.key
    handed_out = {
        m["path"].removesuffix(".parquet") + ".json"
        for m in ShardPool.of(storage, "detect", FAMILY).committed()
    }
    assert not {p.manifest for p in verify_pools(storage)} & handed_out


def _drill(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, op: str, nth: int) -> str:
    state = tmp_path / f"{op}-{nth}.count"
    monkeypatch.setenv(FAULTS_ENV, FaultPlan(op=op, nth=nth, state=str(state)).model_dump_json())
    return str(state)


def test_faults_fs_is_the_local_folder_and_fails_the_chosen_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(f"faults://{tmp_path}/root")
    assert storage.is_local
    assert storage.root == f"{tmp_path}/root"
    state = _drill(monkeypatch, tmp_path, "write", 2)
    storage.write_bytes(storage.path("one"), b"0123456789")
    with pytest.raises(InjectedFault, match=r"write #2 of .*/root/two\.\w+\.tmp failed"):
        storage.write_bytes(storage.path("two"), b"0123456789")
    storage.write_bytes(storage.path("three"), b"abc")
    assert operations(state) == 3
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["one", "three"]  # no temp
    assert (tmp_path / "root" / "one").read_bytes() == b"0123456789"

    _drill(monkeypatch, tmp_path, "truncate", 1)
    with storage.fs.open(storage.path("torn"), "wb") as handle:
        handle.write(b"0123456789")
    assert (tmp_path / "root" / "torn").read_bytes() == b"01234"  # cut in half, silently

    _drill(monkeypatch, tmp_path, "rename", 1)
    with pytest.raises(InjectedFault, match="rename #1"):
        storage.write_bytes(storage.path("one"), b"new")
    assert (tmp_path / "root" / "one").read_bytes() == b"0123456789"  # the old content stands
    monkeypatch.setenv(
        FAULTS_ENV,
        FaultPlan(op="write", nth=1, match="pool/", state=str(tmp_path / "m")).model_dump_json(),
    )
    storage.write_bytes(storage.path("elsewhere"), b"x")  # not matched: not counted
    assert operations(str(tmp_path / "m")) == 0


def _operations_of_a_clean_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str) -> int:
    state = _drill(monkeypatch, tmp_path, op, 10**9)
    assert (
        _ids(
            Storage(f"faults://{tmp_path}/clean-{op}"),
            produce(Storage(f"faults://{tmp_path}/clean-{op}")),
        )
        == IDS
    )
    return operations(state)


@pytest.mark.parametrize("op", ["write", "truncate", "rename"])
def test_a_fault_at_any_point_of_a_commit_is_never_trusted_and_the_rerun_heals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    total = _operations_of_a_clean_run(tmp_path, monkeypatch, op)
    # 3 shards, their 3 manifests, the dataset's manifest and marker, the entry: 9 files, each
    # written once; of those the manifest and the marker are renamed into place.
    assert total == {"write": 9, "truncate": 9, "rename": 2}[op]
    outcomes = []
    for nth in range(1, total + 1):
        storage = Storage(f"faults://{tmp_path}/{op}-{nth}")
        state = _drill(monkeypatch, tmp_path, op, nth)
        try:
            produce(storage)
            outcomes.append("completed")
        except (InjectedFault, CorruptFile) as exc:
            outcomes.append(type(exc).__name__)
        assert operations(state) >= nth  # the fault was injected
        _assert_nothing_damaged_is_trusted(storage)
        monkeypatch.delenv(FAULTS_ENV)
        assert _ids(storage, produce(storage)) == IDS  # the rerun heals: every id exactly once
        entry = next(iter_entries(storage))
        assert entry.damage is None
        assert verify_entry(storage, entry) == []
    if op == "write":
        assert outcomes == ["InjectedFault"] * total  # a failed write always fails the run
    if op == "rename":
        assert outcomes == ["InjectedFault"] * total
    if op == "truncate":
        # Shards are read back before their manifest (1, 3, 5: refused); a cut shard manifest
        # (2, 4, 6) is skipped by the pool, the run goes on with its own shard; a cut dataset
        # manifest (7) does not parse; a cut marker (8) says nothing; a cut entry record (9) is
        # damaged, and the rerun replaces it.
        assert outcomes == [
            "CorruptFile", "completed", "CorruptFile", "completed", "CorruptFile", "completed",
            "CorruptFile", "completed", "completed",
        ]  # fmt: skip


def test_verify_names_a_truncated_shard_and_repair_makes_the_next_run_recompute_it(
    tmp_path: Path,
) -> None:
    storage = Storage(str(tmp_path / "root"))
    record = produce(storage)
    pool = ShardPool.of(storage, "detect", FAMILY)
    shards = [m["path"] for m in pool.committed()]
    assert len(shards) == 3
    torn = Path(shards[1])
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a lost tail on disk

    cli = CliRunner()
    found = cli.invoke(main, ["cache", "verify", "--root", storage.root])
    assert found.exit_code == 1
    lines = found.output.splitlines()
    assert lines[0].startswith(f"DAMAGED detect {KEY[:12]}: detections: dataset 'detections': ")
    assert f"shard {torn} unreadable" in lines[0]
    assert lines[1].startswith(f"DAMAGED detect shard {torn.with_suffix('.json')}: unreadable")
    assert lines[2] == "1 entries checked, 1 damaged; 1 damaged shards"

    repaired = cli.invoke(main, ["cache", "verify", "--root", storage.root, "--repair"])
    assert repaired.exit_code == 0, repaired.output
    removed = [
        line.split(" (")[0] for line in repaired.output.splitlines() if line.startswith("removed")
    ]
    entry = CacheEntry(storage, "detect", KEY)
    assert removed == [
        f"removed {torn.with_suffix('.json')}",
        f"removed {torn}",
        f"removed {entry.record_path}",
    ]
    again = cli.invoke(main, ["cache", "verify", "--root", storage.root])
    assert again.exit_code == 0
    assert again.output.splitlines()[-1] == "0 entries checked, 0 damaged; 0 damaged shards"

    healed = produce(storage)  # the next run: the two sound shards reused, one inferred again
    assert healed["attempt"] != record["attempt"]
    assert _ids(storage, healed) == IDS
    after = [m["path"] for m in pool.committed()]
    assert len(after) == 3
    assert set(after) & set(shards) == {shards[0], shards[2]}
    assert cli.invoke(main, ["cache", "verify", "--root", storage.root]).exit_code == 0
