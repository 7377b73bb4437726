"""Shared fixtures: small data built on the fly, and the environment for local Ray runs."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# The pipeline's stages in run order, written out here (not taken from the code under test).
STAGE_NAMES = (
    "ingest",
    "train_teacher",
    "train_detector",
    "detect",
    "teach",
    "pseudolabel",
    "train_student",
    "evaluate",
)


@pytest.fixture
def ray_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess that starts its own local Ray, with token auth set
    explicitly (a fresh random token per test) and no usage reporting."""
    env = dict(os.environ)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipeline ARGS`` as a user would; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
