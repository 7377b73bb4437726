"""One storage root (an fsspec URL) holding datasets of Parquet shards with manifests.

A dataset is a directory with ``_manifest.json`` (its Parquet files as paths relative to the
storage root, row counts, a digest of the sorted image ids) and a ``_COMMITTED`` marker written
last. The files usually sit in the dataset's directory; a dataset assembled from cached shards
lists shards elsewhere under the root. Readers trust only committed datasets whose manifest
matches the shards; a file's mere existence proves nothing. Every path is built from validated
parts (manifest paths are checked too), so nothing taken from data can escape the root.

Nothing here needs an atomic rename: a single object written in one call is atomic on object
stores, local files are written to a temporary name and renamed, and "create only if absent"
(:meth:`Storage.create_exclusive`) decides races between writers of the same entry.

Durability on local filesystems: what a commit marker vouches for (shards, the manifest) is
fsync'ed, file and directory, before the marker is written (:meth:`Storage.sync`), so that a
crash of the machine never leaves a marker over data the disk does not hold yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from stages.core.errors import StorageError

logger = logging.getLogger(__name__)

# ``faults://``: a local folder that fails on purpose (stages.core.faults), known to every process
# that touches storage, Ray workers included.
fsspec.register_implementation("faults", "stages.core.faults.FaultyFileSystem", clobber=True)

MANIFEST = "_manifest.json"
COMMITTED = "_COMMITTED"
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.=+-]+$")


class CorruptFile(StorageError, ValueError):
    """A stored file that does not parse (a torn or truncated write): named, never trusted."""


def id_digest(image_ids: Iterable[str]) -> str:
    """sha256 over the sorted, newline-joined ids: equal digests mean equal id sets."""
    digest = hashlib.sha256()
    for image_id in sorted(image_ids):
        digest.update(image_id.encode() + b"\n")
    return digest.hexdigest()


def _check_part(part: str) -> str:
    if not _SAFE_PART.match(part) or part in {".", ".."}:
        raise ValueError(f"unsafe path component {part!r}: use letters, digits and _ . = + - only")
    return part


@dataclass(frozen=True)
class Storage:
    """The storage root: ``url`` is a local folder or an fsspec URL such as ``s3://bucket/prefix``."""

    url: str

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.url)[0]

    @property
    def root(self) -> str:
        """The root as a path inside :attr:`fs` (absolute for local folders)."""
        fs, path = fsspec.core.url_to_fs(self.url)
        return str(fs._strip_protocol(path)).rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        """Paths are this machine's files (``file``, or a local filesystem under another
        protocol such as ``faults``): fsync and hard links apply."""
        fs = self.fs
        return "file" in _protocols(fs) or isinstance(fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """A path below the root; each part must be a plain name (no separators, no ``..``)."""
        return posixpath.join(self.root, *(_check_part(p) for p in parts))

    def arrow_fs(self) -> pafs.FileSystem:
        """A pyarrow filesystem over the same root, for pyarrow and Ray Data readers/writers."""
        if type(self.fs) is LocalFileSystem:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def relative(self, path: str) -> str:
        """``path`` (inside the root) as a root-relative path, as manifests store it."""
        rel = posixpath.relpath(path, self.root)
        self.resolve(rel)  # refuses anything that would leave the root
        return rel

    def resolve(self, relative: str) -> str:
        """A root-relative path read from a manifest -> a path inside the root (checked)."""
        return self.path(*relative.split("/"))

    def sync(self, paths: Iterable[str]) -> None:
        """Make ``paths`` (files) durable before something that vouches for them is written:
        on a local filesystem each file and each of their directories is fsync'ed; on an object
        store an object is durable once its write returned, so nothing is done."""
        if not self.is_local:
            return
        directories: set[str] = set()
        for path in paths:
            _fsync(path, os.O_RDONLY)
            directories.add(os.path.dirname(path))
        for directory in sorted(directories):
            _fsync(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))

    def write_json(self, path: str, payload: dict[str, Any]) -> None:
        self.write_bytes(path, json.dumps(payload, indent=2, sort_keys=True).encode())

    def create_exclusive(self, path: str, payload: dict[str, Any]) -> bool:
        """Write ``payload`` at ``path`` only if nothing is there yet, atomically; ``False`` if
        another writer got there first (its content is left untouched)."""
        data = json.dumps(payload, indent=2, sort_keys=True).encode()
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if self.is_local:
            temp = self._write_temp(path, data)
            try:
                os.link(temp, path)  # fails if ``path`` exists; the content is complete
            except FileExistsError:
                return False
            finally:
                self._discard(temp)
            self.sync_directory(path)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def read_json(self, path: str) -> dict[str, Any]:
        """A JSON object written by :meth:`write_json` or :meth:`create_exclusive`; raises
        :class:`CorruptFile` naming ``path`` when it does not parse or is not an object."""
        data = self.read_bytes(path)
        try:
            payload = json.loads(data)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise CorruptFile(f"{path}: not valid JSON ({len(data)} bytes): {exc}") from exc
        if not isinstance(payload, dict):
            raise CorruptFile(f"{path}: holds a {type(payload).__name__}, not an object")
        return payload

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see the old content or the new, never a part."""
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if self.is_local:
            temp = self._write_temp(path, data)
            try:
                self.fs.mv(temp, path)  # a rename: readers see the old file or the new one
            except BaseException:
                self._discard(temp)
                raise
            self.sync_directory(path)
            return
        self.fs.pipe_file(path, data)  # one PUT: atomic on object stores

    def _write_temp(self, path: str, data: bytes) -> str:
        """Local filesystems: write ``data`` to a new file next to ``path``; return its path."""
        temp = f"{path}.{secrets.token_hex(6)}.tmp"
        try:
            with self.fs.open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())  # the content is on disk before any name points at it
        except BaseException:
            self._discard(temp)
            raise
        return temp

    def _discard(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def sync_directory(self, path: str) -> None:
        """On a local filesystem, fsync the directory holding ``path`` (a new name in it)."""
        if self.is_local:
            _fsync(os.path.dirname(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as handle:
            data: bytes = handle.read()
        return data


def check_schema(actual: pa.Schema, expected: pa.Schema, what: str) -> None:
    """Raise :class:`StorageError` naming ``what`` (a file) unless ``actual`` has exactly the
    columns and types of ``expected`` (schema metadata aside)."""
    if actual.equals(expected, check_metadata=False):
        return
    have = {f.name: f.type for f in actual}
    want = {f.name: f.type for f in expected}
    differences = [f"missing column {n!r} ({t})" for n, t in want.items() if n not in have]
    differences += [f"unexpected column {n!r} ({t})" for n, t in have.items() if n not in want]
    differences += [
        f"column {n!r} is {have[n]}, expected {t}"
        for n, t in want.items()
        if n in have and not have[n].equals(t)
    ]
    if not differences:  # same columns and types, another order or nullability
        differences = [f"columns {actual.names}, expected {expected.names}"]
    raise StorageError(f"{what}: schema differs from the expected one: {'; '.join(differences)}")


def _fsync(path: str, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


@dataclass(frozen=True)
class DatasetRef:
    """A committed (or to-be-written) dataset: its storage and directory inside it."""

    storage: Storage
    directory: str
    name: str

    @property
    def manifest_path(self) -> str:
        return posixpath.join(self.directory, MANIFEST)

    @property
    def marker_path(self) -> str:
        return posixpath.join(self.directory, COMMITTED)

    def is_committed(self) -> bool:
        return bool(self.storage.fs.exists(self.marker_path))

    def manifest(self) -> dict[str, Any]:
        if not self.is_committed():
            raise StorageError(f"dataset {self.name!r} at {self.directory} is not committed")
        return self.storage.read_json(self.manifest_path)

    def files(self) -> list[str]:
        """Shard paths listed by the manifest (never a directory listing)."""
        manifest = self.manifest()
        return [self.storage.resolve(f["path"]) for f in manifest["files"]]

    @property
    def num_rows(self) -> int:
        return int(self.manifest()["rows"])

    def size_bytes(self) -> int:
        """Total size of the shards the manifest lists (one metadata call per shard)."""
        return sum(int(self.storage.fs.size(path)) for path in self.files())

    def prepare(self) -> None:
        """Empty the directory before a fresh write (uncommitted leftovers are never trusted)."""
        fs = self.storage.fs
        if fs.exists(self.directory):
            fs.rm(self.directory, recursive=True)
        fs.makedirs(self.directory, exist_ok=True)

    def commit(self, extra: dict[str, Any] | None = None, id_column: str = "image_id") -> dict:
        """Write the manifest from the shards in the directory, then the commit marker (last)."""
        fs = self.storage.fs
        shards = sorted(p for p in fs.find(self.directory) if p.endswith(".parquet"))
        return self.commit_files(shards, extra, id_column)

    def commit_files(
        self,
        shards: Sequence[str],
        extra: dict[str, Any] | None = None,
        id_column: str = "image_id",
        schema: pa.Schema | None = None,
    ) -> dict:
        """Commit the dataset made of ``shards`` (paths anywhere under the root): the manifest
        with each file's row count and the id digest first, then the marker. With ``schema``,
        every shard must have that Arrow schema (the first that does not is named). On a local
        filesystem the shards and the manifest are fsync'ed before the marker is written."""
        fs = self.storage.fs
        files, ids = [], []
        for shard in shards:
            try:
                with fs.open(shard, "rb") as handle:
                    parquet = pq.ParquetFile(handle)
                    if schema is not None:
                        check_schema(
                            parquet.schema_arrow, schema, f"dataset {self.name!r}: {shard}"
                        )
                    table = parquet.read(columns=[id_column])
            except (OSError, pa.ArrowInvalid) as exc:  # a torn or truncated file
                raise CorruptFile(
                    f"dataset {self.name!r}: shard {shard} unreadable: {exc}"
                ) from exc
            files.append({"path": self.storage.relative(shard), "rows": table.num_rows})
            ids.extend(table.column(id_column).to_pylist())
        if len(ids) != len(set(ids)):
            raise StorageError(f"dataset {self.name!r}: duplicate {id_column} values in shards")
        manifest = {
            "name": self.name,
            "rows": len(ids),
            "files": files,
            "id_column": id_column,
            "id_digest": id_digest(ids),
            **(extra or {}),
        }
        self.storage.sync(shards)
        self.storage.write_json(self.manifest_path, manifest)  # fsync'ed, file and directory
        self.storage.write_json(self.marker_path, {"rows": len(ids)})
        logger.debug("committed %s: %d rows in %d shards", self.name, len(ids), len(files))
        return manifest

    def verify(self, deep: bool = False, schema: pa.Schema | None = None) -> None:
        """Raise :class:`StorageError` unless every shard matches the manifest's row counts (read
        from the Parquet footers); ``deep`` also reads the id column and checks the id digest.
        With ``schema``, every shard's Arrow schema must be that one (the file is named)."""
        manifest = self.manifest()
        ids: list[str] = []
        for entry in manifest["files"]:
            path = self.storage.resolve(entry["path"])
            try:
                with self.storage.fs.open(path, "rb") as handle:
                    parquet = pq.ParquetFile(handle)
                    rows = parquet.metadata.num_rows
                    if schema is not None:
                        check_schema(parquet.schema_arrow, schema, f"dataset {self.name!r}: {path}")
                    if deep:
                        column = manifest.get("id_column", "image_id")
                        ids.extend(parquet.read(columns=[column]).column(0).to_pylist())
            except (OSError, pa.ArrowInvalid) as exc:
                raise StorageError(
                    f"dataset {self.name!r}: shard {path} unreadable: {exc}"
                ) from exc
            if rows != entry["rows"]:
                raise StorageError(
                    f"dataset {self.name!r}: shard {path} has {rows} rows, manifest says "
                    f"{entry['rows']}"
                )
        if deep and id_digest(ids) != manifest["id_digest"]:
            raise StorageError(f"dataset {self.name!r}: its ids differ from the manifest's id set")

    def read_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Read the whole dataset on this process (driver-side, for small tables and tests)."""
        self.verify()
        tables = []
        for path in self.files():
            with self.storage.fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle, columns=list(columns) if columns else None))
        if not tables:
            raise StorageError(f"dataset {self.name!r} is empty")
        return pa.concat_tables(tables)

    def read_rows(self, columns: Sequence[str], ids: Iterable[str]) -> pa.Table:
        """The rows whose id (the manifest's id column) is in ``ids``: the id column and
        ``columns``, read on this process with a Parquet filter (row groups without any of the
        ids are skipped)."""
        column = self.manifest().get("id_column", "image_id")
        wanted = pa.array(sorted(set(ids)), pa.string())
        names = list(dict.fromkeys([column, *columns]))
        tables = []
        for path in self.files():
            with self.storage.fs.open(path, "rb") as handle:
                tables.append(
                    pq.read_table(handle, columns=names, filters=pc.field(column).isin(wanted))
                )
        if not tables:
            raise StorageError(f"dataset {self.name!r} is empty")
        return pa.concat_tables(tables)

    def write_table(self, table: pa.Table, shard: str = "part-00000.parquet") -> None:
        """Write one shard from this process (small tables: quarantine lists, metrics)."""
        path = posixpath.join(self.directory, _check_part(shard))
        self.storage.fs.makedirs(self.directory, exist_ok=True)
        with self.storage.fs.open(path, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
