"""Issue 28 ("Nothing lost, nothing leaked") in the pipeline's cache, in this process, without
Ray: ``cache gc`` never trusts a tracking store it would create or that holds none of the
root's runs, and spares young entries; a losing writer keeps what other keys use; each training
attempt has its own Ray Train folder and a rerun resumes a dead one's; damaged entries are
reported, not reused, and replaced; a shard of another schema is never committed."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline import runner
from pipeline.cache import commit
from pipeline.cache.entries import (
    CacheEntry,
    cache_key,
    dataset_output,
    drop_unused,
    entry_files,
    iter_entries,
    output_dataset,
)
from pipeline.cache.gc import (
    TrackingError,
    collect_garbage,
    gc_references,
    gc_tracking_uris,
    tracking_record,
)
from pipeline.cache.plan import plan
from pipeline.cache.verify import verify_entry
from pipeline.cli import main
from pipeline.config import PipelineConfig, load_config
from pipeline.graph import Context, Outcome, Stage
from pipeline.tracking import KEY_TAG, STAGE_TAG, Tracker, local_uri
from stages.core.declaration import Declaration
from stages.core.errors import StorageError
from stages.core.shards import ShardPool, write_shard
from stages.core.storage import DatasetRef, Storage
from stages.ingest.generated import GeneratedSpec, generate_dataset
from stages.teach import table as teach_table

HOUR = 3600.0


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _rows(ids: list[str]) -> pa.Table:
    return pa.table({"image_id": ids, "value": list(range(len(ids)))})


def _entry(
    storage: Storage, stage: str, key: str, token: str = "t", shards: Sequence[str] = ()
) -> str:
    """Commit an entry with one dataset (its own shard, or the given pool shards); its folder."""
    entry = CacheEntry(storage, stage, key)
    ref = DatasetRef(storage, f"{entry.attempt_dir(token)}/signals", "signals")
    ref.prepare()
    if shards:
        ref.commit_files(list(shards))
    else:
        ref.write_table(_rows([f"{key[:4]}-{n}" for n in range(3)]))
        ref.commit()
    _, won = entry.commit(token, {"outputs": {"signals": dataset_output(ref)}, "metrics": {}})
    assert won
    return entry.directory


def _backdate(path: str | Path, seconds: float) -> None:
    """Every file and folder under ``path`` written ``seconds`` ago."""
    when = time.time() - seconds
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.utime(os.path.join(folder, name), (when, when))
    os.utime(path, (when, when))


def _store(path: Path, *keys: str) -> str:
    """An MLflow SQLite store with one stage run tagged with each key."""
    uri = f"sqlite:///{path}"
    tracker = Tracker(uri, "pseudoflow", str(path.parent / f"{path.stem}-artifacts"))
    for key in keys:
        tracker.start_run("teach", {STAGE_TAG: "teach", KEY_TAG: key})
    return uri


def _pipeline_run(storage: Storage, run_id: str, uri: str) -> None:
    storage.write_json(storage.path("pipelines", run_id, "stages.json"), {})
    storage.write_json(
        storage.path("pipelines", run_id, "tracking.json"), tracking_record(uri, storage.root)
    )


def _gc(*args: str) -> Any:
    return CliRunner().invoke(main, ["cache", "gc", *args])


# ------------------------------------------------------------------------- 1. gc and tracking
def test_gc_refuses_a_sqlite_file_that_does_not_exist_and_creates_none(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    entry = _entry(storage, "teach", "a" * 64)
    _backdate(entry, 2 * HOUR)
    typo = tmp_path / "mlfow.db"
    with pytest.raises(TrackingError) as refused:
        gc_references(storage, f"sqlite:///{typo}")
    assert str(refused.value) == (
        f"tracking store sqlite:///{typo}: the SQLite file {typo} does not exist (gc never "
        "creates a tracking store); pass the --tracking-uri the runs logged to"
    )
    result = _gc("--root", storage.root, "--tracking-uri", f"sqlite:///{typo}", "--delete")
    assert result.exit_code == 2
    assert f"the SQLite file {typo} does not exist" in result.output
    assert not typo.exists()
    assert Path(entry, "_ENTRY.json").exists()


def test_gc_refuses_a_store_without_pseudoflow_runs_unless_told_to(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    entry = _entry(storage, "teach", "a" * 64)
    _backdate(entry, 2 * HOUR)
    uri = _store(Path(storage.root) / "mlflow.db")  # an existing store with no run in it
    _pipeline_run(storage, "run-1", uri)
    with pytest.raises(TrackingError) as refused:
        gc_references(storage)
    assert str(refused.value) == (
        f"tracking store {uri} holds no pseudoflow runs, but 1 pipeline runs under the root "
        "logged there (run-1): refusing to treat every entry as garbage. Check the URI, or pass "
        "--allow-empty-tracking if those runs were deleted on purpose"
    )
    assert gc_references(storage, allow_empty=True) == set()
    assert _gc("--root", storage.root, "--delete").exit_code == 2
    assert Path(entry).exists()
    result = _gc("--root", storage.root, "--delete", "--allow-empty-tracking", "--min-age", "1")
    assert result.exit_code == 0, result.output
    assert not Path(entry).exists()


def test_gc_reads_the_store_each_run_recorded(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    keys = [c * 64 for c in "abc"]
    entries = [_entry(storage, "teach", key) for key in keys]
    for entry in entries:
        _backdate(entry, 2 * HOUR)
    first = _store(tmp_path / "elsewhere" / "first.db", keys[0])
    second = _store(tmp_path / "elsewhere" / "second.db", keys[1])
    _pipeline_run(storage, "run-1", first)
    # a run from before tracking.json: its config named the store
    config = storage.path("pipelines", "run-0", "config.yaml")
    storage.write_bytes(config, f"name: x\ntracking:\n  uri: {second}\n".encode())
    assert gc_tracking_uris(storage, None) == {second: ["run-0"], first: ["run-1"]}
    assert gc_references(storage) == set(keys[:2])
    result = _gc("--root", storage.root, "--min-age", "1")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        f"would delete {entries[2]} (no MLflow run references this entry)"
    )
    assert "1 items" in result.output
    assert not (Path(storage.root) / "mlflow.db").exists()  # the fallback was never opened


def test_a_recorded_store_drops_credentials_and_the_default_moves_with_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(str(tmp_path / "root"))
    secret_uri = "https://alice:s3cret@mlflow.example.com/track"
    assert tracking_record(secret_uri, storage.root) == {
        "uri": "https://***@mlflow.example.com/track",
        "credentials_removed": True,
        "under_root": False,
    }
    token_uri = f"{local_uri(storage.root)}?token=s3cret"
    assert tracking_record(token_uri, storage.root) == {
        "uri": f"{local_uri(storage.root)}?token=***",
        "credentials_removed": True,
        "under_root": False,
    }
    _pipeline_run(storage, "run-1", secret_uri)
    assert "s3cret" not in Path(storage.root, "pipelines", "run-1", "tracking.json").read_text()
    with pytest.raises(TrackingError, match="credentials are not stored") as refused:
        gc_tracking_uris(storage, None)
    assert "s3cret" not in str(refused.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_uri)
    assert gc_tracking_uris(storage, None) == {secret_uri: ["run-1"]}
    assert gc_tracking_uris(storage, "http://given:5000") == {"http://given:5000": ["run-1"]}

    # the default store under a root is read under the root as it is now (copied here)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    local = Storage(str(tmp_path / "local"))
    _pipeline_run(local, "run-2", local_uri(local.root))
    moved = tmp_path / "moved"
    shutil.copytree(local.root, moved)
    assert gc_tracking_uris(Storage(str(moved)), None) == {local_uri(str(moved)): ["run-2"]}


def test_gc_keeps_unreferenced_entries_younger_than_min_age(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    pool = ShardPool(storage, storage.path("cache", "teach", "pool", "fam"), "fam")
    shard = write_shard(_rows(["a", "b"]), **pool.writer_kwargs("t"))["shard"][0].as_py()
    entry = _entry(storage, "teach", "a" * 64, shards=[shard])
    _backdate(pool.directory, 2 * HOUR)  # the shard is old; the entry was just committed
    assert collect_garbage(storage, set(), min_age_s=HOUR, delete=True) == []
    assert Path(entry).exists()
    assert Path(shard).exists()
    _backdate(entry, 2 * HOUR)
    found = collect_garbage(storage, set(), min_age_s=HOUR, delete=True)
    manifest = shard.removesuffix(".parquet") + ".json"
    assert {(g.path, g.why) for g in found} == {
        (entry, "no MLflow run references this entry"),
        (shard, "shard no kept entry references"),
        (manifest, "its shard is collected"),
    }
    assert not Path(entry).exists()
    assert not Path(shard).exists()


# --------------------------------------------------------------- 2. losing writers, trainings
def test_a_losing_writer_keeps_the_pool_shards_another_key_uses(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    pool = ShardPool(storage, storage.path("cache", "teach", "pool", "fam"), "fam")
    shared = write_shard(_rows(["a", "b"]), **pool.writer_kwargs("loser"))["shard"][0].as_py()
    other = write_shard(_rows(["a", "b"]), **pool.writer_kwargs("winner"))["shard"][0].as_py()
    _entry(storage, "teach", "1" * 64, shards=[shared])  # another key reuses the loser's shard
    _entry(storage, "teach", "2" * 64, token="winner", shards=[other])
    contested = CacheEntry(storage, "teach", "2" * 64)
    loser = DatasetRef(storage, f"{contested.attempt_dir('loser')}/signals", "signals")
    loser.prepare()
    loser.commit_files([shared])
    outputs = {"outputs": {"signals": dataset_output(loser)}}
    ours = entry_files(storage, outputs)
    record, won = contested.commit("loser", outputs)
    assert not won
    assert drop_unused(storage, ours, record) == sorted([loser.manifest_path, loser.marker_path])
    assert Path(shared).exists()
    assert Path(shared.removesuffix(".parquet") + ".json").exists()
    first = next(e for e in iter_entries(storage) if e.key == "1" * 64)
    assert verify_entry(storage, first) == []
    table = output_dataset(storage, "signals", first.record["outputs"]["signals"]).read_table()
    assert sorted(table["image_id"].to_pylist()) == ["a", "b"]


class _Sink:
    uri = "sqlite:///unused.db"


class _Tracker:
    """What :func:`runner._run_stage` calls, recorded instead of logged."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, dict[str, str]]] = []

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        self.runs.append((name, tags))
        return f"run-{len(self.runs)}"

    def sink(self, run: str) -> _Sink:
        return _Sink()

    def latest_metrics(self, run: str) -> dict[str, float]:
        return {}

    def __getattr__(self, name: str) -> Any:  # log_params, log_text, log_metrics, end_run
        return lambda *args, **kwargs: None


