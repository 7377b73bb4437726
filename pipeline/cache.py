"""Looking after the cache: what a run would reuse and why (``plan``), and ``cache ls | verify |
gc``. The entries themselves are written by the runner (:mod:`stages.core.cache`).

``gc`` asks MLflow which keys runs still reference. It reads the tracking store each pipeline run
under the root recorded (``pipelines/<run_id>/tracking.json``, credentials masked) unless one is
given, never creates a store (a SQLite or file store that does not exist is an error), and
refuses a store that holds no pseudoflow runs while the root holds pipeline runs that logged to
it: a mistyped URI would otherwise make every entry garbage.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.config import PipelineConfig
from pipeline.graph import Context, all_stages
from pipeline.redact import MASK, redact
from pipeline.source import source_folder
from stages.core.cache import (
    ATTEMPTS,
    ENTRY_FILE,
    POOL,
    POOL_SCHEMAS,
    CacheEntry,
    cache_key,
    file_digest,
    modified,
    output_dataset,
    output_files,
    pool_schema,
    pool_schemas,
)
from stages.core.errors import StorageError
from stages.core.storage import Storage, check_schema, id_digest
from stages.ingest.folder import listing_digest
from stages.ingest.sources import enumerate_source


@dataclass(frozen=True)
class Entry:
    """A committed entry; ``damage`` says why it cannot be reused (then ``record`` may be
    empty: its ``_ENTRY.json`` did not parse)."""

    stage: str
    key: str
    record: dict[str, Any]
    age_s: float
    damage: str | None = None


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
        record, damage = CacheEntry(storage, stage.name, key).load()
        if damage is not None:
            reason = f"its committed entry is damaged ({damage}): it is recomputed"
            rows.append(PlanRow(stage.name, "run", key, reason))
            continue
        if record is None:
            rows.append(PlanRow(stage.name, "run", key, explain(storage, stage.name, fields)))
            continue
        ctx.outputs.update({n: {**o, "key": key} for n, o in record["outputs"].items()})
        rows.append(PlanRow(stage.name, "reuse", key, f"committed {record['created']}"))
    return rows


def explain(storage: Storage, stage: str, fields: dict[str, Any]) -> str:
    """Why ``fields`` miss the cache: how they differ from the newest committed entry."""
    usable = (e for e in iter_entries(storage, stage) if e.damage is None)
    entries = sorted(usable, key=lambda e: e.record["created"])
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
    """Every committed entry under the root (of one stage, if given), with its age; a damaged
    one (see :meth:`CacheEntry.load`) comes with its ``damage``."""
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
            entry = CacheEntry(storage, stage, key)
            record, damage = entry.load()
            if record is None and damage is None:
                continue
            try:
                assert record is not None
                created = datetime.fromisoformat(record["created"]).timestamp()
            except (AssertionError, KeyError, TypeError, ValueError):
                try:
                    created = modified(fs.info(entry.record_path))
                except FileNotFoundError:  # removed since the listing
                    continue
            yield Entry(stage, key, record or {}, time.time() - created, damage)


def entry_files(storage: Storage, record: dict[str, Any]) -> set[str]:
    """The files an entry's outputs consist of (dataset shards anywhere, model files)."""
    return output_files(storage, record["outputs"])


def _committed_files(storage: Storage) -> set[str]:
    """Every file any usable committed entry under the root references."""
    files: set[str] = set()
    for entry in iter_entries(storage):
        if entry.damage is None:
            try:
                files |= entry_files(storage, entry.record)
            except (FileNotFoundError, StorageError):
                continue  # damaged since it was read: it protects nothing
    return files


