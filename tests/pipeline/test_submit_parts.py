"""The parts of ``pseudoflow submit`` that need no cluster: what is shipped, the submission id,
the job environment (secrets by reference only), and where the token comes from."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.submit import (
    SUBMITTED_CONFIG,
    SubmitError,
    build_submission,
    check_root,
    check_tracking_uri,
    find_token,
    parse_env,
    project_files,
    stage_working_dir,
)


def _checkout(folder: Path) -> Path:
    """A small git checkout: code, a config, and things that must never be shipped."""
    files = {
        "pyproject.toml": "[project]\nname = 'x'\n",
        "pipeline/__init__.py": "",
        "stages/a.py": "A = 1\n",
        "data/big.bin": "x" * 100,
        ".venv/lib/site.py": "",
        "runs/mlflow.db": "",
        "stages/__pycache__/a.cpython-311.pyc": "",
        "weights/model.pt": "",
        "notes/ignored.txt": "secret notes\n",
        "notes/kept.md": "kept\n",
        ".gitignore": "notes/ignored.txt\n",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    return folder


def test_project_files_ship_code_never_data_runs_envs_or_ignored_files(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "src")
    expected = [
        "notes/kept.md",
        "pipeline/__init__.py",
        "pyproject.toml",
        "stages/a.py",
    ]
    assert [p.as_posix() for p in project_files(source)] == expected
    # without git, the same exclusions by pattern (the ignored note is then shipped)
    subprocess.run(["rm", "-rf", str(source / ".git")], check=True)
    assert [p.as_posix() for p in project_files(source)] == sorted([*expected, "notes/ignored.txt"])


def test_staged_config_is_the_resolved_config_and_loads_back(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "src")
    config = load_config("smoke", ["student.steps=7", "pseudolabel.policy=s4mc"])
    stage_working_dir(source, tmp_path / "job", config)
    staged = tmp_path / "job" / SUBMITTED_CONFIG
    assert yaml.safe_load(staged.read_text())["student"]["steps"] == 7
    assert load_config(str(staged)) == config


def _submission(tmp_path: Path, overrides: list[str], env: dict[str, str] | None = None) -> str:
    source = _checkout(tmp_path / "src") if not (tmp_path / "src").exists() else tmp_path / "src"
    job = tmp_path / f"job-{len(list(tmp_path.iterdir()))}"
    config = load_config("smoke", overrides)
    stage_working_dir(source, job, config)
    submission = build_submission(
        config, root="s3://b/p", tracking_uri="http://m:5000", env=env or {}, working_dir=job
    )
    return submission.submission_id


def test_submission_id_is_derived_from_what_runs(tmp_path: Path) -> None:
    first = _submission(tmp_path, ["student.steps=7"])
    assert first.startswith("pseudoflow-smoke-")
    assert len(first) == len("pseudoflow-smoke-") + 16
    assert _submission(tmp_path, ["student.steps=7"]) == first
    assert _submission(tmp_path, ["student.steps=8"]) != first
    assert _submission(tmp_path, ["student.steps=7"], {"A": "1"}) != first
    (tmp_path / "src" / "stages" / "a.py").write_text("A = 2\n")  # a code change
    assert _submission(tmp_path, ["student.steps=7"]) != first


def test_entrypoint_and_environment_of_a_submission(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "src")
    config = load_config("smoke")
    stage_working_dir(source, tmp_path / "job", config)
    env = parse_env(("AWS_ENDPOINT_URL=http://s3:9000",), ("AWS_SECRET_ACCESS_KEY=S3_SECRET",))
    submission = build_submission(
        config,
        root="s3://bucket/a b",
        tracking_uri="http://mlflow:5000",
        env=env,
        working_dir=tmp_path / "job",
        python="/opt/venv/bin/python",
        until="teach",
    )
    assert submission.entrypoint == (
        "/opt/venv/bin/python -m pipeline run --config pseudoflow-submitted.yaml "
        "--root 's3://bucket/a b' --until teach"
    )
    assert submission.runtime_env["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://s3:9000",
        "AWS_SECRET_ACCESS_KEY": "${S3_SECRET}",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "PYTHONUNBUFFERED": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    assert submission.runtime_env["working_dir"] == str(tmp_path / "job")
    assert ".venv" in submission.runtime_env["excludes"]


def test_env_secrets_only_by_reference_and_names_checked() -> None:
    assert parse_env((), ("AWS_ACCESS_KEY_ID",)) == {"AWS_ACCESS_KEY_ID": "${AWS_ACCESS_KEY_ID}"}
    for secret in ("AWS_SECRET_ACCESS_KEY=abc", "MLFLOW_TRACKING_PASSWORD=abc", "MY_TOKEN=abc"):
        with pytest.raises(SubmitError, match="looks like a secret") as info:
            parse_env((secret,), ())
        assert "abc" not in str(info.value)
    with pytest.raises(SubmitError, match="expected NAME=VALUE"):
        parse_env(("REGION",), ())
    with pytest.raises(SubmitError, match="upper case"):
        parse_env((), ("aws-key",))
    with pytest.raises(SubmitError, match="upper case"):
        parse_env((), ("A=${B}",))


def test_root_and_tracking_uri_checks() -> None:
    assert check_root("s3://bucket/prefix") == "s3://bucket/prefix"
    assert check_root("/shared/runs") == "/shared/runs"
    with pytest.raises(SubmitError, match="relative path"):
        check_root("runs")
    assert check_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    with pytest.raises(SubmitError, match="--tracking-uri"):
        check_tracking_uri(None)
    with pytest.raises(SubmitError, match="carries a password") as info:
        check_tracking_uri("https://alice:hunter2@mlflow.example.com")
    assert "hunter2" not in str(info.value)


def test_token_comes_from_the_flag_then_env_then_token_path_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert find_token() is None
    home = tmp_path / ".ray" / "auth_token"
    home.parent.mkdir()
    home.write_text("home-token\n")
    assert (find_token().value, find_token().source) == ("home-token", str(home))  # type: ignore[union-attr]
    by_path = tmp_path / "path-token"
    by_path.write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(by_path))
    assert find_token().value == "path-token"  # type: ignore[union-attr]
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    token = find_token()
    assert (token.value, token.source) == ("env-token", "RAY_AUTH_TOKEN")  # type: ignore[union-attr]
    assert "env-token" not in repr(token)
    flag = tmp_path / "flag-token"
    flag.write_text("flag-token\n")
    assert find_token(str(flag)).value == "flag-token"  # type: ignore[union-attr]
    flag.write_text("  \n")
    with pytest.raises(SubmitError, match="is empty"):
        find_token(str(flag))
    with pytest.raises(SubmitError, match="cannot read the Ray token"):
        find_token(str(tmp_path / "missing"))
