"""Credentials never shown or stored as they are: a URL's ``user:password@`` and secret query
values become ``***`` in MLflow params and tags, the config artifact and files, log lines and the
summary, while the run keeps the real value."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import yaml

from pipeline.cli import format_summary
from pipeline.config import PipelineConfig, flatten, load_config, to_yaml
from pipeline.redact import has_credentials, redact, redact_logs
from pipeline.runner import RunSummary


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://alice:pf-pw@mlflow.example.com", "https://***@mlflow.example.com"),
        ("postgresql+psycopg2://u:pf-pw@db:5432/m", "postgresql+psycopg2://***@db:5432/m"),
        ("HTTP://u:p@pf-pw@host/x", "HTTP://***@host/x"),  # an '@' in the password
        ("sqlite:////r/mlflow.db?token=pf-pw&x=1", "sqlite:////r/mlflow.db?token=***&x=1"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Date=1&X-Amz-Signature=pf-pw",
            "https://b.s3.amazonaws.com/k?X-Amz-Date=1&X-Amz-Signature=***",
        ),
        ("https://acc.blob/x?sv=1&sig=pf-pw%3D", "https://acc.blob/x?sv=1&sig=***"),
        ("uri 'x://u:pf-pw@h' and \"y://v:pf-pw@i\"", "uri 'x://***@h' and \"y://***@i\""),
    ],
)
def test_redact_masks_passwords_and_secret_query_values(text: str, shown: str) -> None:
    assert redact(text) == shown
    assert has_credentials(text)


@pytest.mark.parametrize(
    "text",
    [
        "s3://bucket/prefix",
        "http://mlflow:5000/path@v2",  # a port, then an '@' in the path: no password
        "sqlite:////r/mlflow.db",
        "ssh://git@github.com/x",
        "http://[::1]:5000/?page=2",
    ],
)
def test_redact_leaves_urls_without_credentials_alone(text: str) -> None:
    assert redact(text) == text
    assert not has_credentials(text)


def _secret_config() -> tuple[PipelineConfig, str]:
    uri = "sqlite:////r/mlflow.db?token=pf-uri-pw"
    config = load_config(
        "smoke", [f"tracking.uri={uri}", "data.root=s3://AKIAPF:pf-data-pw@bucket/data"]
    )
    return config, uri


def test_params_and_config_yaml_are_redacted_the_config_keeps_the_real_values() -> None:
    config, uri = _secret_config()
    flat = flatten(config)
    assert flat["tracking.uri"] == "sqlite:////r/mlflow.db?token=***"
    assert flat["data.root"] == "s3://***@bucket/data"
    text = to_yaml(config)
    assert "pf-uri-pw" not in text
    assert "pf-data-pw" not in text
    shown = yaml.safe_load(text)
    assert shown["tracking"]["uri"] == "sqlite:////r/mlflow.db?token=***"
    assert shown["data"]["root"] == "s3://***@bucket/data"
    assert config.tracking.uri == uri  # what the run uses


def test_tracker_stores_params_tags_and_text_redacted(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "x", f"{tmp_path}/artifacts")
    run = tracker.start_run("r", {"source": "https://u:pf-pw@h/x"})
    tracker.log_params(run, {"data.root": "https://u:pf-pw@h/x", "plain": "s3://b/p"})
    tracker.set_tags(run, {"where": "https://h/x?sig=pf-pw"})
    tracker.log_text(run, "root: https://u:pf-pw@h/x\n", "config.yaml")
    tracker.end_run(run)
    data = MlflowClient(tracking_uri=uri).get_run(run).data
    assert data.params == {"data.root": "https://***@h/x", "plain": "s3://b/p"}
    assert data.tags["source"] == "https://***@h/x"
    assert data.tags["where"] == "https://h/x?sig=***"
    (text,) = list((tmp_path / "artifacts").rglob("config.yaml"))
    assert text.read_text() == "root: https://***@h/x\n"
    assert b"pf-pw" not in (tmp_path / "mlflow.db").read_bytes()


def test_summary_shows_the_tracking_uri_redacted() -> None:
    summary = RunSummary(
        run_id="r",
        mlflow_run_id="m",
        tracking_uri="https://u:pf-pw@mlflow:5000/",
        root="/r",
        experiment_id="3",
    )
    text = format_summary(summary)
    assert "open it: https://***@mlflow:5000/#/experiments/3/runs/m" in text  # the run's page
    database = RunSummary("r", "m", "sqlite:////data/runs/mlflow.db", "/data/runs")
    assert "open it: mlflow ui --backend-store-uri sqlite:////data/runs/mlflow.db" in (
        format_summary(database)
    )
    assert "pf-pw" not in text
    assert summary.tracking_uri == "https://u:pf-pw@mlflow:5000/"  # the report still uses it


def test_log_records_and_tracebacks_are_redacted() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.secrets.redaction")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        redact_logs(logger)
        redact_logs(logger)  # once per handler
        assert len(handler.filters) == 1
        logger.warning("folder %s: %d images", "https://u:pf-pw@h/data", 3)
        try:
            raise OSError("cannot open sqlite:////r/m.db?token=pf-pw")
        except OSError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    shown = stream.getvalue()
    assert "folder https://***@h/data: 3 images" in shown
    assert "OSError: cannot open sqlite:////r/m.db?token=***" in shown
    assert "pf-pw" not in shown


def test_cli_logging_redacts_every_record(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import _setup_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh `pseudoflow` process
    # Earlier tests in the same process may have given the package loggers handlers of their own
    # (a Ray worker's logging setup), stopped their propagation or disabled logging: undo that.
    monkeypatch.setattr(root.manager, "disable", 0)
    for name in ("stages", "stages.ingest", "stages.ingest.folder"):
        named = logging.getLogger(name)
        monkeypatch.setattr(named, "handlers", [])
        monkeypatch.setattr(named, "propagate", True)
        monkeypatch.setattr(named, "disabled", False)
        monkeypatch.setattr(named, "level", logging.NOTSET)
    _setup_logging(False)
    try:
        logging.getLogger("stages.ingest.folder").info("folder %s: 3 images", "https://u:pf-pw@h/d")
    finally:
        for handler in root.handlers:
            handler.close()
    shown = capsys.readouterr().err
    assert "stages.ingest.folder: folder https://***@h/d: 3 images" in shown
    assert "pf-pw" not in shown


def test_run_error_names_the_source_without_its_secret(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    result = run_cli(
        "run",
        "--config",
        "smoke",
        "--root",
        str(tmp_path / "root"),
        "--set",
        "data.source=folder",
        "--set",
        "data.root=file:///nonexistent/data?token=pf-pw-77",
    )
    assert result.returncode == 2
    assert "error: data folder 'file:///nonexistent/data?token=***' does not exist" in (
        result.stderr
    )
    assert "pf-pw-77" not in result.stdout + result.stderr
