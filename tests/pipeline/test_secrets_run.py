"""Nothing leaked: a real local ``pseudoflow run`` (it starts its own Ray) and a ``submit
--dry-run`` with tokens, keys and passwords in the environment and in URLs of the config, then
every byte they left behind (the MLflow SQLite store and artifacts, every file under the root, the
console output with the log lines) searched for the secrets.

Where a secret may legally sit in a local run's config: the tracking URI is a SQLite URL with a
``?token=`` query (SQLAlchemy and MLflow accept it and use the file), and ``data.root`` of the
generated source (which does not read it) is an ``s3://key:password@bucket`` URL.

The same run's console (captured, so not a terminal) is checked to be quiet: one line as each stage
starts and ends, no colour codes, none of what the Ray workers print."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import STAGE_NAMES, run_cli
from tests.servers import kill_with_env

pytestmark = pytest.mark.ray


def _secrets() -> dict[str, str]:
    return {
        name: f"pf{name.lower()}{secrets.token_hex(8)}"
        for name in ("AWS", "MLFLOW", "OPENAI", "URI", "DATA")
    }


def _hits(values: list[str], root: Path, *texts: str) -> list[str]:
    """Where any of ``values`` occurs: ``path`` (every file under ``root``, binary included) or
    ``output #n``."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path} ({v[:8]}...)" for v in values if v.encode() in data]
    for number, text in enumerate(texts):
        found += [f"output #{number} ({v[:8]}...)" for v in values if v in text]
    return found


# Ray's one error line that a Ray Data actor pool always prints on the driver (its C++ core
# worker writes errors to stderr; no setting quietens it): ray-project/ray#57733.
RAY_DATA_ACTOR_ARGS = "has constructor arguments in the object store and max_restarts > 0"
RAY_CORE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [EWF] \d+ \d+\]")


def _console_problems(console: str) -> list[str]:
    """What a quiet console (off a terminal) must not show: colour codes, the Ray workers'
    output (Ray Train's reports, each step, deprecation and progress-bar notices, C++ errors, the
    raylet's worker-pool notice),
    MLflow's notices, more than a start and an end line per stage, more than a screen of lines."""
    lines = console.splitlines()
    problems = [f"colour codes: {line!r}" for line in lines if "\x1b[" in line]
    noise = re.compile(
        r"\(\w* ?pid=|Reporting training result|Progress bars disabled|DeprecationWarning"
        r"|stages\.segtrain: step|mlflow\.store|committed \w+: \d+ rows"
        r"|worker processes have been started"
    )
    problems += [f"noise: {line}" for line in lines if noise.search(line)]
    ray_errors = [line for line in lines if RAY_CORE_LINE.search(line)]
    problems += [f"Ray C++: {line}" for line in ray_errors if RAY_DATA_ACTOR_ARGS not in line]
    for stage in STAGE_NAMES:
        started = [line for line in lines if f"stage {stage}: running" in line]
        done = [line for line in lines if re.search(rf"stage {stage} done in [\d.]+s: \w+=", line)]
        if len(started) != 1 or len(done) != 1:
            problems.append(f"{stage}: {len(started)} start and {len(done)} done lines")
    if not re.search(r"stage train_teacher done in .*: trained_steps=\d+, loss_s=", console):
        problems.append("train_teacher's done line lacks its last loss")
    if len(lines) > 45:  # 2 source lines, 16 stage lines, the dashboard, a 20-line summary
        problems.append(f"{len(lines)} lines")
    return problems


