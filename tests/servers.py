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
    gcs_address: str = ""  # host:port, what `ray start --address` and ray.init join


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
    dashboard, gcs_port = free_port(), free_port()
    args = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
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
        yield RayHead(address, token, client_env, gcs_address=f"127.0.0.1:{gcs_port}")
    finally:
        stop_group(process, timeout=10)
        kill_mentioning(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


class RayNode:
    """A second Ray node (``ray start --address --block``) joined to a head on this machine, in
    its own process group; every process it starts (raylet, agents, workers) carries a unique
    environment variable, so :meth:`kill` can take all of them down at once by process id, as a
    node that loses power would go (never ``ray stop``, which would stop every Ray here)."""

    TAG = "PSEUDOFLOW_TEST_NODE"
    LABEL = "pseudoflow_test_node"

    def __init__(self, process: subprocess.Popen, tag: str, log: Path):
        self.process, self.tag, self.log = process, tag, log

    def pids(self) -> list[int]:
        """Every live process of this node (the ``ray start`` process first)."""
        needle = f"{self.TAG}={self.tag}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if needle in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
        return sorted(found, key=lambda pid: pid != self.process.pid)

    def kill(self) -> list[int]:
        """SIGKILL every process of the node (its process group, then any straggler carrying its
        tag) and wait until none is left; returns the pids killed."""
        pids = self.pids()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        kill_with_env(self.TAG, self.tag)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        return pids


@contextlib.contextmanager
def ray_node(
    head: RayHead,
    *,
    num_cpus: int,
    resources: dict[str, float] | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Iterator[RayNode]:
    """Join a second node to ``head`` (127.0.0.1, its own ports) with ``num_cpus`` CPUs, the
    custom ``resources`` and ``extra_env`` in its workers' environment; wait until the head
    lists it alive. Killed (by process id) on exit if still running."""
    import json

    tag = secrets.token_hex(8)
    env = {
        **os.environ,
        **head.env,
        "RAY_AUTH_TOKEN": head.token,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        KEEP_IDLE_WORKERS[0]: KEEP_IDLE_WORKERS[1],
        RayNode.TAG: tag,
        **(extra_env or {}),
    }
    env.pop("RAY_ADDRESS", None)
    low = free_port()
    while not all(_port_free(port) for port in range(low, low + 16)):
        low = free_port()
    args = [
        str(VENV_BIN / "ray"), "start", "--block", f"--address={head.gcs_address}",
        "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
        f"--resources={json.dumps(resources or {})}",
        f"--labels={json.dumps({RayNode.LABEL: tag})}",
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--min-worker-port={low}", f"--max-worker-port={low + 15}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats",
    ]  # fmt: skip
    log = Path(tempfile.mkstemp(prefix="pfnode-", suffix=".log", dir="/tmp")[1])
    with log.open("w") as out:
        process = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    node = RayNode(process, tag, log)
    try:
        wait_for_node(head, tag, "ALIVE", process, log, timeout)
        yield node
    finally:
        node.kill()
        log.unlink(missing_ok=True)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def node_states(head: RayHead) -> dict[str, str]:
    """Every node the head knows: its ``pseudoflow_test_node`` label (``head`` for the head
    node) -> ALIVE or DEAD (Ray's State API, through the dashboard)."""
    import json

    request = urllib.request.Request(
        f"{head.address}/api/v0/nodes?detail=1&limit=1000",
        headers={"Authorization": f"Bearer {head.token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        nodes = json.loads(answer.read())["data"]["result"]["result"]
    states: dict[str, str] = {}
    for node in nodes:
        name = "head" if node["is_head_node"] else node["labels"].get(RayNode.LABEL, "?")
        if states.get(name) != "ALIVE":
            states[name] = node["state"]
    return states


def wait_for_node(
    head: RayHead,
    tag: str,
    state: str,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
    timeout: float = 120,
) -> float:
    """Wait until the head reports the node labelled ``tag`` in ``state`` (ALIVE, DEAD);
    returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() < started + timeout:
        if state == "ALIVE" and process is not None and process.poll() is not None:
            raise RuntimeError(f"ray start exited ({process.returncode}):\n{_tail(log)}")
        with contextlib.suppress(OSError, ValueError, KeyError):
            if node_states(head).get(tag) == state:
                return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(f"node {tag} not {state} within {timeout:.0f} s:\n{_tail(log)}")


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
