"""The content-addressed cache: stage outputs keyed by what determines them.

Layout under the storage root::

    cache/<stage>/<key>/_ENTRY.json                 the entry's record, created exclusively, last
    cache/<stage>/<key>/attempts/<token>/...        what one writer wrote (datasets, model files)
    cache/<stage>/pool/<family>/<shard>.parquet     inference shards shared by every key of a
    cache/<stage>/pool/<family>/<shard>.json        family (same model and settings); the shard's
                                                    manifest, created exclusively after its file

A key is sha256 over the stage name, its output schema, the package version and the stage's
``fields``: input keys or content digests, model weight digests and the semantic config fields.
Execution-only knobs never enter it.

Commit protocol (no atomic rename needed): every writer writes into its own attempt folder; a
dataset there is committed by its manifest and marker (:class:`DatasetRef`); the entry is committed
by creating ``_ENTRY.json`` only if it does not exist. Of two writers racing on one key, exactly
one creates it; the other deletes its attempt and uses the winner's record. Readers look only at
``_ENTRY.json``, so they never see a half-written entry.

Inference shards are committed one by one while a stage runs (file first, then its manifest with
row count, id set and family key), so a killed run leaves them behind and the rerun infers only
the images no committed shard covers; a new key (new images) references the old shards. A
family key covers the stage's output schema version and the package version too, and a shard
must have the stage's Arrow schema to be committed.

A committed entry is *damaged* when its ``_ENTRY.json`` does not parse or an output it records
(a dataset's manifest and marker, a model file) is missing: it is never reused, and the next
writer of its key replaces it (:meth:`CacheEntry.commit`).

A running attempt keeps ``attempts/<token>/_ALIVE`` fresh (:class:`Heartbeat`); an attempt
whose heartbeat stopped is dead, and a rerun of the same key may take it over (same token, so
its Ray Train run resumes from its checkpoints: :meth:`CacheEntry.take_over`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import posixpath
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.errors import StorageError
from stages.core.storage import CorruptFile, DatasetRef, Storage, check_schema, id_digest

logger = logging.getLogger(__name__)

ENTRY_FILE = "_ENTRY.json"
ATTEMPTS = "attempts"
POOL = "pool"
HEARTBEAT = "_ALIVE"
TAKEN = "_TAKEN-"  # + n + .json: the n-th takeover of a dead attempt
HEARTBEAT_S = 30.0  # how often a running attempt writes its heartbeat
STALE_S = 300.0  # an attempt whose heartbeat is older is dead
# The stages that commit inference shards to a pool, and the module holding each one's output
# schema: SCHEMA (its version) and the Arrow schema named here.
POOL_SCHEMAS = {
    "detect": ("stages.detect", "DETECTIONS_SCHEMA"),
    "teach": ("stages.teach", "SIGNALS_SCHEMA"),
}


class DamagedEntry(StorageError):
    """A committed entry whose record does not parse."""


@cache
def package_version() -> str:
    try:
        return metadata.version("pseudoflow")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "0+unknown"


def digest_json(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(stage: str, schema: str, fields: dict[str, Any]) -> str:
    """sha256 over stage name, output schema, package version and the stage's key fields."""
    return digest_json(
        {"stage": stage, "schema": schema, "version": package_version(), "fields": fields}
    )


def file_digest(fs: Any, path: str) -> str:
    """sha256 of a file's bytes on filesystem ``fs``, read in chunks (model weights)."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def new_token() -> str:
    """A writer's unique name: sortable by time, unguessable suffix."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


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
            "version": package_version(),
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


# --- inference shards ---------------------------------------------------------------------------


def pool_schema(stage: str) -> tuple[str, pa.Schema]:
    """The output schema of a stage that commits shards to a pool: its version and its Arrow
    schema (imported when needed: those stage modules import this one)."""
    if stage not in POOL_SCHEMAS:
        raise ValueError(f"stage {stage!r} has no shard pool; pools: {', '.join(POOL_SCHEMAS)}")
    module, name = POOL_SCHEMAS[stage]
    loaded = importlib.import_module(module)
    return str(loaded.SCHEMA), getattr(loaded, name)


