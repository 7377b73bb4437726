"""``cache gc``: what no run references any more, and the tracking stores that say so. The
entries themselves are committed by :mod:`pipeline.cache.commit`.

``gc`` asks MLflow which keys runs still reference. It reads the tracking store each pipeline run
under the root recorded (``pipelines/<run_id>/tracking.json``, credentials masked) unless one is
given, never creates a store (a SQLite or file store that does not exist is an error), and
refuses a store that holds no pseudoflow runs while the root holds pipeline runs that logged to
it: a mistyped URI would otherwise make every entry garbage."""

from __future__ import annotations

import logging
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from pipeline.cache.entries import (
    ATTEMPTS,
    ENTRY_FILE,
    CacheEntry,
    children,
    entry_files,
    iter_entries,
    modified,
)
from pipeline.redact import MASK, redact
from pipeline.tracking import (
    local_uri,
)
from stages.core.shards import POOL
from stages.core.storage import Storage

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- tracking
TRACKING_FILE = "tracking.json"


class TrackingError(ValueError):
    """gc cannot trust the tracking store it would read: nothing is collected."""


def tracking_record(uri: str, root: str) -> dict[str, Any]:
    """What a pipeline run stores about its tracking store: the URI (a password or secret query
    value masked, :func:`pipeline.redact.redact`), and whether it is the default SQLite file
    under the root ``root`` (which moves with the root)."""

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
        posixpath.basename(i["name"]) for i in children(storage, base) if i["type"] == "directory"
    )


def _recorded_uri(storage: Storage, run_id: str) -> tuple[str | None, bool]:
    """The tracking URI pipeline run ``run_id`` recorded (``tracking.json``; a run from before
    that file existed: its config's ``tracking.uri``), and whether credentials were removed.
    The default SQLite file under the root is the one under the root as it is now (a copied or
    moved root brings its store along)."""

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
    for info in children(storage, posixpath.join(directory, ATTEMPTS)):
        path = info["name"]
        if posixpath.basename(path) != keep and _age(storage, path, now) >= min_age_s:
            found.append(Garbage(path, _tree_bytes(storage, path), "uncommitted attempt"))
    return found


def _unreferenced_shards(
    storage: Storage, kept: set[str], now: float, min_age_s: float
) -> list[Garbage]:
    found = []
    for stage_dir in children(storage, storage.path("cache")):
        for family in children(storage, posixpath.join(stage_dir["name"], POOL)):
            for info in children(storage, family["name"]):
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
    for stage_dir in children(storage, storage.path("cache")):
        stage = posixpath.basename(stage_dir["name"])
        for info in children(storage, stage_dir["name"]):
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
    for info in children(storage, storage.path("ray_train")):
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
