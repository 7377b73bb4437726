"""The parts of ``pseudoflow submit`` that need no cluster: what is shipped, the submission id,
the job environment (secrets by reference only), and where the token comes from."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_config
from pipeline.provenance import COMMIT_ENV, git_commit
from pipeline.submit.checks import (
    SubmitError,
    check_config,
    check_root,
    check_tracking_uri,
    parse_env,
)
from pipeline.submit.cluster import find_token
from pipeline.submit.shipping import (
    SUBMITTED_CONFIG,
    project_files,
    project_root,
    stage_working_dir,
    untracked_package_files,
)
from pipeline.submit.submission import build_submission

# Credential files a checkout may hold, tracked by mistake or not: never shipped.
SECRET_FILES = (
    ".env",
    "stages/.env.local",
    ".aws/credentials",
    ".ray/auth_token",
    ".ssh/config",
    "id_rsa",
    "id_rsa.pub",
    "deploy/server.pem",
    "pipeline/gcp-credentials.json",
    "stages/tls.key",
    "prod.env",
)


def _checkout(folder: Path, *, track: bool = True) -> Path:
    """A small git checkout: code, a config, credential files and things that must never be
    shipped. With ``track``, everything but the untracked and ignored notes is ``git add``ed
    (credential files included: committed by mistake) and an ignored note is force-added."""
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
        "notes/ignored-but-tracked.txt": "forced\n",
        "notes/kept.md": "kept\n",
        "notes/untracked.md": "not added\n",
        "stages/new_untracked.py": "B = 2\n",
        ".gitignore": "notes/ignored*.txt\n",
        **{name: "pf-secret-value\n" for name in SECRET_FILES},
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    if track:
        untracked = {"notes/untracked.md", "stages/new_untracked.py", "notes/ignored.txt"}
        add = [n for n in files if n not in untracked and n != "notes/ignored-but-tracked.txt"]
        subprocess.run(["git", "-C", str(folder), "add", "-f", "--", *add], check=True)
        forced = ["git", "-C", str(folder), "add", "-f", "notes/ignored-but-tracked.txt"]
        subprocess.run(forced, check=True)
    return folder


def test_project_files_ship_tracked_code_never_secrets_data_runs_envs_or_ignored_files(
    tmp_path: Path,
) -> None:
    source = _checkout(tmp_path / "src")
    # tracked only: not the untracked note or module, not the tracked-but-ignored note, and no
    # credential file although every one of them is tracked
    expected = ["notes/kept.md", "pipeline/__init__.py", "pyproject.toml", "stages/a.py"]
    assert [p.as_posix() for p in project_files(source)] == expected
    assert [p.as_posix() for p in untracked_package_files(source)] == ["stages/new_untracked.py"]
    # without git: only the package (pyproject.toml, pipeline/, stages/), never a credential
    subprocess.run(["rm", "-rf", str(source / ".git")], check=True)
    shipped = [p.as_posix() for p in project_files(source)]
    assert shipped == [
        "pipeline/__init__.py",
        "pyproject.toml",
        "stages/a.py",
        "stages/new_untracked.py",
    ]
    assert untracked_package_files(source) == []


def test_untracked_credential_files_are_not_shipped_either(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "src", track=False)  # nothing tracked: a fresh checkout
    (source / "stages" / "b.py").write_text("")
    subprocess.run(["git", "-C", str(source), "add", "stages/b.py"], check=True)
    assert [p.as_posix() for p in project_files(source)] == ["stages/b.py"]


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
        # this checkout's commit: the job's MLflow source tag (its files carry no .git)
        COMMIT_ENV: git_commit(),
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


def test_env_names_that_look_secret_are_refused_as_whole_words() -> None:
    for name in (
        "OPENAI_API_KEY",
        "GITHUB_AUTH",
        "DB_PASSWD",
        "SSH_PRIVATE_KEY",
        "HF_TOKEN",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "APP_SECRETS",
    ):
        with pytest.raises(SubmitError) as info:
            parse_env((f"{name}=pf-value-1234",), ())
        message = str(info.value)
        assert f"{name} looks like a secret" in message
        assert f"--env-ref {name}" in message
        assert "cluster nodes' own environment" in message
        assert "instance role" in message
        assert "pf-value-1234" not in message
    # a word inside another word is not a secret's name; nor are plain URLs without a password
    plain = (
        "AWS_ENDPOINT_URL=http://s3:9000",
        "AWS_DEFAULT_REGION=eu-west-1",
        "KEYBOARD=us",
        "MONKEY_COUNT=3",
        "AUTHOR=me",
        "TOKENIZERS_PARALLELISM=false",
        "HTTP_PROXY=http://proxy.internal:3128",
        "NOTES=a:b@c",
    )
    assert parse_env(plain, ()) == dict(item.split("=", 1) for item in plain)


def test_env_values_with_credentials_are_refused_without_echoing_them() -> None:
    for value, why in (
        ("postgresql://app:pf-db-pw@db:5432/app", "a URL with a password in it"),
        ("HTTPS://app:pf-db-pw@db.example.com/x", "a URL with a password in it"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Signature=pf-db-pw", "X-Amz-Signature"),
    ):
        with pytest.raises(SubmitError) as info:
            parse_env((f"DATABASE_URL={value}",), ())
        message = str(info.value)
        assert message.startswith("--env DATABASE_URL=...: the value of DATABASE_URL is ")
        assert why in message
        assert "--env-ref DATABASE_URL" in message
        assert "cluster nodes' own environment" in message
        assert "pf-db-pw" not in message
    # a bad name is reported without the value either
    with pytest.raises(SubmitError, match="upper case") as bad:
        parse_env(("openai_api_key=pf-db-pw",), ())
    assert "pf-db-pw" not in str(bad.value)


def test_tracking_uri_root_and_config_with_credentials_are_refused() -> None:
    for uri in (
        "postgresql+psycopg2://mlflow:pf-pw-1@db:5432/mlflow",
        "HTTPS://alice:pf-pw-1@mlflow.example.com",
        "http://alice:pf%2Fpw-1@mlflow:5000",
    ):
        with pytest.raises(SubmitError, match="the tracking URI carries a password") as info:
            check_tracking_uri(uri)
        assert "pf-pw-1" not in str(info.value)
        assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in str(info.value)
    with pytest.raises(SubmitError, match=r"carries a secret: .*\(token\)") as query:
        check_tracking_uri("https://mlflow.example.com/?token=pf-pw-1")
    assert "pf-pw-1" not in str(query.value)
    assert check_tracking_uri("https://alice@mlflow.example.com") == (
        "https://alice@mlflow.example.com"  # a user name alone is no secret
    )
    with pytest.raises(SubmitError, match="--root is a URL with a password") as root:
        check_root("s3://AKIA:pf-pw-1@bucket/runs")
    assert "pf-pw-1" not in str(root.value)
    config = load_config("smoke", ["data.root=https://u:pf-pw-1@host/data"])
    with pytest.raises(SubmitError, match=r"data\.root is a URL with a password") as shipped:
        check_config(config)
    assert "pf-pw-1" not in str(shipped.value)
    assert check_config(load_config("smoke")) == load_config("smoke")


def _dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.submit import cluster, shipping

    source = _checkout(tmp_path / "src")
    monkeypatch.setattr(shipping, "project_root", lambda: source)

    def no_cluster(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run must not contact a cluster")

    monkeypatch.setattr(cluster, "Cluster", no_cluster)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = ["submit", "--config", "smoke", "--root", "s3://b/p", "--tracking-uri", "http://m:5000"]
    result = CliRunner().invoke(main, [*base, *args])
    return result.exit_code, result.stdout, result.stderr


def test_dry_run_lists_what_would_be_shipped_and_submits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = _dry_run(
        tmp_path, monkeypatch, "--dry-run", "--env-ref", "AWS_SECRET_ACCESS_KEY"
    )
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "dry run: nothing submitted. The job's working directory would hold:"
    listed = [line.split()[-1] for line in lines[1:6]]
    assert listed == [
        "notes/kept.md",
        "pipeline/__init__.py",
        "pseudoflow-submitted.yaml",
        "pyproject.toml",
        "stages/a.py",
    ]
    config_size = len(yaml.safe_dump(load_config("smoke").model_dump(mode="json"), sort_keys=True))
    total = len("kept\n") + len("[project]\nname = 'x'\n") + len("A = 1\n") + config_size
    assert lines[6] == f"5 files, {total / 1024:.1f} KiB in all"
    assert lines[7].startswith("submission id: pseudoflow-smoke-")
    assert "env: AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY}" in lines
    assert "pf-secret-value" not in out + err
    assert "warning: not shipped (untracked in git; git add them): stages/new_untracked.py" in err
    # without --dry-run a cluster address is needed
    code, out, err = _dry_run(tmp_path / "again", monkeypatch)
    assert code == 2
    assert "Missing option '--address'" in err


def test_a_sweep_is_submitted_as_the_sweep_command_with_its_grid_in_the_shipped_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.submit import shipping

    shipped: dict[str, str] = {}
    real_stage = shipping.stage_working_dir

    def keep_config(source: Path, dest: Path, config: Any) -> list[tuple[str, int]]:
        staged = real_stage(source, dest, config)
        shipped["yaml"] = (dest / shipping.SUBMITTED_CONFIG).read_text()
        return staged

    monkeypatch.setattr(shipping, "stage_working_dir", keep_config)
    args = ("--dry-run", "--sweep", "--grid", "pseudolabel.tau=0.9,0.95", "--seeds", "2")
    code, out, err = _dry_run(tmp_path, monkeypatch, *args)
    assert code == 0, out + err
    entrypoint = next(line for line in out.splitlines() if line.startswith("entrypoint: "))
    assert entrypoint == (
        f"entrypoint: python -m pipeline sweep --config {shipping.SUBMITTED_CONFIG} --root s3://b/p"
    )
    sweep = yaml.safe_load(shipped["yaml"])["sweep"]
    assert sweep["grid"] == {"pseudolabel.tau": [0.9, 0.95]}
    assert sweep["seeds"] == 2
    assert set(sweep["references"]) == {"supervised", "full"}
    # a sweep's options without --sweep, and --until with it, are refused
    code, out, err = _dry_run(tmp_path / "b", monkeypatch, "--dry-run", "--grid", "rounds=1,2")
    assert code == 2
    assert "--grid, --seeds, --parallel and --no-references go with --sweep" in err
    code, out, err = _dry_run(
        tmp_path / "c", monkeypatch, "--dry-run", "--sweep", "--until", "teach"
    )
    assert code == 2
    assert "--until stops a single run" in err


def test_the_project_root_is_the_checkout_this_package_runs_from() -> None:
    """What a submission ships from: the folder holding pyproject.toml, pipeline/ and stages/
    (found from the package, so moving the submit code inside it does not move the root)."""
    root = Path(__file__).resolve().parents[2]
    assert project_root() == root
    assert (root / "pyproject.toml").is_file()
