"""Looking after the cache: what a run would reuse and why (``plan``), and ``cache ls | verify |
gc``. The entries themselves are written by the runner (:mod:`stages.core.cache`)."""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.graph import Context, all_stages
from stages.core.cache import (
    ATTEMPTS,
    ENTRY_FILE,
    POOL,
    CacheEntry,
    cache_key,
    file_digest,
    output_dataset,
)
from stages.core.storage import Storage, StorageError
from stages.ingest.folder import listing_digest
from stages.ingest.sources import enumerate_source


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    record: dict[str, Any]
    age_s: float


@dataclass(frozen=True)
class PlanRow:
    stage: str
    action: str  # reuse | run | skip
    key: str | None
    reason: str


# --------------------------------------------------------------------------------------- plan
def plan(config: PipelineConfig, root: str) -> list[PlanRow]:
    """For each stage: reuse (the committed key) or run, and why: the config fields or inputs
    that differ from the newest entry of that stage, or the upstream stage that must run first.
    Reads only manifests and records; writes nothing (not even the generated source)."""
    from pipeline.runner import source_folder

    storage = Storage(root)
    folder = source_folder(config, storage, create=False)
    rows: list[PlanRow] = []
    ctx = Context(config, storage, "plan", [])
    if folder is not None:
        items = enumerate_source(config.data, folder)
        ctx.source_digest = listing_digest(folder, items)
    for stage in all_stages(config):
        if not stage.enabled(config):
            rows.append(PlanRow(stage.name, "skip", None, "disabled in the config"))
            continue
        if stage.name == "ingest" and folder is None:
            rows.append(PlanRow(stage.name, "run", None, "the generated source is not written yet"))
            continue
        try:
            fields = stage.fields(ctx)
        except KeyError as missing:
            reason = f"its input {missing.args[0]} comes from a stage that runs first"
            rows.append(PlanRow(stage.name, "run", None, reason))
            continue
        key = cache_key(stage.name, stage.schema, fields)
        ctx.keys[stage.name] = key
        record = CacheEntry(storage, stage.name, key).record()
        if record is None:
            rows.append(PlanRow(stage.name, "run", key, explain(storage, stage.name, fields)))
            continue
        ctx.outputs.update({n: {**o, "key": key} for n, o in record["outputs"].items()})
        rows.append(PlanRow(stage.name, "reuse", key, f"committed {record['created']}"))
    return rows


def explain(storage: Storage, stage: str, fields: dict[str, Any]) -> str:
    """Why ``fields`` miss the cache: how they differ from the newest committed entry."""
    entries = sorted(iter_entries(storage, stage), key=lambda e: e.record["created"])
    if not entries:
        return "no entry of this stage in the cache yet"
    changed = _diff(entries[-1].record["fields"], fields)
    if not changed:
        return "package version changed since the newest entry"
    shown = [f"{k}: {_short(old)} -> {_short(new)}" for k, old, new in changed[:4]]
    more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
    return "changed since the newest entry: " + "; ".join(shown) + more