def test_a_local_run_and_a_dry_run_leave_no_secret_anywhere(
    tmp_path: Path, ray_env: dict[str, str]
) -> None:
    secret = _secrets()
    env = {
        **ray_env,
        "AWS_SECRET_ACCESS_KEY": secret["AWS"],
        "MLFLOW_TRACKING_PASSWORD": secret["MLFLOW"],
        "OPENAI_API_KEY": secret["OPENAI"],
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path / "root"
    uri = f"sqlite:///{root}/mlflow.db?token={secret['URI']}"
    data_root = f"s3://AKIAPSEUDOFLOW:{secret['DATA']}@bucket/data"
    sets = ["--set", f"tracking.uri={uri}", "--set", f"data.root={data_root}"]
    try:
        run = run_cli("run", "--config", "smoke", "--root", str(root), *sets, env=env, timeout=900)
    finally:
        kill_with_env("RAY_AUTH_TOKEN", ray_env["RAY_AUTH_TOKEN"])  # whatever Ray left
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # the run used the real URI (its SQLite file under the root), and stored only redacted ones
    shown_uri = f"sqlite:///{root}/mlflow.db?token=***"
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "pseudoflow"]
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "pseudoflow.run_id" in r.data.tags]
    assert parent.data.params["tracking.uri"] == shown_uri
    assert parent.data.params["data.root"] == "s3://***@bucket/data"
    artifact = Path(client.download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path)))
    assert yaml.safe_load(artifact.read_text())["tracking"]["uri"] == shown_uri
    (run_dir,) = (root / "pipelines").iterdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["root"] == "s3://***@bucket/data"
    assert f"open it: mlflow ui --backend-store-uri {shown_uri}" in run.stdout

    # the Ray this run started: its dashboard on loopback, said once
    console = run.stdout + run.stderr
    announce = re.compile(r"dashboard (listening|at)\b|view the dashboard", re.IGNORECASE)
    said = [line for line in console.splitlines() if announce.search(line)]
    assert len(said) == 1, said
    assert re.search(
        r"Ray dashboard listening on http://127\.0\.0\.1:\d+ \(loopback only", said[0]
    ), said
    assert "0.0.0.0" not in console
    assert _console_problems(console) == []

    # a dry run of the same config for a cluster, credentials by reference
    dry = run_cli(
        "submit",
        "--dry-run",
        "--config",
        "smoke",
        "--root",
        "s3://bucket/runs",
        "--tracking-uri",
        "http://mlflow.internal:5000",
        "--env-ref",
        "AWS_SECRET_ACCESS_KEY",
        "--env-ref",
        "MLFLOW_TRACKING_PASSWORD",
        env=env,
    )
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("dry run: nothing submitted.")
    shipped = [line.split()[-1] for line in dry.stdout.splitlines() if line.startswith("  ")]
    assert "pipeline/cli/base.py" in shipped
    assert "pseudoflow-submitted.yaml" in shipped
    assert not [p for p in shipped if any(part.startswith(".") for part in p.split("/"))]
    # the secrets as a plain value or in the config or tracking URI: refused, never echoed
    refused = [
        run_cli(
            "submit",
            "--dry-run",
            "--config",
            "smoke",
            "--root",
            "s3://bucket/runs",
            *args,
            env=env,
        )
        for args in (
            ("--tracking-uri", "http://mlflow.internal:5000", *sets),
            ("--tracking-uri", f"http://alice:{secret['MLFLOW']}@mlflow.internal:5000"),
            ("--tracking-uri", "http://m:5000", "--env", f"OPENAI_API_KEY={secret['OPENAI']}"),
        )
    ]
    assert [r.returncode for r in refused] == [2, 2, 2]

    outputs = [run.stdout, run.stderr, dry.stdout, dry.stderr]
    outputs += [text for r in refused for text in (r.stdout, r.stderr)]
    values = [*secret.values(), ray_env["RAY_AUTH_TOKEN"]]
    files = sum(1 for p in root.rglob("*") if p.is_file())
    assert files > 20
    assert (root / "mlflow.db").is_file()
    assert (root / "mlartifacts").is_dir()
    hits = _hits(values, root, *outputs)
    print(f"secrets grep: {len(values)} values, {files} files under the root, "
          f"{len(outputs)} outputs: {len(hits)} hits")  # fmt: skip
    assert hits == []
