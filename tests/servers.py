"""Real servers on 127.0.0.1 for the cluster tests: a Ray head with token auth (``ray start
--head``), PostgreSQL (initdb/pg_ctl as an unprivileged user) and ``mlflow server``.

Each is started in its own process group (or data folder) and stopped with everything it
spawned, whatever the test did."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent

# Ray kills a worker idle above its soft limit after 1 s, so each stage of a test's pipeline would
# start new processes and pay torch's ~5 s import again. Test clusters keep them 5 minutes. (Not
# the CLI's default: a Ray Data task worker reused that long sometimes prints an InterruptedError
# traceback from a finished read's completion thread.)
KEEP_IDLE_WORKERS = ("RAY_idle_worker_killing_time_threshold_ms", "300000")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(
    url: str, process: subprocess.Popen, log: Path | None = None, timeout: float = 120
) -> None:
    """Wait until ``url`` gives any HTTP answer; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited ({process.returncode}):\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 and 403 included: token auth is on)
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""


def stop_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def kill_mentioning(text: str) -> None:
    """SIGKILL every process whose command line mentions ``text`` (a unique temp folder)."""
    _kill_matching("cmdline", text.encode())


def kill_with_env(name: str, value: str, timeout: float = 30.0) -> None:
    """SIGKILL every process whose environment has ``name=value``, and wait until none is left."""
    deadline = time.monotonic() + timeout
    while alive := _kill_matching("environ", f"{name}={value}".encode(), whole_entry=True):
        assert time.monotonic() < deadline, f"processes still alive after SIGKILL: {alive}"
        time.sleep(0.1)


def _kill_matching(field: str, needle: bytes, *, whole_entry: bool = False) -> list[int]:
    """SIGKILL every other process whose ``/proc/<pid>/<field>`` (NUL-separated entries)
    contains ``needle``, or has it as one whole entry; returns their pids."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            entries = (entry / field).read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours
        if (needle in entries) if whole_entry else (needle in b" ".join(entries)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


@dataclass(frozen=True)
class RayHead:
    address: str  # the dashboard / Jobs API URL
    token: str
    env: dict[str, str]  # an environment for a CLI process that talks to this head


@contextlib.contextmanager
def ray_head(
    extra_env: dict[str, str] | None = None, drop: tuple[str, ...] = (), num_cpus: int = 4
) -> Iterator[RayHead]:
    """``ray start --head --block`` on 127.0.0.1 with token auth (a fresh random token), the
    venv's python first on PATH (as in the docker images), ``extra_env`` in its environment and
    the variables named in ``drop`` removed from it."""
    token = secrets.token_hex(16)
    temp = Path(tempfile.mkdtemp(prefix="pfray-", dir="/tmp"))  # short: Ray's socket paths
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        KEEP_IDLE_WORKERS[0]: KEEP_IDLE_WORKERS[1],
        **(extra_env or {}),
    }
    for name in ("RAY_ADDRESS", *drop):
        env.pop(name, None)
    dashboard = free_port()
    args = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--num-cpus={num_cpus}",
        "--disable-usage-stats", f"--temp-dir={temp}",
    ]  # fmt: skip
    log = temp / "ray-start.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_http(f"{address}/api/version", process, log)
        client_env = {k: v for k, v in env.items() if k not in {"RAY_AUTH_TOKEN", "PATH"}}
        client_env["PATH"] = os.environ.get("PATH", "")
        yield RayHead(address=address, token=token, env=client_env)
    finally:
        stop_group(process, timeout=10)
        kill_mentioning(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def _as_user(args: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as ``nobody`` when we are root."""
    return ["runuser", "-u", "nobody", "--", *args] if os.geteuid() == 0 else args


def postgres_available() -> bool:
    return all(shutil.which(tool) for tool in ("initdb", "pg_ctl", "postgres"))


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 (password auth) with an empty ``mlflow`` database;
    yields its SQLAlchemy URL for MLflow (``postgresql+psycopg2://``)."""
    base = Path(tempfile.mkdtemp(prefix="pfpg-", dir="/tmp"))
    base.chmod(0o755)
    data, password = base / "data", secrets.token_hex(12)
    pwfile = base / "pw"
    pwfile.write_text(password)
    if os.geteuid() == 0:
        shutil.chown(base, "nobody")
        shutil.chown(pwfile, "nobody")
    port = free_port()
    initdb = [
        "initdb", "-D", str(data), "-U", "mlflow", "--auth=scram-sha-256",
        f"--pwfile={pwfile}", "--encoding=UTF8", "--no-instructions",
    ]  # fmt: skip
    subprocess.run(_as_user(initdb), check=True, capture_output=True, timeout=120)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base}"
    start = ["pg_ctl", "-D", str(data), "-o", options, "-l", str(base / "pg.log"), "-w", "start"]
    subprocess.run(_as_user(start), check=True, capture_output=True, timeout=120)
    try:
        env = {**os.environ, "PGPASSWORD": password}
        create = ["createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"]
        subprocess.run(create, check=True, capture_output=True, env=env, timeout=60)
        yield f"postgresql+psycopg2://mlflow:{password}@127.0.0.1:{port}/mlflow"
    finally:
        stop = ["pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"]
        subprocess.run(_as_user(stop), capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with ``backend_uri`` and proxied artifacts stored under
    ``artifacts``; yields its URL. The server's helper processes go with its process group."""
    port = free_port()
    log = artifacts.parent / f"mlflow-server-{port}.log"
    args = [
        str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
        "--workers", "1",
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, log, timeout=180)
        yield url
    finally:
        stop_group(process)
