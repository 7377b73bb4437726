"""One error hierarchy: each kind carries its exit code, and the CLI turns any of them, from any
command, into one line with credentials masked."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import pipeline.cache.plan
from pipeline import config as pipeline_config
from pipeline.cli import main
from pipeline.report import ReportError
from pipeline.runner import run_pipeline, tracking_uri
from stages.core import errors
from stages.core.detectors import BackendUnavailable
from stages.core.storage import CorruptFile, StorageError
from stages.ingest.folder import SourceError


def test_every_reported_error_is_one_kind_with_its_exit_code() -> None:
    kinds = {
        errors.ConfigError: 2,
        errors.SourceError: 2,
        errors.ModelError: 2,
        errors.StorageError: 1,
    }
    for kind, code in kinds.items():
        assert issubclass(kind, errors.PseudoflowError)
        assert kind.exit_code == code
    # the names the stages have always raised are these, not copies
    assert SourceError is errors.SourceError
    assert StorageError is errors.StorageError
    assert issubclass(pipeline_config.ConfigError, errors.ConfigError)
    assert issubclass(BackendUnavailable, errors.ModelError)
    assert issubclass(CorruptFile, errors.StorageError)
    assert issubclass(ReportError, errors.PseudoflowError)
    assert ReportError.exit_code == 2
    # callers that caught ValueError / RuntimeError still do
    assert issubclass(errors.SourceError, ValueError)
    assert issubclass(errors.StorageError, RuntimeError)


def test_a_missing_weights_file_is_a_model_error_and_an_unknown_stage_a_config_error(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no-such.pt"
    config = pipeline_config.load_config("smoke", [f"teacher.weights={missing}"])
    with pytest.raises(errors.ModelError, match=r"teacher.weights='.*no-such.pt' does not exist"):
        run_pipeline(config, str(tmp_path / "root"))
    smoke = pipeline_config.load_config("smoke")
    with pytest.raises(errors.ConfigError, match="unknown stage 'tech' for --until; choose one"):
        run_pipeline(smoke, str(tmp_path / "root"), until="tech")
    with pytest.raises(errors.ConfigError, match=r"is remote: set tracking\.uri"):
        tracking_uri(smoke, "s3://bucket/root")
    assert not (tmp_path / "root" / "pipelines").exists()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.StorageError("the manifest of images lists a shard that is gone"), 1),
        (errors.SourceError("the split list at https://alice:hunter2@host/l.txt is empty"), 2),
    ],
)
def test_any_command_ends_a_reported_error_with_one_masked_line_and_its_code(
    monkeypatch: pytest.MonkeyPatch, error: errors.PseudoflowError, code: int
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(pipeline.cache.plan, "plan", fail)
    result = CliRunner().invoke(main, ["plan", "--config", "smoke"])
    assert result.exit_code == code
    assert result.output.strip().splitlines()[-1] == f"error: {error}".replace(
        "alice:hunter2@", "***@"
    )
    assert "hunter2" not in result.output
    assert "Traceback" not in result.output


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise KeyError("not a user's error")

    monkeypatch.setattr(pipeline.cache.plan, "plan", fail)
    result = CliRunner().invoke(main, ["plan", "--config", "smoke"])
    assert isinstance(result.exception, KeyError)
