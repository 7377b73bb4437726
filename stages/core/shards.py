"""Inference shards: what a worker needs to write and commit a shard of the teach and detect
stages' outputs, shared by every cache key of a family (same model and settings), and the
digests keys are made of. The cache entries themselves live in :mod:`pipeline.cache`.

Layout under the storage root::

    cache/<stage>/pool/<family>/<shard>.parquet     inference shards shared by every key of a
    cache/<stage>/pool/<family>/<shard>.json        family (same model and settings); the shard's
                                                    manifest, created exclusively after its file

Inference shards are committed one by one while a stage runs (file first, then its manifest with
row count, id set and family key), so a killed run leaves them behind and the rerun infers only
the images no committed shard covers; a new key (new images) references the old shards. A
family key covers the stage's output schema version and the package version too, and a shard
must have the stage's Arrow schema to be committed.
"""

from __future__ import annotations

import hashlib
import importlib
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

from stages.core.errors import StorageError
from stages.core.storage import CorruptFile, Storage, check_schema, id_digest

logger = logging.getLogger(__name__)

POOL = "pool"
# The stages that commit inference shards to a pool, and the module holding each one's output
# schema: SCHEMA (its version) and the Arrow schema named here.
POOL_SCHEMAS = {
    "detect": ("stages.detect.table", "DETECTIONS_SCHEMA"),
    "teach": ("stages.teach.table", "SIGNALS_SCHEMA"),
}


@cache
def package_version() -> str:
    try:
        return metadata.version("pseudoflow")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "0+unknown"


def digest_json(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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
