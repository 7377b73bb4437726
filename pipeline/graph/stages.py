"""The stages of a run in one explicit list (rounds 2..N added per config), checked when built."""

from __future__ import annotations

import logging
from dataclasses import replace

from pipeline.config import PipelineConfig
from pipeline.graph.keys import (
    detect_family,
    evaluate_fields,
    ingest_fields,
    pseudolabel_key_fields,
    student_fields,
    teach_family,
    train_fields,
    uses_ground_truth,
    uses_wpl,
)
from pipeline.graph.model import Round, Stage, final_round
from pipeline.graph.runs import (
    evaluate_figures,
    run_detect,
    run_evaluate,
    run_ingest,
    run_pseudolabel,
    run_teach,
    run_train_detector,
    run_train_student,
    run_train_teacher,
)
from stages.detect import table as detect_table
from stages.ingest import stage as ingest
from stages.pseudolabel import table as pseudolabel_table
from stages.teach import table as teach_table

logger = logging.getLogger(__name__)


def _round_stages(round_: Round) -> tuple[Stage, Stage, Stage]:
    """teach -> pseudolabel -> train_student of one round, reading the round's teacher."""
    signals, labels = round_.name("teacher_signals"), round_.name("pseudolabels")
    return (
        Stage(
            round_.name("teach"),
            ("images", round_.teacher),
            (signals,),
            lambda ctx: run_teach(ctx, round_),
            lambda ctx: {
                **teach_family(ctx, round_),
                "labeled": ctx.digest("images", "labeled"),
                "unlabeled": ctx.digest("images", "unlabeled"),
            },
            teach_table.SCHEMA,
            section="teach",
            image_inputs=(("labeled", "inference"), ("unlabeled", "inference")),
            key_figures=("images_inferred", "shards_reused"),
        ),
        Stage(
            round_.name("pseudolabel"),
            (signals, "detections", "images"),  # images: ground_truth's masks
            (labels,),
            lambda ctx: run_pseudolabel(ctx, round_),
            lambda ctx: pseudolabel_key_fields(
                ctx.config,
                ctx.digest(signals),
                ctx.digest("detections") if uses_wpl(ctx.config) else None,
                ctx.digest("images", "unlabeled") if uses_ground_truth(ctx.config) else None,
            ),
            pseudolabel_table.SCHEMA,
            section="pseudolabel",
            key_figures=("images", "mean_image_coverage"),
        ),
        Stage(
            round_.name("train_student"),
            ("images", labels),
            (round_.name("student"),),
            lambda ctx: run_train_student(ctx, round_),
            lambda ctx: student_fields(ctx, round_),
            "segmenter/1",
            section="student",
            image_inputs=(("labeled", "train"), ("unlabeled", "train")),
            label_input=labels,
            key_figures=("trained_steps", "loss_s", "loss_u", "steps_per_s"),
        ),
    )


# evaluate's figures that the pipeline run logs as its own (``teacher_miou``, ...)
EVALUATE_SUMMARY = ("teacher_miou", "student_miou", "pseudolabel_coverage", "pseudolabel_precision")


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        ("source",),
        ("images", "quarantine"),
        run_ingest,
        ingest_fields,
        ingest.SCHEMA,
        key_figures=("images", "quarantined_images"),
        split_digests=("images",),
    ),
    Stage(
        "train_teacher",
        ("images",),
        ("teacher",),
        run_train_teacher,
        lambda ctx: train_fields(ctx, ctx.config.teacher, ctx.config.teacher.weights),
        "segmenter/1",
        section="teacher",
        image_inputs=(("labeled", "train"),),
        key_figures=("trained_steps", "loss_s", "steps_per_s"),
    ),
    Stage(
        "train_detector",
        ("images",),
        ("detector",),
        run_train_detector,
        lambda ctx: train_fields(ctx, ctx.config.detector, ctx.config.detector.weights),
        "detector/1",
        lambda c: c.detector.enabled,
        section="detector",
        image_inputs=(("labeled", "train"),),
        key_figures=("trained_steps", "loss", "steps_per_s"),
    ),
    Stage(
        "detect",
        ("images", "detector"),
        ("detections",),
        run_detect,
        lambda ctx: {**detect_family(ctx), "unlabeled": ctx.digest("images", "unlabeled")},
        detect_table.SCHEMA,
        lambda c: c.detector.enabled,
        section="detect",
        image_inputs=(("unlabeled", "inference"),),
        key_figures=("images_inferred", "shards_reused", "boxes_per_image"),
    ),
    *_round_stages(Round(1)),
    Stage(
        "evaluate",
        ("images", "teacher", "student", "pseudolabels"),
        ("metrics",),
        run_evaluate,
        evaluate_fields,
        "metrics/1",
        figures=evaluate_figures,
        section="evaluate",
        image_inputs=(("val", "eval"), ("unlabeled", "eval")),
        key_figures=EVALUATE_SUMMARY,
        summary=EVALUATE_SUMMARY,
    ),
)


def all_stages(config: PipelineConfig) -> tuple[Stage, ...]:
    """Every stage of a run in order: round 1 as in ``STAGES``, then rounds 2..N, evaluate last."""
    later = [s for r in range(2, config.rounds + 1) for s in _round_stages(Round(r))]
    if not later:
        return check_graph(STAGES)
    last = final_round(config)  # evaluate reads every round's student and pseudo-labels
    students = tuple(
        Round(r).name(n) for r in range(1, last.number + 1) for n in ("student", "pseudolabels")
    )
    evaluate_stage = replace(STAGES[-1], reads=("images", "teacher", *students))
    return check_graph((*STAGES[:-1], *later, evaluate_stage))


def check_graph(stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """``stages`` as they are, after checking their declarations: unique names, each output
    written once, and every read written by an earlier stage (``source``: the data source). A
    read may come from a stage a config disables (``detections`` without a detector): the stage
    then runs without it, as its key fields say."""
    written, names = {"source"}, set()
    for stage in stages:
        if stage.name in names:
            raise ValueError(f"two stages are named {stage.name!r}")
        names.add(stage.name)
        unknown = [name for name in stage.reads if name not in written]
        if unknown:
            raise ValueError(
                f"stage {stage.name!r} reads {', '.join(unknown)}, which no earlier stage writes"
            )
        twice = written.intersection(stage.writes)
        if twice:
            raise ValueError(f"stage {stage.name!r} writes {', '.join(sorted(twice))} again")
        written.update(stage.writes)
    return stages


def planned(config: PipelineConfig) -> list[Stage]:
    return [s for s in all_stages(config) if s.enabled(config)]
