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
the images no committed shard covers; a new key (new images) references the old shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.storage import DatasetRef, Storage, StorageError, id_digest

logger = logging.getLogger(__name__)

ENTRY_FILE = "_ENTRY.json"
ATTEMPTS = "attempts"
POOL = "pool"


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
        """The committed record, or ``None`` when nothing is committed under this key."""
        try:
            return self.storage.read_json(self.record_path)
        except FileNotFoundError:
            return None

    def attempt_dir(self, token: str) -> str:
        return self.storage.path("cache", self.stage, self.key, ATTEMPTS, token)

    def commit(self, token: str, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the record unless another writer committed first. Returns the record now in
        force and whether it is ours; a losing writer's attempt folder is deleted."""
        full = {
            **record,
            "stage": self.stage,
            "key": self.key,
            "attempt": token,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": package_version(),
        }
        if self.storage.create_exclusive(self.record_path, full):
            return full, True
        logger.info("%s %s: another run committed first; using its output", self.stage, self.key)
        self.discard(token)
        winner = self.record()
        if winner is None:
            raise StorageError(f"{self.record_path}: exists but cannot be read")
        return winner, False

    def discard(self, token: str) -> None:
        path = self.attempt_dir(token)
        if self.storage.fs.exists(path):
            self.storage.fs.rm(path, recursive=True)


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


@dataclass(frozen=True)
class ShardPool:
    """The committed inference shards of one family (stage + model + semantic settings)."""

    storage: Storage
    directory: str
    family: str

    @classmethod
    def of(cls, storage: Storage, stage: str, family: str) -> ShardPool:
        return cls(storage, storage.path("cache", stage, POOL, family), family)

    def committed(self) -> list[dict[str, Any]]:
        """Manifests of the committed shards, oldest first. A manifest whose family differs or
        whose file is missing is skipped (and reported by ``cache verify``)."""
        fs = self.storage.fs
        if not fs.exists(self.directory):
            return []
        shards = []
        for path in sorted(p for p in fs.ls(self.directory, detail=False) if p.endswith(".json")):
            manifest = self.storage.read_json(path)
            if manifest.get("family") != self.family:
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
        }


def write_shard(
    table: pa.Table, *, storage_url: str, directory: str, family: str, token: str
) -> pa.Table:
    """Ray Data batch function: write ``table`` as one shard and commit it (file, then manifest
    created exclusively). Returns one row naming the shard."""
    storage = Storage(storage_url)
    name = f"{token}-{secrets.token_hex(6)}"
    path = posixpath.join(directory, f"{name}.parquet")
    storage.fs.makedirs(directory, exist_ok=True)
    with storage.fs.open(path, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")
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
