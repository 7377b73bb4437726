"""Submitting a run to a Ray cluster through the Jobs API, with token authentication.

A submission ships a copy of the project (code and configs; never data, runs or virtual
environments) as the job's working directory, plus the *resolved* config as one YAML file, and
runs ``python -m pipeline run`` on the cluster. Its id is derived from what it runs (config,
root, tracking URI, environment, code), so an identical resubmission finds the first one.

Secrets never travel in a submission: the Ray token goes in the Authorization header only, and
storage or MLflow credentials are passed *by reference* (``${NAME}`` in the runtime
environment, expanded by Ray on the cluster from the nodes' own environment). What is shipped is
what git tracks (or, outside git, only the package files), never a dotfile or a credential file
(:func:`project_files`); a variable, tracking URI, root or config value that carries a secret is
refused before anything is sent, with a message that names it and never echoes its value.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from pipeline.provenance import COMMIT_ENV, git_commit
from pipeline.redact import has_password, secret_query_names
from stages.core.progress import WORKER_SETUP_HOOK

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

SUBMITTED_CONFIG = "pseudoflow-submitted.yaml"
ID_PREFIX = "pseudoflow-"
# Never part of a job's working directory: data, outputs, environments, caches, VCS.
EXCLUDED = (
    ".git",
    ".gitignore",
    ".venv",
    "venv",
    "runs",
    "data",
    "mlruns",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".import_linter_cache",
    "*.db",
    "*.pt",
    "*.pth",
    "*.parquet",
)
# Never shipped, whatever lists them (git included): credential and key files by name. Dotfiles
# and dot-folders (.env, .aws/, .ray/auth_token, .ssh/, .netrc, ...) are never shipped either.
SECRET_FILES = (
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.kdbx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*credentials*",
    "*.env",
    "*.env.*",
    "*auth_token*",
    "*.token",
    "*.secret",
    "*.secrets",
    "*.netrc",
    "*.pgpass",
    "*.tfstate*",
)
# Outside a git checkout only the package is shipped: these top-level files and folders.
PACKAGE_PATHS = ("pyproject.toml", "pipeline", "stages")
MAX_WORKING_DIR_BYTES = 50 * 2**20
# An environment name is a secret's when one of its underscore-separated words is one of these.
SECRET_WORDS = frozenset(
    {
        "KEY",
        "KEYS",
        "APIKEY",
        "TOKEN",
        "TOKENS",
        "SECRET",
        "SECRETS",
        "PASSWORD",
        "PASSWORDS",
        "PASSWD",
        "PASSPHRASE",
        "CREDENTIAL",
        "CREDENTIALS",
        "PRIVATE",
        "AUTH",
    }
)
CREDENTIALS_ON_THE_CLUSTER = (
    "credentials reach a job from the cluster nodes' own environment (a Kubernetes Secret, the "
    "launcher's node environment) or an instance role, never from the submitting machine"
)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """A submission or job query that cannot go on; the message says what to do."""


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


def project_root() -> Path:
    """The source checkout this package runs from (the folder with its pyproject.toml)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "stages").is_dir():
        raise SubmitError(
            f"{root} is not a pseudoflow source checkout: submit from a clone of the project "
            "(its code is shipped to the cluster as the job's working directory)"
        )
    return root


def project_files(source: Path) -> list[Path]:
    """The files of the checkout a job needs, as relative paths: in a git checkout, the files git
    tracks (never untracked or ignored ones); elsewhere only the package (:data:`PACKAGE_PATHS`).
    Whatever the source, never a dotfile or dot-folder, a :data:`SECRET_FILES` credential file, an
    :data:`EXCLUDED` one or a symlink."""
    if (source / ".git").exists() and shutil.which("git"):
        tracked = set(_git_ls(source, "--cached"))
        # tracked, yet ignored (added with --force): not shipped either
        ignored = set(_git_ls(source, "--cached", "--ignored", "--exclude-standard"))
        candidates = [Path(p) for p in tracked - ignored]
    else:
        candidates = [
            p.relative_to(source)
            for top in PACKAGE_PATHS
            for p in ([source / top] if (source / top).is_file() else (source / top).rglob("*"))
        ]
    return sorted(p for p in candidates if _shippable(source, p))


