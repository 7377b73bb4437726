"""The summary ``pseudoflow run`` ends with: headline numbers, then one line per stage."""

from __future__ import annotations

from pipeline.cli import format_summary
from pipeline.runner import RunSummary


def test_summary_lists_every_stage_with_how_it_ran() -> None:
    summary = RunSummary(
        run_id="smoke-20261121T100000-abcdef",
        mlflow_run_id="0123",
        tracking_uri="sqlite:////r/mlflow.db",
        root="/r",
        metrics={"evaluate.teacher_miou": 0.5, "evaluate.student_miou": 0.61234},
        stage_seconds={"ingest": 0.04, "teach": 12.25},
        cache={"ingest": ("a" * 64, True), "teach": ("b" * 64, False)},
    )
    lines = format_summary(summary).splitlines()
    assert lines[0] == "teacher mIoU (val)      0.5000"
    assert lines[1] == "student mIoU (val)      0.6123"
    assert lines[2] == "pseudo-label coverage   n/a"
    assert "wall time (s)           12.3" in lines
    assert "stages reused / run     1 / 1" in lines
    assert lines[-3:] == [
        "stage           how         seconds  key",
        "ingest          cache hit       0.0  aaaaaaaaaaaa",
        "teach           ran            12.2  bbbbbbbbbbbb",
    ]
