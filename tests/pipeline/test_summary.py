"""The summary ``pseudoflow run`` ends with: headline numbers, then one line per stage."""

from __future__ import annotations

from pipeline.cli import format_summary
from pipeline.runner import RunSummary, key_figures


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


def test_a_stage_done_line_shows_its_key_figures_in_order() -> None:
    metrics = {
        "seconds": 63.7,
        "grad_norm": 1.6,
        "steps_per_s": 6.981,
        "loss_u": 0.12345,
        "loss_s": 0.41234,
        "trained_steps": 300.0,
        "lr": 0.02,
    }
    assert key_figures("train_student", metrics) == (
        "trained_steps=300, loss_s=0.4123, loss_u=0.1235, steps_per_s=6.981"
    )
    assert key_figures("train_student_r2", metrics) == key_figures("train_student", metrics)
    # a figure the stage lacks is left out (given weights: no training, no loss)
    assert key_figures("train_teacher", {"trained_steps": 0.0}) == "trained_steps=0"
    # a stage with no list shows all it has, by name
    assert key_figures("other", {"b": 2.0, "a": 1.0}) == "a=1, b=2"
