"""The git commit a run records as its MLflow source: clean, dirty, and a submitted job's
working dir (no .git) that gets it from the environment submit sets."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline.provenance import COMMIT_ENV, git_commit


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_git_commit_clean_dirty_and_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_commit(repo) == head
    (repo / "new.txt").write_text("untracked files do not count\n")
    assert git_commit(repo) == head
    (repo / "a.py").write_text("x = 2\n")
    assert git_commit(repo) == f"{head}-dirty"
    shipped = tmp_path / "job"  # a submitted job's working dir: files, no .git
    shipped.mkdir()
    assert git_commit(shipped) is None
    monkeypatch.setenv(COMMIT_ENV, head)
    assert git_commit(shipped) == head