def pool_schemas() -> dict[str, pa.Schema]:
    """Output schema version -> Arrow schema, for every stage that has a shard pool."""
    return dict(pool_schema(stage) for stage in POOL_SCHEMAS)


@dataclass(frozen=True)
class ShardPool:
    """The committed inference shards of one family (stage + model + semantic settings +
    output schema + package version); ``schema``: the Arrow schema every shard must have."""

    storage: Storage
    directory: str
    family: str
    schema: pa.Schema | None = None

    @classmethod
    def of(cls, storage: Storage, stage: str, family: str) -> ShardPool:
        """The pool of ``stage`` for ``family`` (a digest of the model and semantic settings),
        kept apart per output schema version and package version."""
        version, schema = pool_schema(stage)
        key = digest_json({"family": family, "schema": version, "version": package_version()})
        return cls(storage, storage.path("cache", stage, POOL, key), key, schema)

    def committed(self) -> list[dict[str, Any]]:
        """Manifests of the committed shards, oldest first. A manifest whose family differs or
        whose file is missing is skipped (and reported by ``cache verify``)."""
        fs = self.storage.fs
        if not fs.exists(self.directory):
            return []
        shards = []
        for path in sorted(p for p in fs.ls(self.directory, detail=False) if p.endswith(".json")):
            try:
                manifest = self.storage.read_json(path)
            except CorruptFile as exc:
                logger.warning("skipping a damaged shard manifest: %s", exc)
                continue
            if manifest.get("family") != self.family or "file" not in manifest:
                continue
            manifest["path"] = posixpath.join(self.directory, manifest["file"])
            shards.append(manifest)
        shards.sort(key=lambda m: (m["created"], m["file"]))
        return shards

    def cover(self, wanted: set[str]) -> tuple[list[dict[str, Any]], set[str]]:
        """Committed shards whose ids all lie in ``wanted`` (no two overlapping), and the ids
        they leave uncovered: those, and only those, still need inference."""
        chosen: list[dict[str, Any]] = []
        covered: set[str] = set()
        for shard in self.committed():
            ids = set(shard["ids"])
            if ids <= wanted and not ids & covered:
                chosen.append(shard)
                covered |= ids
        return chosen, wanted - covered

    def writer_kwargs(self, token: str) -> dict[str, Any]:
        return {
            "storage_url": self.storage.url,
            "directory": self.directory,
            "family": self.family,
            "token": token,
            "schema": self.schema,
        }


def write_shard(
    table: pa.Table,
    *,
    storage_url: str,
    directory: str,
    family: str,
    token: str,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """Ray Data batch function: write ``table`` as one shard and commit it (file, then manifest
    created exclusively; on a local filesystem the file is fsync'ed first). A table whose
    Arrow schema is not ``schema`` is refused. Returns one row naming the shard."""
    storage = Storage(storage_url)
    name = f"{token}-{secrets.token_hex(6)}"
    path = posixpath.join(directory, f"{name}.parquet")
    if schema is not None:
        check_schema(table.schema, schema, f"shard {path} (family {family[:12]})")
    storage.fs.makedirs(directory, exist_ok=True)
    with storage.fs.open(path, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")
    _check_written(storage, path, table.num_rows)
    storage.sync([path])
    ids = table.column("image_id").to_pylist()
    manifest = {
        "family": family,
        "file": f"{name}.parquet",
        "rows": table.num_rows,
        "ids": sorted(ids),
        "id_digest": id_digest(ids),
        "created": time.time(),
    }
    if not storage.create_exclusive(posixpath.join(directory, f"{name}.json"), manifest):
        raise StorageError(f"shard name collision at {path}")
    return pa.table({"shard": [path], "rows": [table.num_rows]})


def _check_written(storage: Storage, path: str, rows: int) -> None:
    """Read back a shard's footer before its manifest vouches for it: a write that lost its
    tail without an error (no footer, or another row count) is refused, naming the file."""
    try:
        with storage.fs.open(path, "rb") as handle:
            found = pq.ParquetFile(handle).metadata.num_rows
    except (OSError, pa.ArrowInvalid) as exc:
        raise CorruptFile(f"shard {path}: unreadable right after it was written: {exc}") from exc
    if found != rows:
        raise CorruptFile(f"shard {path}: {found} rows right after writing {rows}")
