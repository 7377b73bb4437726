"""Where the running code comes from: the git commit MLflow records as a run's source."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

COMMIT_ENV = "PSEUDOFLOW_GIT_COMMIT"  # set by submit: a job's working dir has no .git


def git_commit(folder: Path | None = None) -> str | None:
    """The commit of the checkout this package runs from (``<sha>`` or ``<sha>-dirty`` with
    uncommitted changes to tracked files); ``PSEUDOFLOW_GIT_COMMIT`` where there is no checkout;
    None where neither."""
    folder = folder or Path(__file__).resolve().parents[1]
    if (folder / ".git").exists() and shutil.which("git"):
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        if head.returncode == 0:
            changes = subprocess.run(
                ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
            )
            dirty = "-dirty" if changes.stdout.strip() else ""
            return head.stdout.strip() + dirty
    return os.environ.get(COMMIT_ENV) or None