def untracked_package_files(source: Path) -> list[Path]:
    """Files of the package (:data:`PACKAGE_PATHS`) that git neither tracks nor ignores: a new
    module not yet added is not shipped, and the job would miss it (``submit`` says so)."""
    if not ((source / ".git").exists() and shutil.which("git")):
        return []
    untracked = map(Path, _git_ls(source, "--others", "--exclude-standard"))
    return sorted(p for p in untracked if p.parts[0] in PACKAGE_PATHS and _shippable(source, p))


def _git_ls(source: Path, *options: str) -> list[str]:
    command = ["git", "-C", str(source), "ls-files", "-z", *options]
    listed = subprocess.run(command, capture_output=True, check=True).stdout.decode()
    return [p for p in listed.split("\0") if p]


def _shippable(source: Path, relative: Path) -> bool:
    path = source / relative
    if not path.is_file() or path.is_symlink():
        return False
    return not any(
        part.startswith(".")
        or any(fnmatch.fnmatch(part.lower(), pattern) for pattern in (*EXCLUDED, *SECRET_FILES))
        for part in relative.parts
    )


def stage_working_dir(source: Path, dest: Path, config: PipelineConfig) -> list[tuple[str, int]]:
    """Copy the project into ``dest`` (only :func:`project_files`), write the resolved config
    there as :data:`SUBMITTED_CONFIG`, and return what was staged: (relative path, bytes)."""
    for relative in project_files(source):
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, dest / relative)
    (dest / SUBMITTED_CONFIG).write_text(resolved_yaml(config))
    staged = sorted(
        (p.relative_to(dest).as_posix(), p.stat().st_size) for p in dest.rglob("*") if p.is_file()
    )
    size = sum(n for _, n in staged)
    if size > MAX_WORKING_DIR_BYTES:
        raise SubmitError(
            f"the job's working directory would be {size / 2**20:.0f} MiB (limit "
            f"{MAX_WORKING_DIR_BYTES / 2**20:.0f} MiB): data and weights belong under the "
            "storage root, not in the source checkout"
        )
    return staged


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    return f"{size / 1024:.1f} KiB" if size < 2**20 else f"{size / 2**20:.1f} MiB"


def resolved_yaml(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=True)


def tree_digest(folder: Path) -> str:
    """sha256 over the relative paths and contents of every file under ``folder``."""
    from fsspec.implementations.local import LocalFileSystem

    from stages.core.shards import file_digest

    fs, digest = LocalFileSystem(), hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(
            f"{path.relative_to(folder).as_posix()}\0{file_digest(fs, str(path))}\n".encode()
        )
    return digest.hexdigest()


def parse_env(values: tuple[str, ...], refs: tuple[str, ...]) -> dict[str, str]:
    """Job environment: ``NAME=VALUE`` plain values (never secrets) and ``NAME[=CLUSTER_NAME]``
    references, which the job receives as ``${CLUSTER_NAME}``: Ray expands them on the
    cluster, from the nodes' own environment, so the value never leaves the cluster.

    A plain value is refused when its name looks like a secret's (a word of it is one of
    :data:`SECRET_WORDS`) or the value is a URL with a password or a secret query parameter; the
    error names the variable, never its value."""
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        _check_name(name, item if sep == "" else f"{name}=...")
        if not sep:
            raise SubmitError(f"--env {item!r}: expected NAME=VALUE")
        if looks_secret(name):
            raise SubmitError(
                f"--env {name}=...: {name} looks like a secret; secrets are passed by reference "
                f"(--env-ref {name}), so their values never leave the cluster: "
                f"{CREDENTIALS_ON_THE_CLUSTER}"
            )
        what = _credentials_in(value)
        if what:
            raise SubmitError(
                f"--env {name}=...: the value of {name} {what}; put the whole value in the "
                f"cluster nodes' own environment and pass it by reference (--env-ref {name}): "
                f"{CREDENTIALS_ON_THE_CLUSTER}"
            )
        env[name] = value
    for item in refs:
        name, _, cluster_name = item.partition("=")
        _check_name(name, item)
        _check_name(cluster_name or name, item)
        env[name] = "${" + (cluster_name or name) + "}"
    return env


def looks_secret(name: str) -> bool:
    """Whether an environment name looks like a secret's: ``OPENAI_API_KEY``, ``MY_TOKEN``, but
    not ``KEYBOARD`` or ``AUTHOR`` (whole underscore-separated words only)."""
    return any(word in SECRET_WORDS for word in name.upper().split("_"))


