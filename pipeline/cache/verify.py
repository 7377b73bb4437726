"""``cache verify``: every committed entry and inference shard checked against its record and
manifest, and the repair of a damaged entry."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.entries import (
    CacheEntry,
    Entry,
    children,
    output_dataset,
)
from stages.core.errors import StorageError
from stages.core.shards import POOL, POOL_SCHEMAS, file_digest, pool_schema, pool_schemas
from stages.core.storage import Storage, check_schema, id_digest

logger = logging.getLogger(__name__)


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
        for family in children(storage, storage.path("cache", stage, POOL)):
            for info in children(storage, family["name"]):
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
