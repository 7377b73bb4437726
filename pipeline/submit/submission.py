"""A submission: what runs (the resolved config, the code, the environment) and its id, derived
from all of it, so that an identical resubmission finds the first one."""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.provenance import COMMIT_ENV, git_commit
from pipeline.submit.shipping import EXCLUDED, SUBMITTED_CONFIG, tree_digest
from stages.core.progress import WORKER_SETUP_HOOK

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

ID_PREFIX = "pseudoflow-"


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
