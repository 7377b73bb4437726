"""A local S3 endpoint for tests: ``moto_server`` on 127.0.0.1 in its own process group.

Plain helpers (no pytest fixtures) so that tests and ad-hoc scripts can share them::

    with s3_server() as s3:
        make_bucket(s3.endpoint, "bucket")
        env = {**os.environ, **s3.env}  # for a subprocess, or os.environ.update(s3.env)

The credentials are dummy values that moto accepts; they reach no real account.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import free_port, stop_group, wait_for_http

HOST = "127.0.0.1"
REGION = "us-east-1"
_DUMMY_KEY = "testing"


def moto_server_executable() -> Path:
    """The ``moto_server`` console script of the running interpreter's environment."""
    return Path(sys.executable).parent / "moto_server"


def moto_available() -> bool:
    """Whether ``moto_server`` is installed next to the interpreter."""
    return moto_server_executable().exists()


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment variables that point boto3/botocore, s3fs/fsspec and MLflow at ``endpoint``.

    - ``AWS_ENDPOINT_URL``: botocore (boto3, aiobotocore, hence s3fs) uses it for every service.
    - ``FSSPEC_S3_ENDPOINT_URL``: fsspec's env-config convention (``FSSPEC_<PROTOCOL>_<KWARG>``),
      giving ``S3FileSystem(endpoint_url=...)`` explicitly.
    - ``MLFLOW_S3_ENDPOINT_URL``: MLflow's S3 artifact repository.
    """
    return {
        "AWS_ACCESS_KEY_ID": _DUMMY_KEY,
        "AWS_SECRET_ACCESS_KEY": _DUMMY_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


@dataclass(frozen=True)
class S3Server:
    """A running local S3 endpoint."""

    endpoint: str
    pid: int
    env: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def s3_server(startup_timeout: float = 30.0, attempts: int = 3) -> Iterator[S3Server]:
    """Run ``moto_server`` on 127.0.0.1 on a free port; stop its process group on exit."""
    executable = moto_server_executable()
    if not executable.exists():
        raise FileNotFoundError(f"{executable} not found; install moto[server]")
    proc: subprocess.Popen[bytes] | None = None
    endpoint = ""
    for attempt in range(attempts):
        port = free_port()
        endpoint = f"http://{HOST}:{port}"
        proc = subprocess.Popen(
            [str(executable), "-H", HOST, "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_http(f"{endpoint}/", proc, timeout=startup_timeout)
            break
        except RuntimeError:  # lost the port to another process: try another one
            stop_group(proc, timeout=5)
            if attempt == attempts - 1:
                raise
        except BaseException:
            stop_group(proc, timeout=5)
            raise
    assert proc is not None
    try:
        yield S3Server(endpoint=endpoint, pid=proc.pid, env=s3_env(endpoint))
    finally:
        stop_group(proc, timeout=5)


def make_bucket(endpoint: str, name: str) -> None:
    """Create bucket ``name`` on ``endpoint`` (boto3 when installed, else s3fs)."""
    try:
        import boto3
    except ImportError:
        import s3fs

        fs = s3fs.S3FileSystem(
            key=_DUMMY_KEY,
            secret=_DUMMY_KEY,
            endpoint_url=endpoint,
            client_kwargs={"region_name": REGION},
            skip_instance_cache=True,
        )
        fs.mkdir(name)
        return
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=_DUMMY_KEY,
        aws_secret_access_key=_DUMMY_KEY,
    )
    client.create_bucket(Bucket=name)
