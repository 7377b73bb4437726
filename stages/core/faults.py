"""``faults://``: a local folder behind a filesystem that fails on purpose, for storage drills.

``Storage("faults:///data/root")`` is the local folder ``/data/root``; every operation goes to it
unchanged, except one, chosen by the ``PSEUDOFLOW_FAULTS`` environment variable (JSON, read at
each operation, inherited by Ray workers started from the same environment)::

    {"op": "write", "nth": 3, "match": "/cache/teach/pool/", "state": "/tmp/drill/count"}

- ``op``: ``write``: the n-th file opened for writing keeps half of what was written and its
  close raises :class:`InjectedFault` (a writer that died mid-file, or a full disk);
  ``truncate``: the same file is cut in half silently, its close succeeds (a lost tail that no
  one reported); ``rename``: the n-th move raises before anything moves.
- ``nth``: which matching operation (1 = the first); the others pass.
- ``match``: only paths containing this text count (default: every path).
- ``state``: a file counting the matching operations across every process using it (locked), so
  "the n-th" means the n-th of the whole run, drivers and Ray workers together. Its content is
  the count: a drill with an ``nth`` never reached measures how many operations a run makes.

Without the variable, ``faults://`` is a plain local folder. Nothing in the pipeline treats it
specially: it is an fsspec filesystem like ``file`` or ``s3``.
"""

from __future__ import annotations

import fcntl
import json
import os
from functools import lru_cache
from typing import Any, Literal

from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from pydantic import Field

from stages.core.config import StrictModel

FAULTS_ENV = "PSEUDOFLOW_FAULTS"
PROTOCOL = "faults"


class InjectedFault(OSError):
    """The failure a drill asked for."""


class FaultPlan(StrictModel):
    """One fault to inject (see the module's docstring)."""

    op: Literal["write", "truncate", "rename"]
    nth: int = Field(ge=1)
    match: str = ""
    state: str = Field(min_length=1, description="the file counting matching operations")

    def env(self) -> dict[str, str]:
        """The environment variable that injects this fault."""
        return {FAULTS_ENV: self.model_dump_json()}


@lru_cache(maxsize=8)
def _parse(text: str) -> FaultPlan:
    try:
        return FaultPlan.model_validate(json.loads(text))
    except ValueError as exc:
        raise ValueError(f"{FAULTS_ENV}={text!r} is not a fault plan: {exc}") from exc


def active_plan() -> FaultPlan | None:
    text = os.environ.get(FAULTS_ENV)
    return _parse(text) if text else None


def operations(state: str) -> int:
    """How many matching operations the drill counted so far."""
    try:
        with open(state) as handle:
            return int(handle.read() or 0)
    except FileNotFoundError:
        return 0


def _strikes(kinds: tuple[str, ...], path: str) -> FaultPlan | None:
    """Count this operation if the active plan watches it; the plan when it is the n-th."""
    plan = active_plan()
    if plan is None or plan.op not in kinds or plan.match not in path:
        return None
    with open(plan.state, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        count = int(handle.read() or 0) + 1
        handle.seek(0)
        handle.truncate()
        handle.write(str(count))
    return plan if count == plan.nth else None


class _TornFile(LocalFileOpener):
    """A file being written that loses its second half when closed; raises unless silent."""

    def __init__(self, path: str, mode: str, *, plan: FaultPlan, **kwargs: Any) -> None:
        super().__init__(path, mode, **kwargs)
        self._plan = plan

    def __exit__(self, *exc_info: object) -> None:
        self.close()  # the opener's own exit closes the file behind it, skipping close()

    def close(self) -> None:
        if self.closed:
            return
        self.f.flush()
        self.f.truncate(self.f.tell() // 2)
        super().close()
        if self._plan.op == "write":
            raise InjectedFault(f"injected fault: write #{self._plan.nth} of {self.path} failed")


class FaultyFileSystem(LocalFileSystem):
    """The local filesystem under the ``faults`` protocol, failing as :func:`active_plan` says."""

    protocol = (PROTOCOL,)

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = str(path)
        for prefix in (f"{PROTOCOL}://", f"{PROTOCOL}:"):
            if text.startswith(prefix):
                text = text[len(prefix) :]
                break
        return str(super()._strip_protocol(text))

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self._strip_protocol(name)}"

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if not any(flag in mode for flag in "wxa"):
            return super()._open(path, mode, block_size, **kwargs)
        plan = _strikes(("write", "truncate"), path)
        if plan is None:
            return super()._open(path, mode, block_size, **kwargs)
        if self.auto_mkdir:
            self.makedirs(self._parent(path), exist_ok=True)
        return _TornFile(path, mode, fs=self, plan=plan, **kwargs)

    def mv(self, path1: str, path2: str, recursive: bool = True, **kwargs: Any) -> None:
        plan = _strikes(("rename",), self._strip_protocol(path2))
        if plan is not None:
            raise InjectedFault(f"injected fault: rename #{plan.nth} to {path2} failed")
        super().mv(path1, path2, recursive=recursive, **kwargs)