def _config() -> PipelineConfig:
    return load_config("smoke", [])


def _context(storage: Storage, stage: str, key: str) -> Context:
    ctx = Context(_config(), storage, "run-1", [])
    ctx.keys[stage] = key
    return ctx


def _training(run: Any) -> Stage:
    return Stage(Declaration("train_x", (), ("model",), "model/1"), run, lambda ctx: {})


def _train_dir(ctx: Context, token: str | None = None) -> Path:
    return Path(ctx.storage.path("ray_train", ctx.train_name("train_x", token)))


def test_racing_trainings_each_train_in_their_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "init_ray", lambda config, uri: None)
    storage = Storage(str(tmp_path / "root"))
    key = cache_key("train_x", "model/1", {})
    seen: dict[str, Any] = {}

    def train(name: str) -> Any:
        def run(ctx: Context) -> Outcome:
            folder = _train_dir(ctx)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"checkpoint-{name}").write_text(name)
            seen[name] = folder.name
            if name == "slow":  # the other attempt trains and commits meanwhile
                fast = _context(storage, "train_x", key)
                entry = CacheEntry(storage, "train_x", key)
                seen["fast_record"] = commit.execute(train("fast"), fast, entry, {}, _Sink())
                seen["slow_after"] = sorted(p.name for p in folder.iterdir())
            storage.write_bytes(ctx.model_path("model"), name.encode())
            return Outcome({"trained": 1.0})

        return _training(run)

    ctx = _context(storage, "train_x", key)
    record = commit.execute(train("slow"), ctx, CacheEntry(storage, "train_x", key), {}, _Sink())
    assert seen["slow"] != seen["fast"]
    assert seen["slow"].startswith(f"train_x-{key[:16]}_")
    assert seen["slow_after"] == ["checkpoint-slow"]  # the winner's cleanup left it alone
    assert record == seen["fast_record"]  # the slow one lost, and adopted the winner's entry
    assert storage.read_bytes(storage.resolve(record["outputs"]["model"]["path"])) == b"fast"
    assert list(Path(storage.root, "ray_train").iterdir()) == []  # each removed its own