def drop_unused(storage: Storage, ours: set[str], winner: dict[str, Any]) -> list[str]:
    """After losing a commit race: delete the files of our outputs (``ours``, listed before our
    attempt was discarded) that no committed entry uses (the winner's, or any other key's that
    reuses a pool shard we wrote), such as inference shards we committed to a pool, so that one
    copy stays. Returns the deleted paths."""
    unused = sorted(ours - entry_files(storage, winner) - _committed_files(storage))
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
    """Problems of one entry: its record unreadable or an output's manifest missing (damaged);
    a shard missing, unreadable, holding other rows/ids than its manifest says or (for an
    inference stage's output) another Arrow schema than the stage's; a model file missing or
    with another sha256."""
    if entry.damage is not None:
        return [f"damaged entry: {entry.damage}"]
    problems = []
    expected = pool_schemas()
    for name, output in entry.record["outputs"].items():
        try:
            if output["kind"] == "model":
                path = storage.resolve(output["path"])
                if file_digest(storage.fs, path) != output["sha256"]:
                    problems.append(f"{name}: {path} differs from the recorded sha256")
                continue
            ref = output_dataset(storage, name, output)
            ref.verify(deep=True, schema=expected.get(output.get("schema") or ""))
            if ref.manifest()["id_digest"] != output["id_digest"]:
                problems.append(f"{name}: manifest id set differs from the entry's")
        except FileNotFoundError as exc:
            problems.append(f"{name}: missing file {exc.filename or exc}")
        except StorageError as exc:
            problems.append(f"{name}: {exc}")
    return problems


@dataclass(frozen=True)
class PoolProblem:
    """A committed inference shard (``manifest``: its ``.json``) that cannot be trusted."""

    stage: str
    manifest: str
    problem: str


def verify_pools(storage: Storage) -> list[PoolProblem]:
    """Every committed shard of every shard pool against its manifest: the manifest parses,
    the file is there, readable, with the stage's Arrow schema and the manifest's rows and ids.
    A damaged shard would otherwise be reused by the next run over the same images."""
    problems = []
    for stage in POOL_SCHEMAS:
        schema = pool_schema(stage)[1]
        for family in _children(storage, storage.path("cache", stage, POOL)):
            for info in _children(storage, family["name"]):
                path = info["name"]
                if path.endswith(".json"):
                    problem = _shard_problem(storage, path, schema)
                    if problem is not None:
                        problems.append(PoolProblem(stage, path, problem))
    return problems


def _shard_problem(storage: Storage, manifest_path: str, schema: Any) -> str | None:
    try:
        manifest = storage.read_json(manifest_path)
        path = posixpath.join(posixpath.dirname(manifest_path), manifest["file"])
        with storage.fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            check_schema(parquet.schema_arrow, schema, f"shard {path}")
            ids = parquet.read(columns=["image_id"]).column(0).to_pylist()
    except FileNotFoundError as exc:
        return f"missing file {exc.filename or exc}"
    except (KeyError, TypeError, OSError, pa.ArrowInvalid, StorageError) as exc:
        return f"unreadable: {exc}"
    if len(ids) != manifest.get("rows") or id_digest(ids) != manifest.get("id_digest"):
        return f"shard {path} holds {len(ids)} rows or ids other than its manifest's"
    return None


@dataclass(frozen=True)
class Repair:
    """What ``cache verify --repair`` removed: a damaged entry's record (the next run
    recomputes the entry) or a damaged shard (the next run infers its images again)."""

    path: str
    why: str


def repair(
    storage: Storage, entries: dict[tuple[str, str], list[str]], shards: list[PoolProblem]
) -> list[Repair]:
    """Uncommit what verification found damaged, so that nothing reuses it and the next run
    recomputes it: each damaged shard's manifest first (then its file), then each damaged
    entry's ``_ENTRY.json`` (its files stay until ``cache gc``). Entries are given as
    ``(stage, key) -> problems``."""
    removed = []
    for shard in shards:
        data = shard.manifest.removesuffix(".json") + ".parquet"
        for path in (shard.manifest, data):
            if storage.fs.exists(path):
                storage.fs.rm_file(path)
                removed.append(Repair(path, f"damaged {shard.stage} shard: {shard.problem}"))
    for (stage, key), problems in entries.items():
        record = CacheEntry(storage, stage, key).record_path
        if problems and storage.fs.exists(record):
            storage.fs.rm_file(record)
            removed.append(Repair(record, f"damaged {stage} entry: {problems[0]}"))
    return removed


# ------------------------------------------------------------------------------ output checks
def check_output_schemas(storage: Storage, outputs: dict[str, dict[str, Any]]) -> None:
    """Before an entry is committed: every shard of an inference stage's dataset output must
    have the stage's Arrow schema (footers only); raises :class:`StorageError` naming the file."""
    expected = pool_schemas()
    for name, output in outputs.items():
        schema = expected.get(output.get("schema") or "")
        if output["kind"] == "dataset" and schema is not None:
            output_dataset(storage, name, output).verify(schema=schema)