def _diff(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[tuple]:
    """(dotted key, old, new) for every difference; a section present on one side only is one
    difference, a section on both sides is compared key by key."""
    changed: list[tuple] = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _diff(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append((f"{prefix}{key}", old, new))
    return changed


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{...}"
    text = "(none)" if value is None else str(value)
    return f"{text[:12]}…" if len(text) > 16 else text


# ------------------------------------------------------------------------------------ entries
def iter_entries(storage: Storage, stage: str | None = None) -> Iterator[Entry]:
    """Every committed entry under the root (of one stage, if given), with its age."""
    fs, base = storage.fs, storage.path("cache")
    if not fs.exists(base):
        return
    stage_dirs = [storage.path("cache", stage)] if stage else sorted(fs.ls(base, detail=False))
    for stage_dir in stage_dirs:
        if not fs.exists(stage_dir):
            continue
        stage = posixpath.basename(stage_dir)
        for key_dir in sorted(fs.ls(stage_dir, detail=False)):
            key = posixpath.basename(key_dir)
            if key == POOL:
                continue
            record = CacheEntry(storage, stage, key).record()
            if record is None:
                continue
            created = datetime.fromisoformat(record["created"]).timestamp()
            yield Entry(stage, key, record, time.time() - created)


def entry_files(storage: Storage, record: dict[str, Any]) -> set[str]:
    """The files an entry's outputs consist of (dataset shards anywhere, model files)."""
    files: set[str] = set()
    for name, output in record["outputs"].items():
        if output["kind"] == "model":
            files.add(storage.resolve(output["path"]))
            continue
        ref = output_dataset(storage, name, output)
        files.update(ref.files())
        files.update({ref.manifest_path, ref.marker_path})
    return files


def drop_unused(storage: Storage, ours: set[str], winner: dict[str, Any]) -> list[str]:
    """After losing a commit race: delete the files of our outputs (``ours``, listed before our
    attempt was discarded) that the winner's entry does not use, such as inference shards we
    committed to a pool, so that one copy stays. Returns the deleted paths."""
    unused = sorted(ours - entry_files(storage, winner))
    for path in unused:
        if storage.fs.exists(path):
            storage.fs.rm(path)
            manifest = path.removesuffix(".parquet") + ".json"
            if path.endswith(".parquet") and storage.fs.exists(manifest):
                storage.fs.rm(manifest)
    return unused


def entry_bytes(storage: Storage, record: dict[str, Any]) -> int:
    """An entry's size: its own files plus the shards its datasets reference."""
    total = 0
    for path in entry_files(storage, record):
        try:
            total += int(storage.fs.size(path))
        except FileNotFoundError:
            continue
    return total


# ------------------------------------------------------------------------------------- verify
def verify_entry(storage: Storage, entry: Entry) -> list[str]:
    """Problems of one entry: a shard missing, unreadable or holding other rows/ids than its
    manifest says; a model file missing or with another sha256."""
    problems = []
    for name, output in entry.record["outputs"].items():
        try:
            if output["kind"] == "model":
                path = storage.resolve(output["path"])
                if file_digest(storage.fs, path) != output["sha256"]:
                    problems.append(f"{name}: {path} differs from the recorded sha256")
                continue
            ref = output_dataset(storage, name, output)
            ref.verify(deep=True)
            if ref.manifest()["id_digest"] != output["id_digest"]:
                problems.append(f"{name}: manifest id set differs from the entry's")
        except FileNotFoundError as exc:
            problems.append(f"{name}: missing file {exc.filename or exc}")
        except StorageError as exc:
            problems.append(f"{name}: {exc}")
    return problems


# ----------------------------------------------------------------------------------------- gc
@dataclass(frozen=True)
class Garbage:
    path: str
    bytes: int
    why: str


def collect_garbage(
    storage: Storage, referenced: set[str], *, min_age_s: float, delete: bool
) -> list[Garbage]:
    """What no MLflow run needs any more, deleted only if ``delete``:

    * committed entries whose key no MLflow run is tagged with (``referenced``);
    * attempt folders that are not their entry's committed attempt, older than ``min_age_s``
      (crashed or losing writers);
    * inference shards no kept entry references, older than ``min_age_s`` (younger ones may be
      a running job's progress, or what a killed run's rerun will resume from);
    * Ray Train run folders of entries that are committed or collected.
    """
    now = time.time()
    garbage: list[Garbage] = []
    kept_files: set[str] = set()
    committed: set[tuple[str, str]] = set()
    for entry in iter_entries(storage):
        committed.add((entry.stage, entry.key))
        if entry.key in referenced:
            kept_files |= entry_files(storage, entry.record)
            directory = CacheEntry(storage, entry.stage, entry.key).directory
            garbage += _stale_attempts(storage, directory, entry.record["attempt"], now, min_age_s)
        else:
            directory = CacheEntry(storage, entry.stage, entry.key).directory
            why = "no MLflow run references this entry"
            garbage.append(Garbage(directory, _tree_bytes(storage, directory), why))
    garbage += _unreferenced_shards(storage, kept_files, now, min_age_s)
    garbage += _uncommitted_entries(storage, committed, now, min_age_s)
    garbage += _train_folders(storage, committed)
    if delete:
        for item in garbage:
            if storage.fs.exists(item.path):
                storage.fs.rm(item.path, recursive=True)
    return garbage


def _children(storage: Storage, directory: str) -> list[dict[str, Any]]:
    if not storage.fs.exists(directory):
        return []
    return list(storage.fs.ls(directory, detail=True))


def _tree_bytes(storage: Storage, directory: str) -> int:
    return sum(int(info["size"]) for info in storage.fs.find(directory, detail=True).values())


def _age(storage: Storage, path: str, now: float) -> float:
    """Seconds since the newest file under ``path`` was written."""
    infos = storage.fs.find(path, detail=True, withdirs=False) if storage.fs.isdir(path) else {}
    if not infos:
        infos = {path: storage.fs.info(path)}
    newest = max(_mtime(info) for info in infos.values())
    return now - newest


def _mtime(info: dict[str, Any]) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("created") or 0.0
    return value.timestamp() if isinstance(value, datetime) else float(value)


def _stale_attempts(
    storage: Storage, directory: str, keep: str, now: float, min_age_s: float
) -> list[Garbage]:
    found = []
    for info in _children(storage, posixpath.join(directory, ATTEMPTS)):
        path = info["name"]
        if posixpath.basename(path) != keep and _age(storage, path, now) >= min_age_s:
            found.append(Garbage(path, _tree_bytes(storage, path), "uncommitted attempt"))
    return found


def _unreferenced_shards(
    storage: Storage, kept: set[str], now: float, min_age_s: float
) -> list[Garbage]:
    found = []
    for stage_dir in _children(storage, storage.path("cache")):
        for family in _children(storage, posixpath.join(stage_dir["name"], POOL)):
            for info in _children(storage, family["name"]):
                path = info["name"]
                if not path.endswith(".parquet") or path in kept:
                    continue
                if _age(storage, path, now) < min_age_s:
                    continue
                manifest = path.removesuffix(".parquet") + ".json"
                size = int(info["size"])
                found.append(Garbage(path, size, "shard no kept entry references"))
                if storage.fs.exists(manifest):
                    found.append(Garbage(manifest, 0, "its shard is collected"))
    return found


def _uncommitted_entries(
    storage: Storage, committed: set[tuple[str, str]], now: float, min_age_s: float
) -> list[Garbage]:
    found = []
    for stage_dir in _children(storage, storage.path("cache")):
        stage = posixpath.basename(stage_dir["name"])
        for info in _children(storage, stage_dir["name"]):
            key = posixpath.basename(info["name"])
            if key == POOL or (stage, key) in committed:
                continue
            if storage.fs.exists(posixpath.join(info["name"], ENTRY_FILE)):
                continue  # committed since the listing
            if _age(storage, info["name"], now) >= min_age_s:
                size = _tree_bytes(storage, info["name"])
                found.append(Garbage(info["name"], size, "entry never committed"))
    return found


def _train_folders(storage: Storage, committed: set[tuple[str, str]]) -> list[Garbage]:
    """Ray Train folders ``<stage>-<key[:16]>`` of committed entries: the model is in the entry."""
    prefixes = {f"{stage}-{key[:16]}" for stage, key in committed}
    found = []
    for info in _children(storage, storage.path("ray_train")):
        if posixpath.basename(info["name"]) in prefixes:
            size = _tree_bytes(storage, info["name"])
            found.append(Garbage(info["name"], size, "training finished and committed"))
    return found


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def human_age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{seconds:.0f}s"