def test_a_rerun_takes_over_a_dead_training_attempt_and_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "init_ray", lambda config, uri: None)
    storage = Storage(str(tmp_path / "root"))
    key = cache_key("train_x", "model/1", {})
    entry = CacheEntry(storage, "train_x", key)
    ctx = _context(storage, "train_x", key)
    dead, live = "20260101T000000-0000dead", "20260101T000001-0000live"
    for token, age in ((dead, 2 * HOUR), (live, 0.0)):  # the live one is another run, racing
        storage.write_bytes(entry.heartbeat_path(token), b"0\n")
        _backdate(entry.attempt_dir(token), age)
        _train_dir(ctx, token).mkdir(parents=True)
        (_train_dir(ctx, token) / "checkpoint").write_text(f"step 7 of {token}")
    seen: dict[str, str] = {}

    def run(ctx: Context) -> Outcome:
        seen["name"] = ctx.train_name("train_x")
        seen["resumed"] = (_train_dir(ctx) / "checkpoint").read_text()
        storage.write_bytes(ctx.model_path("model"), b"weights")
        return Outcome({})

    record = commit.execute(_training(run), ctx, entry, {}, _Sink())
    assert seen == {"name": ctx.train_name("train_x", dead), "resumed": f"step 7 of {dead}"}
    assert record["attempt"] == dead
    assert not _train_dir(ctx, dead).exists()  # committed: its folder goes
    assert (_train_dir(ctx, live) / "checkpoint").exists()  # the live attempt's stays