# ----------------------------------------------------------------------------------- tracking
TRACKING_FILE = "tracking.json"


class TrackingError(ValueError):
    """gc cannot trust the tracking store it would read: nothing is collected."""


def tracking_record(uri: str, root: str) -> dict[str, Any]:
    """What a pipeline run stores about its tracking store: the URI (a password or secret query
    value masked, :func:`pipeline.redact.redact`), and whether it is the default SQLite file
    under the root ``root`` (which moves with the root)."""
    from pipeline.tracking import local_uri

    shown = redact(uri)
    return {
        "uri": shown,
        "credentials_removed": shown != uri,
        "under_root": "://" not in root and uri == local_uri(root),
    }


def _pipeline_runs(storage: Storage) -> list[str]:
    base = storage.path("pipelines")
    if not storage.fs.exists(base):
        return []
    return sorted(
        posixpath.basename(i["name"]) for i in _children(storage, base) if i["type"] == "directory"
    )


def _recorded_uri(storage: Storage, run_id: str) -> tuple[str | None, bool]:
    """The tracking URI pipeline run ``run_id`` recorded (``tracking.json``; a run from before
    that file existed: its config's ``tracking.uri``), and whether credentials were removed.
    The default SQLite file under the root is the one under the root as it is now (a copied or
    moved root brings its store along)."""
    from pipeline.tracking import local_uri

    try:
        recorded = storage.read_json(storage.path("pipelines", run_id, TRACKING_FILE))
    except FileNotFoundError:
        recorded = None
    if recorded is not None:
        if recorded.get("under_root") and storage.is_local:
            return local_uri(storage.root), False
        return str(recorded["uri"]), bool(recorded.get("credentials_removed"))
    try:
        config = yaml.safe_load(
            storage.read_bytes(storage.path("pipelines", run_id, "config.yaml"))
        )
    except FileNotFoundError:
        return None, False
    uri = ((config or {}).get("tracking") or {}).get("uri")
    if not uri:
        return None, False
    return str(uri), MASK in str(uri)  # configs are stored redacted


def gc_tracking_uris(storage: Storage, given: str | None) -> dict[str, list[str]]:
    """The tracking stores gc must read -> the pipeline runs under the root that logged there:
    ``given`` for all of them, else the URI each run recorded, else (a run that recorded none,
    or no run at all) ``MLFLOW_TRACKING_URI`` or the SQLite file under a local root."""
    from pipeline.tracking import local_uri

    runs = _pipeline_runs(storage)
    if given is not None:
        return {given: runs}
    env = os.environ.get("MLFLOW_TRACKING_URI")
    fallback = env or (local_uri(storage.root) if storage.is_local else None)
    uris: dict[str, list[str]] = {}
    for run_id in runs:
        uri, redacted = _recorded_uri(storage, run_id)
        if uri is not None and redacted:
            if env is None or redact(env) != uri:
                raise TrackingError(
                    f"pipeline run {run_id} logged to {uri}, whose credentials are not stored: "
                    "pass --tracking-uri (or set MLFLOW_TRACKING_URI) with them"
                )
            uri = env
        uri = uri or fallback
        if uri is None:
            raise TrackingError(
                f"pipeline run {run_id} recorded no tracking URI and the root is remote: "
                "pass --tracking-uri"
            )
        uris.setdefault(uri, []).append(run_id)
    if not uris:
        if fallback is None:
            raise TrackingError("a remote root needs --tracking-uri")
        uris[fallback] = []
    return uris


def check_tracking_store(uri: str) -> None:
    """Refuse a store gc would create by reading it: a SQLite file or a file store (local
    folder) that does not exist, or an in-memory database."""
    shown = redact(uri)
    scheme = urlsplit(uri).scheme
    if scheme == "sqlite":
        path = uri.removeprefix("sqlite:///").split("?", 1)[0]
        if uri in {"sqlite://", "sqlite:///"} or path in {"", ":memory:"}:
            raise TrackingError(
                f"tracking store {shown} is an in-memory database: it holds no runs"
            )
        if not os.path.isfile(path):
            raise TrackingError(
                f"tracking store {shown}: the SQLite file {path} does not exist (gc never creates "
                "a tracking store); pass the --tracking-uri the runs logged to"
            )
    elif scheme in {"", "file"}:
        path = urlsplit(uri).path if scheme else uri
        if not os.path.isdir(path):
            raise TrackingError(
                f"tracking store {shown}: the folder {path} does not exist (gc never creates a "
                "tracking store); pass the --tracking-uri the runs logged to"
            )


