"""Shared fixtures: small data built on the fly, and the environment for local Ray runs."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.servers import KEEP_IDLE_WORKERS

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
            "RAY_ADDRESS": "local",  # a new local Ray, never another test's cluster
        }
    )
    return env


@contextlib.contextmanager
def local_ray(extra_env: dict[str, str] | None = None) -> Iterator[None]:
    """A local Ray for this test process, with token auth (a fresh random token), no usage
    reporting and ``extra_env`` visible to its workers; everything is restored afterwards."""
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state

    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        KEEP_IDLE_WORKERS[0]: KEEP_IDLE_WORKERS[1],
        **(extra_env or {}),
    }
    saved = {k: os.environ.get(k) for k in [*env, "RAY_ADDRESS"]}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    # Ray reads RAY_AUTH_MODE when ray._raylet is first imported, which may have happened
    # earlier in this pytest process: make it re-read the environment set above.
    reset_auth_token_state()
    runtime_env = {"env_vars": extra_env} if extra_env else None
    # "local": never join another cluster on this machine (a test's `ray start` head, or a
    # parallel test worker's Ray).
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env=runtime_env)
    try:
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_auth_token_state()


def stage_outputs(root: Path, run_dir: Path | None = None) -> dict[str, dict]:
    """Every output of one pipeline run (the only one under ``root`` unless ``run_dir`` is
    given), as the cache entries its stages used recorded them: name -> output record."""
    import json

    if run_dir is None:
        (run_dir,) = (root / "pipelines").iterdir()
    stages = json.loads((run_dir / "stages.json").read_text())
    outputs: dict[str, dict] = {}
    for stage, used in stages.items():
        entry = root / "cache" / stage / used["key"] / "_ENTRY.json"
        outputs.update(json.loads(entry.read_text())["outputs"])
    return outputs


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


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """A real S3-protocol server (moto) on 127.0.0.1 for this session, credentials and endpoint
    in the environment (never in a URL or a log); yields an empty bucket's URL prefix."""
    import s3fs

    from tests.s3server import make_bucket, s3_server

    with s3_server() as server:
        # A distinctive secret, so tests can check it never reaches a log or MLflow.
        env = {**server.env, "AWS_SECRET_ACCESS_KEY": f"pf-secret-{secrets.token_hex(8)}"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        s3fs.S3FileSystem.clear_instance_cache()
        make_bucket(server.endpoint, "pseudoflow")
        try:
            yield "s3://pseudoflow"
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