# ------------------------------------------------------------------------- 3. damaged entries
def test_a_damaged_entry_is_recomputed_by_the_run_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "init_ray", lambda config, uri: None)
    storage = Storage(str(tmp_path / "root"))
    key = cache_key("train_x", "model/1", {})
    entry = CacheEntry(storage, "train_x", key)
    storage.write_bytes(entry.record_path, b"")
    runs: list[str] = []

    def run(ctx: Context) -> Outcome:
        runs.append(ctx.attempt)
        storage.write_bytes(ctx.model_path("model"), b"weights")
        return Outcome({"loss": 0.5})

    ctx = Context(_config(), storage, "run-1", [])
    uri = "https://alice:s3cret@mlflow.example.com/"
    summary = runner.RunSummary("run-1", "parent", uri, storage.root)
    tracker = _Tracker()
    metrics = runner._run_stage(_training(run), ctx, tracker, "parent", summary)  # type: ignore[arg-type]
    assert len(runs) == 1
    assert metrics == {"train_x.loss": 0.5}
    assert summary.cache == {"train_x": (key, False)}
    assert tracker.runs[0][1]["pseudoflow.cache_hit"] == "false"
    record, damage = entry.load()
    assert damage is None
    assert record is not None
    assert entry.attempt_dir(record["attempt"]) == runs[0]
    recorded = json.loads(Path(storage.root, "pipelines", "run-1", "tracking.json").read_text())
    assert recorded == {
        "uri": "https://***@mlflow.example.com/",
        "credentials_removed": True,
        "under_root": False,
    }