def gc_references(
    storage: Storage, given: str | None = None, *, allow_empty: bool = False
) -> set[str]:
    """The cache keys MLflow runs reference, read from the stores of :func:`gc_tracking_uris`
    (each checked by :func:`check_tracking_store`). A store holding no pseudoflow run while
    pipeline runs under the root logged there (any run, for ``given``) raises
    :class:`TrackingError` unless ``allow_empty``."""
    from pipeline.tracking import referenced_keys

    keys: set[str] = set()
    for uri, runs in gc_tracking_uris(storage, given).items():
        check_tracking_store(uri)
        try:
            found = referenced_keys(uri)
        except Exception as exc:  # the store's own error, without the URI's credentials
            message = redact(str(exc).replace(uri, redact(uri)))
            raise TrackingError(f"tracking store {redact(uri)}: {message}") from exc
        if not found and runs and not allow_empty:
            shown = ", ".join(runs[:3]) + (f" (+{len(runs) - 3} more)" if len(runs) > 3 else "")
            raise TrackingError(
                f"tracking store {redact(uri)} holds no pseudoflow runs, but {len(runs)} "
                f"pipeline runs under the root logged there ({shown}): refusing to treat every "
                "entry as garbage. Check the URI, or pass --allow-empty-tracking if those runs "
                "were deleted on purpose"
            )
        keys |= found
    return keys


# ----------------------------------------------------------------------------------------- gc
@dataclass(frozen=True)
class Garbage:
    path: str
    bytes: int
    why: str


def collect_garbage(
    storage: Storage, referenced: set[str], *, min_age_s: float, delete: bool
) -> list[Garbage]:
    """What no MLflow run needs any more, deleted only if ``delete``; nothing written less than
    ``min_age_s`` ago goes (a running job may be using or writing it):

    * committed entries whose key no MLflow run is tagged with (``referenced``);
    * damaged entries (they are never reused);
    * attempt folders that are not their entry's committed attempt (crashed or losing writers);
    * inference shards no kept entry references (younger ones may be a running job's progress,
      or what a killed run's rerun will resume from);
    * Ray Train run folders of entries that are committed or collected.
    """
    now = time.time()
    garbage: list[Garbage] = []
    kept_files: set[str] = set()
    committed: set[tuple[str, str]] = set()
    for entry in iter_entries(storage):
        committed.add((entry.stage, entry.key))
        directory = CacheEntry(storage, entry.stage, entry.key).directory
        young = _age(storage, directory, now) < min_age_s
        if entry.damage is not None:
            if not young:
                why = f"damaged entry: {entry.damage}"
                garbage.append(Garbage(directory, _tree_bytes(storage, directory), why))
        elif entry.key in referenced or young:
            kept_files |= entry_files(storage, entry.record)
            garbage += _stale_attempts(storage, directory, entry.record["attempt"], now, min_age_s)
        else:
            why = "no MLflow run references this entry"
            garbage.append(Garbage(directory, _tree_bytes(storage, directory), why))
    garbage += _unreferenced_shards(storage, kept_files, now, min_age_s)
    garbage += _uncommitted_entries(storage, committed, now, min_age_s)
    garbage += _train_folders(storage, committed, now, min_age_s)
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
    return modified(info)


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


def _train_folders(
    storage: Storage, committed: set[tuple[str, str]], now: float, min_age_s: float
) -> list[Garbage]:
    """Ray Train folders ``<stage>-<key[:16]>_<attempt>`` (or, from older runs, without the
    attempt) of committed entries, older than ``min_age_s``: the model is in the entry (a
    younger one may be a losing attempt still training)."""
    prefixes = {f"{stage}-{key[:16]}" for stage, key in committed}
    found = []
    for info in _children(storage, storage.path("ray_train")):
        stage, _, rest = posixpath.basename(info["name"]).partition("-")
        if f"{stage}-{rest[:16]}" not in prefixes:
            continue
        if _age(storage, info["name"], now) >= min_age_s:
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