def _credentials_in(value: str) -> str | None:
    """What secret ``value`` carries, in words without the secret, or ``None``."""
    if has_password(value):
        return "is a URL with a password in it (user:password@)"
    names = secret_query_names(value)
    if names:
        return f"is a URL with a secret in its query ({', '.join(sorted(set(names)))})"
    return None


def _check_name(name: str, item: str) -> None:
    if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
        raise SubmitError(f"{item!r}: environment names are upper case, digits and underscores")


@dataclass(frozen=True)
class Submission:
    """Everything a submission sends, and the id derived from it."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


def build_submission(
    config: PipelineConfig,
    *,
    root: str,
    tracking_uri: str,
    env: dict[str, str],
    working_dir: Path,
    python: str = "python",
    until: str | None = None,
    command: Literal["run", "sweep"] = "run",
) -> Submission:
    """The job for ``config`` with its staged ``working_dir`` (see :func:`stage_working_dir`):
    ``pseudoflow run``, or ``pseudoflow sweep`` of the config's ``sweep`` section."""
    entrypoint = (
        f"{python} -m pipeline {command} --config {SUBMITTED_CONFIG} --root {shlex.quote(root)}"
    )
    if until:
        entrypoint += f" --until {shlex.quote(until)}"
    job_env = {
        **env,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONUNBUFFERED": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    commit = git_commit()
    if commit:  # the shipped files carry no .git: the run's MLflow source tag comes from here
        job_env[COMMIT_ENV] = commit
    identity = hashlib.sha256()
    env_items = sorted(f"{k}={v}" for k, v in job_env.items())
    for part in (entrypoint, tree_digest(working_dir), *env_items):
        identity.update(part.encode() + b"\0")
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", config.name)
    return Submission(
        submission_id=f"{ID_PREFIX}{name}-{identity.hexdigest()[:16]}",
        entrypoint=entrypoint,
        runtime_env={
            "working_dir": str(working_dir),
            "excludes": list(EXCLUDED),
            "env_vars": job_env,
            "worker_process_setup_hook": WORKER_SETUP_HOOK,  # quiet Ray Data INFO in workers
        },
        metadata={"pseudoflow.config": config.name, "pseudoflow.root": root},
    )


def check_root(root: str) -> str:
    """A cluster run's root must name the same place on every node: a URL or an absolute path,
    without credentials in it."""
    what = _credentials_in(root)
    if what:
        raise SubmitError(
            f"--root {what}: give the storage URL only (s3://bucket/prefix); "
            f"{CREDENTIALS_ON_THE_CLUSTER} (for S3: --env-ref AWS_ACCESS_KEY_ID --env-ref "
            "AWS_SECRET_ACCESS_KEY, or the nodes' instance role)"
        )
    if "://" in root or Path(root).is_absolute():
        return root
    raise SubmitError(
        f"--root {root!r} is a relative path, which would mean a folder inside the job's "
        "temporary working directory: give shared storage (s3://bucket/prefix) or an absolute "
        "path every node sees"
    )


def check_tracking_uri(uri: str | None) -> str:
    """The MLflow server a cluster run logs to: its URL only, never credentials (the cluster
    nodes hold ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` themselves)."""
    if not uri:
        raise SubmitError(
            "a cluster run logs to an MLflow server: pass --tracking-uri http://HOST:5000 or set "
            "MLFLOW_TRACKING_URI (README, 'Cluster')"
        )
    what = _credentials_in(uri)
    if what:
        kind = "carries a password" if has_password(uri) else "carries a secret"
        raise SubmitError(
            f"the tracking URI {kind}: it {what}. Give the server's URL only "
            "(http://HOST:5000); MLflow credentials go in MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD in the cluster nodes' own environment, passed by reference "
            "(--env-ref MLFLOW_TRACKING_USERNAME --env-ref MLFLOW_TRACKING_PASSWORD)"
        )
    return uri


def check_config(config: PipelineConfig) -> PipelineConfig:
    """The resolved config is shipped as a file: none of its values may carry credentials."""
    problems = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        elif isinstance(value, list):
            for index, child in enumerate(value):
                walk(f"{prefix}.{index}", child)
        elif isinstance(value, str) and (what := _credentials_in(value)):
            problems.append(f"{prefix} {what}")

    walk("", config.model_dump(mode="json"))
    if problems:
        raise SubmitError(
            f"the config is shipped to the cluster and {'; '.join(problems)}: give URLs "
            f"without credentials; {CREDENTIALS_ON_THE_CLUSTER}"
        )
    return config


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
