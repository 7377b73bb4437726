"""The cluster side: the Ray token (found, never logged), the Jobs API client that submits,
lists, follows and stops jobs, and a job's status."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.submit.checks import SubmitError

if TYPE_CHECKING:
    from pipeline.submit.submission import Submission


TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    source: str  # where it came from (for messages; never the value)


def find_token(token_file: str | None = None) -> Token | None:
    """The Ray token: ``--token-file``, else ``RAY_AUTH_TOKEN``, else the file named by
    ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (Ray's own places, in Ray's order)."""
    if token_file:
        return _token_from_file(Path(token_file).expanduser(), f"--token-file {token_file}")
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        return _token_from_file(path, f"RAY_AUTH_TOKEN_PATH={path}")
    default = Path.home() / ".ray" / "auth_token"
    return _token_from_file(default, str(default)) if default.is_file() else None


def _token_from_file(path: Path, source: str) -> Token:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise SubmitError(f"cannot read the Ray token from {source}: {exc.strerror}") from exc
    if not value:
        raise SubmitError(f"the Ray token file {path} is empty")
    return Token(value, source)


class Cluster:
    """The Jobs API of one Ray cluster (its dashboard address), authenticated with ``token``.

    Ray's own errors are turned into :class:`SubmitError` with a message that says whether the
    cluster could not be reached, asked for a token, or refused the one given."""

    def __init__(self, address: str, token: Token | None):
        self.address = address.rstrip("/")
        self.token = token
        self._client = self._call(self._connect)

    def _connect(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        headers = {"Authorization": f"Bearer {self.token.value}"} if self.token else {}
        return JobSubmissionClient(self.address, headers=headers)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as exc:
            raise SubmitError(self._refused(str(exc))) from None
        except ConnectionError as exc:
            raise SubmitError(
                f"cannot reach the Ray Jobs API at {self.address}: {exc}. Is the cluster up, "
                "and the dashboard port reachable (through an SSH tunnel or port-forward)?"
            ) from None
        except RuntimeError as exc:
            raise SubmitError(f"{self.address}: {exc}") from None

    def _refused(self, detail: str) -> str:
        if self.token is None or "Authentication required" in detail:
            return (
                f"{self.address} refused the request: the cluster requires a Ray token and none "
                "was sent. Set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or --token-file to the "
                "cluster's token (cluster/README.md says where it is kept)."
            )
        return (
            f"{self.address} refused the Ray token from {self.token.source}: it is not this "
            "cluster's token. Use the token the cluster was started with (cluster/README.md)."
        )

    def submit(self, **kwargs: Any) -> str:
        return str(self._call(self._client.submit_job, **kwargs))

    def info(self, job_id: str) -> Any:
        return self._call(self._client.get_job_info, job_id)

    def find(self, job_id: str) -> Any | None:
        """The job's details, or ``None`` if this cluster has no job with that id."""
        try:
            return self.info(job_id)
        except SubmitError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return None
            raise

    def jobs(self) -> list[Any]:
        return list(self._call(self._client.list_jobs))

    def logs(self, job_id: str) -> str:
        return str(self._call(self._client.get_job_logs, job_id))

    def stop(self, job_id: str) -> bool:
        return bool(self._call(self._client.stop_job, job_id))

    def follow(self, job_id: str) -> Iterator[str]:
        """Log text of a job as it is written, until the job ends."""
        loop = asyncio.new_event_loop()
        stream = self._client.tail_job_logs(job_id)
        try:
            while True:
                try:
                    yield self._call(loop.run_until_complete, stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(stream.aclose())
            loop.close()


def submit(cluster: Cluster, submission: Submission, again: bool = False) -> tuple[str, Any]:
    """Submit unless an identical job exists (then return it; with ``again``, submit anew
    under the next free ``<id>-N``). Returns (submission id, existing job details or None)."""
    job_id = submission.submission_id
    existing = cluster.find(job_id)
    if existing is not None and again:
        number = 2
        while cluster.find(f"{job_id}-{number}") is not None:
            number += 1
        job_id, existing = f"{job_id}-{number}", None
    if existing is not None:
        return job_id, existing
    cluster.submit(
        entrypoint=submission.entrypoint,
        submission_id=job_id,
        runtime_env=submission.runtime_env,
        metadata=submission.metadata,
    )
    return job_id, None


def status_name(details: Any) -> str:
    status = details.status
    return str(getattr(status, "value", status))