def test_plan_does_not_reuse_a_damaged_entry(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    generate_dataset(
        GeneratedSpec(seed=1, num_labeled=2, num_unlabeled=2, num_val=2, image_size=16), folder
    )
    config = load_config(
        "smoke", ["data.source=folder", f"data.root={folder}", "detector.enabled=false"]
    )
    root = str(tmp_path / "root")
    (first, *_) = plan(config, root)
    assert (first.stage, first.action) == ("ingest", "run")
    storage = Storage(root)
    entry = CacheEntry(storage, "ingest", first.key or "")
    ref = DatasetRef(storage, f"{entry.attempt_dir('t')}/images", "images")
    ref.prepare()
    ref.write_table(_rows(["a"]))
    ref.commit()
    digests = {"labeled": "l", "unlabeled": "u", "val": "v"}
    entry.commit("t", {"outputs": {"images": dataset_output(ref, digests=digests)}})
    assert [(r.stage, r.action) for r in plan(config, root)][:2] == [
        ("ingest", "reuse"),
        ("train_teacher", "run"),
    ]
    os.unlink(ref.manifest_path)
    (again, teacher, *_) = plan(config, root)
    assert (again.stage, again.action, again.key) == ("ingest", "run", first.key)
    assert again.reason == (
        f"its committed entry is damaged (images: {ref.manifest_path} is missing): it is recomputed"
    )
    assert teacher.reason == "its input images comes from a stage that runs first"


def test_cache_ls_verify_and_gc_report_and_collect_damaged_entries(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    good, empty, unmanifested = (_entry(storage, "teach", c * 64) for c in "abc")
    Path(empty, "_ENTRY.json").write_bytes(b"")
    manifest = Path(unmanifested, "attempts", "t", "signals", "_manifest.json")
    manifest.unlink()
    cli = CliRunner()
    listing = cli.invoke(main, ["cache", "ls", "--root", storage.root])
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    assert "DAMAGED: _ENTRY.json does not parse (0 bytes)" in lines[2]
    assert lines[3].endswith(f"DAMAGED: signals: {manifest} is missing")
    assert lines[-1].endswith("3 entries, " + lines[-1].split(", ")[1] + ", 2 damaged")
    verify = cli.invoke(main, ["cache", "verify", "--root", storage.root])
    assert verify.exit_code == 1
    assert verify.output.splitlines() == [
        f"DAMAGED teach {'b' * 12}: damaged entry: _ENTRY.json does not parse (0 bytes): "
        "Expecting value: line 1 column 1 (char 0)",
        f"DAMAGED teach {'c' * 12}: damaged entry: signals: {manifest} is missing",
        "3 entries checked, 2 damaged; 0 damaged shards",
    ]
    everything = {"a" * 64, "b" * 64, "c" * 64}
    assert collect_garbage(storage, everything, min_age_s=HOUR, delete=True) == []  # too young
    for entry in (good, empty, unmanifested):
        _backdate(entry, 2 * HOUR)
    found = collect_garbage(storage, everything, min_age_s=HOUR, delete=True)
    assert [(g.path, g.why.split(":")[0]) for g in found] == [
        (empty, "damaged entry"),
        (unmanifested, "damaged entry"),
    ]
    assert [e.key for e in iter_entries(storage)] == ["a" * 64]


# ------------------------------------------------------------------------------ 4. schemas
def test_the_runner_never_commits_a_shard_of_another_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "init_ray", lambda config, uri: None)
    storage = Storage(str(tmp_path / "root"))
    key = cache_key("teach", teach_table.SCHEMA, {})
    rows = [{"image_id": "a", "height": 4, "width": 4}]
    drifted = pa.Table.from_pylist(rows, teach_table.SIGNALS_SCHEMA).drop_columns(["features"])

    def run(ctx: Context) -> Outcome:
        ref = ctx.dataset("teacher_signals")
        ref.prepare()
        ref.write_table(drifted)
        ref.commit({"schema": teach_table.SCHEMA})
        return Outcome({})

    declared = Declaration("teach", (), ("teacher_signals",), teach_table.SCHEMA)
    stage = Stage(declared, run, lambda ctx: {})
    entry = CacheEntry(storage, "teach", key)
    with pytest.raises(StorageError) as refused:
        commit.execute(stage, _context(storage, "teach", key), entry, {}, _Sink())
    (shard,) = Path(entry.directory).glob("attempts/*/teacher_signals/*.parquet")
    assert str(refused.value) == (
        f"dataset 'teacher_signals': {shard}: schema differs from the expected one: "
        "missing column 'features' (binary)"
    )
    assert entry.load() == (None, None)

    # committed anyway (by older code): verify names the file
    ref = DatasetRef(storage, str(shard.parent), "teacher_signals")
    entry.commit("old", {"outputs": {"teacher_signals": dataset_output(ref)}})
    (found,) = [e for e in iter_entries(storage)]
    assert verify_entry(storage, found) == [
        f"teacher_signals: dataset 'teacher_signals': {shard}: schema differs from the expected "
        "one: missing column 'features' (binary)"
    ]
