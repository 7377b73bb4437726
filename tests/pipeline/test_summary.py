"""The summary ``pseudoflow run`` ends with: headline numbers, then one line per stage."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.cli import format_summary
from pipeline.config import load_config
from pipeline.graph import Stage, all_stages, check_graph
from pipeline.runner import RunSummary, _parent_metrics, key_figures


def _stage(name: str) -> Stage:
    """A stage of the smoke config run for two rounds."""
    return next(s for s in all_stages(load_config("smoke", ["rounds=2"])) if s.name == name)


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
    assert key_figures(_stage("train_student"), metrics) == (
        "trained_steps=300, loss_s=0.4123, loss_u=0.1235, steps_per_s=6.981"
    )
    assert key_figures(_stage("train_student_r2"), metrics) == key_figures(
        _stage("train_student"), metrics
    )
    # a figure the stage lacks is left out (given weights: no training, no loss)
    assert key_figures(_stage("train_teacher"), {"trained_steps": 0.0}) == "trained_steps=0"
    # a stage with no list shows all it has, by name
    bare = _stage("ingest").declaring(key_figures=())
    assert key_figures(bare, {"b": 2.0, "a": 1.0}) == "a=1, b=2"


def test_every_stage_declares_its_config_section_and_a_later_round_its_base_s() -> None:
    config = load_config("smoke", ["rounds=3"])
    stages = {s.name: s for s in all_stages(config)}
    sections = {name: stage.section for name, stage in stages.items()}
    assert sections == {
        "ingest": None,
        "train_teacher": "teacher",
        "train_detector": "detector",
        "detect": "detect",
        **{f"teach{r}": "teach" for r in ("", "_r2", "_r3")},
        **{f"pseudolabel{r}": "pseudolabel" for r in ("", "_r2", "_r3")},
        **{f"train_student{r}": "student" for r in ("", "_r2", "_r3")},
        "evaluate": "evaluate",
    }
    assert all(s is None or s in type(config).model_fields for s in sections.values())
    assert [stages[f"train_student{r}"].label_input for r in ("", "_r2", "_r3")] == [
        "pseudolabels",
        "pseudolabels_r2",
        "pseudolabels_r3",
    ]
    assert stages["teach_r3"].image_inputs == stages["teach"].image_inputs
    assert [s.name for s in stages.values() if s.split_digests] == ["ingest"]
    # a later round renames what round 1 declares: its teach runs the round before's student
    assert [stages[f"teach{r}"].reads for r in ("", "_r2", "_r3")] == [
        ("images", "teacher"),
        ("images", "student"),
        ("images", "student_r2"),
    ]
    assert stages["pseudolabel_r3"].reads == ("teacher_signals_r3", "detections", "images")
    assert stages["pseudolabel_r3"].writes == ("pseudolabels_r3",)
    assert stages["train_student_r2"].reads == ("images", "pseudolabels_r2")
    assert stages["train_student_r2"].writes == ("student_r2",)
    assert stages["evaluate"].reads == (
        "images",
        "teacher",
        *("student", "pseudolabels", "student_r2", "pseudolabels_r2"),
        *("student_r3", "pseudolabels_r3"),
    )


def test_each_stage_is_built_from_its_own_package_declaration() -> None:
    """The run's stages carry what their packages declare (``stages.<stage>.stage``): the
    graph adds only the function, the key fields and when a stage is enabled."""
    from stages.detect.stage import DECLARATION as DETECT
    from stages.evaluate.stage import DECLARATION as EVALUATE
    from stages.ingest.stage import DECLARATION as INGEST
    from stages.pseudolabel.stage import DECLARATION as PSEUDOLABEL
    from stages.segtrain.stage import STUDENT, TEACHER
    from stages.teach.stage import DECLARATION as TEACH
    from stages.train_detector.stage import DECLARATION as DETECTOR

    declared = (INGEST, TEACHER, DETECTOR, DETECT, TEACH, PSEUDOLABEL, STUDENT, EVALUATE)
    stages = all_stages(load_config("smoke"))
    assert [s.declared for s in stages] == list(declared)
    # round 2's are round 1's, renamed
    later = {s.name: s.declared for s in all_stages(load_config("smoke", ["rounds=2"]))}
    assert later["teach_r2"] == replace(
        TEACH, name="teach_r2", reads=("images", "student"), writes=("teacher_signals_r2",)
    )
    assert later["train_student_r2"].label_input == "pseudolabels_r2"


def test_the_pipeline_run_logs_each_stage_s_declared_summary_under_its_own_name() -> None:
    stages = all_stages(load_config("smoke"))
    summary = RunSummary("run-1", "parent", "sqlite:///x.db", "/tmp/root")
    summary.metrics = {
        "ingest.quarantined_images": 2.0,
        "ingest.images": 40.0,
        "evaluate.student_miou": 0.5,
        "evaluate.teacher_miou": 0.25,
        "train_student.loss_u": 1.5,
    }
    summary.stage_seconds = {"ingest": 1.5, "evaluate": 2.0}
    assert _parent_metrics(summary, list(stages)) == {
        "quarantined_images": 2.0,
        "student_miou": 0.5,
        "teacher_miou": 0.25,
        "total_seconds": 3.5,
    }


def test_the_graph_refuses_a_read_before_its_write_and_a_second_writer() -> None:
    stages = all_stages(load_config("smoke"))
    teach = next(s for s in stages if s.name == "teach")
    with pytest.raises(ValueError, match="'teach' reads images, teacher, which no earlier"):
        check_graph((teach, *stages))
    with pytest.raises(ValueError, match="stage 'copy' writes teacher_signals again"):
        check_graph((*stages, teach.declaring(name="copy")))
    with pytest.raises(ValueError, match="two stages are named 'teach'"):
        check_graph((*stages, teach.declaring(writes=())))
