"""A stage output under its key: the key, the committed entry and its record, its outputs, the
attempt folders and their heartbeats."""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from stages.core import shards
from stages.core.errors import StorageError
from stages.core.shards import POOL, file_digest
from stages.core.storage import DatasetRef, Storage

logger = logging.getLogger(__name__)


ENTRY_FILE = "_ENTRY.json"


ATTEMPTS = "attempts"


HEARTBEAT = "_ALIVE"


TAKEN = "_TAKEN-"  # + n + .json: the n-th takeover of a dead attempt


HEARTBEAT_S = 30.0  # how often a running attempt writes its heartbeat


STALE_S = 300.0  # an attempt whose heartbeat is older is dead


class DamagedEntry(StorageError):
    """A committed entry whose record does not parse."""


def cache_key(stage: str, schema: str, fields: dict[str, Any]) -> str:
    """sha256 over stage name, output schema, package version and the stage's key fields."""
    return shards.digest_json(
        {"stage": stage, "schema": schema, "version": shards.package_version(), "fields": fields}
    )


@dataclass(frozen=True)
class CacheEntry:
    """One stage output under one key."""

    storage: Storage
    stage: str
    key: str

    @property
    def directory(self) -> str:
        return self.storage.path("cache", self.stage, self.key)

    @property
    def record_path(self) -> str:
        return posixpath.join(self.directory, ENTRY_FILE)

    def record(self) -> dict[str, Any] | None:
        """The committed record, or ``None`` when nothing is committed under this key; raises
        :class:`DamagedEntry` when the record does not parse."""
        record, damage = self._read()
        if record is None and damage is not None:
            raise DamagedEntry(f"{self.record_path}: {damage}")
        return record

    def load(self) -> tuple[dict[str, Any] | None, str | None]:
        """``(record, damage)``: ``(None, None)`` when nothing is committed; the record and
        ``None`` when it can be reused; else why it is damaged (its record does not parse, or
        an output it records is missing), with the record if it parsed."""
        record, damage = self._read()
        if record is not None and damage is None:
            damage = record_damage(self.storage, record)
        return record, damage

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            data = self.storage.read_bytes(self.record_path)
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(data)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            return None, f"{ENTRY_FILE} does not parse ({len(data)} bytes): {exc}"
        if not isinstance(record, dict):
            return None, f"{ENTRY_FILE} holds a {type(record).__name__}, not a record"
        return record, None

    def attempt_dir(self, token: str) -> str:
        return self.storage.path("cache", self.stage, self.key, ATTEMPTS, token)

    def heartbeat_path(self, token: str) -> str:
        return posixpath.join(self.attempt_dir(token), HEARTBEAT)

    def commit(self, token: str, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the record unless another writer committed first. Returns the record now in
        force and whether it is ours; a losing writer's attempt folder is deleted. A damaged
        record in the way is replaced (its attempt's files are left to ``cache gc``). On a local
        filesystem every file the outputs consist of is fsync'ed first."""
        full = {
            **record,
            "stage": self.stage,
            "key": self.key,
            "attempt": token,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": shards.package_version(),
        }
        self.storage.sync(output_files(self.storage, full.get("outputs", {})))
        for _ in range(3):
            if self.storage.create_exclusive(self.record_path, full):
                return full, True
            winner, damage = self.load()
            if winner is not None and damage is None:
                logger.info(
                    "%s %s: another run committed first; using its output", self.stage, self.key
                )
                self.discard(token)
                return winner, False
            if damage is not None:
                logger.warning(
                    "%s %s: replacing the damaged committed entry (%s)",
                    self.stage,
                    self.key,
                    damage,
                )
                # another writer may have removed it first: the next try sees its record
                with contextlib.suppress(FileNotFoundError):
                    self.storage.fs.rm(self.record_path)
        raise StorageError(f"{self.record_path}: could not commit; it keeps changing under us")

    def take_over(self, resumable: Callable[[str], bool], stale_s: float = STALE_S) -> str | None:
        """The token of a dead attempt of this key (no heartbeat for ``stale_s``) for which
        ``resumable(token)`` holds, newest first, claimed for the caller (one claimer wins);
        ``None`` when there is none. The caller must keep its heartbeat fresh from then on."""
        fs = self.storage.fs
        base = self.storage.path("cache", self.stage, self.key, ATTEMPTS)
        if not fs.exists(base):
            return None
        now = time.time()
        for folder in sorted(fs.ls(base, detail=False), reverse=True):
            token = posixpath.basename(folder)
            if not resumable(token):
                continue
            infos = fs.find(folder, detail=True, withdirs=False)
            alive = [i for p, i in infos.items() if _is_liveness(posixpath.basename(p))]
            newest = max((modified(i) for i in alive or infos.values()), default=0.0)
            if now - newest < stale_s:
                continue  # alive, or taken over a moment ago
            taken = sum(posixpath.basename(p).startswith(TAKEN) for p in infos)
            claim = posixpath.join(folder, f"{TAKEN}{taken}.json")
            if self.storage.create_exclusive(claim, {"at": now}):
                return token
        return None

    def discard(self, token: str) -> None:
        path = self.attempt_dir(token)
        if self.storage.fs.exists(path):
            self.storage.fs.rm(path, recursive=True)


def _is_liveness(name: str) -> bool:
    return name == HEARTBEAT or name.startswith(TAKEN)


def modified(info: dict[str, Any]) -> float:
    """A file's modification time (epoch seconds) from an fsspec ``info`` dict."""
    value = info.get("mtime") or info.get("LastModified") or info.get("created") or 0.0
    return value.timestamp() if isinstance(value, datetime) else float(value)


class Heartbeat:
    """While in its ``with`` block, rewrite ``path`` every ``interval`` seconds (a thread), so
    that a running attempt is never taken for a dead one."""

    def __init__(self, storage: Storage, path: str, interval: float = HEARTBEAT_S):
        self.storage, self.path, self.interval = storage, path, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="attempt-heartbeat", daemon=True)

    def _write(self) -> None:
        self.storage.write_bytes(self.path, f"{time.time():.3f}\n".encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write()
            except Exception as exc:  # a missed beat must not end the run
                logger.warning("heartbeat %s not written: %s", self.path, exc)

    def __enter__(self) -> Heartbeat:
        self._write()
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


def record_damage(storage: Storage, record: dict[str, Any]) -> str | None:
    """Why a parsed record cannot be reused (a field or an output's committed files are
    missing, or a manifest does not parse), or ``None``. Cheap: no shard is opened."""
    missing = [f for f in ("outputs", "attempt", "created") if f not in record]
    if missing or not isinstance(record.get("outputs"), dict):
        return f"{ENTRY_FILE} lacks {', '.join(missing) or 'an outputs mapping'}"
    fs = storage.fs
    for name, output in record["outputs"].items():
        try:
            if output["kind"] == "model":
                path = storage.resolve(output["path"])
                if not fs.exists(path):
                    return f"{name}: model file {path} is missing"
                continue
            ref = output_dataset(storage, name, output)
            for path in (ref.manifest_path, ref.marker_path):
                if not fs.exists(path):
                    return f"{name}: {path} is missing"
            ref.manifest()
        except (KeyError, TypeError, ValueError) as exc:  # ValueError: JSON, unsafe path
            return f"{name}: its record or manifest is unreadable: {exc!r}"
    return None


def output_files(storage: Storage, outputs: dict[str, Any]) -> set[str]:
    """The files recorded outputs consist of: model files; a dataset's shards (wherever they
    lie), manifest and marker."""
    files: set[str] = set()
    for name, output in outputs.items():
        if output["kind"] == "model":
            files.add(storage.resolve(output["path"]))
            continue
        ref = output_dataset(storage, name, output)
        files.update(ref.files())
        files.update({ref.manifest_path, ref.marker_path})
    return files


def dataset_output(ref: DatasetRef, **extra: Any) -> dict[str, Any]:
    """A committed dataset as recorded in an entry."""
    manifest = ref.manifest()
    return {
        "kind": "dataset",
        "directory": ref.storage.relative(ref.directory),
        "rows": manifest["rows"],
        "id_digest": manifest["id_digest"],
        "schema": manifest.get("schema"),
        **extra,
    }


def model_output(storage: Storage, path: str) -> dict[str, Any]:
    return {
        "kind": "model",
        "path": storage.relative(path),
        "sha256": file_digest(storage.fs, path),
        "bytes": int(storage.fs.size(path)),
    }


def output_dataset(storage: Storage, name: str, output: dict[str, Any]) -> DatasetRef:
    """The dataset an entry recorded, for reading."""
    return DatasetRef(storage, storage.resolve(output["directory"]), name)


@dataclass(frozen=True)
class Entry:
    """A committed entry; ``damage`` says why it cannot be reused (then ``record`` may be
    empty: its ``_ENTRY.json`` did not parse)."""

    stage: str
    key: str
    record: dict[str, Any]
    age_s: float
    damage: str | None = None


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


def children(storage: Storage, directory: str) -> list[dict[str, Any]]:
    """The entries (``ls`` with details) of ``directory``; none where it does not exist."""
    if not storage.fs.exists(directory):
        return []
    return list(storage.fs.ls(directory, detail=True))
