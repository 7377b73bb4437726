"""The stages of a run in one explicit list (rounds 2..N added per config), checked when built:
each stage as its package declares it (``stages.<stage>.stage``), with the function that maps
the config to its arguments (``runs``) and what its cache key is computed from (``keys``)."""

from __future__ import annotations

import logging

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
from stages.detect import stage as detect
from stages.evaluate import stage as evaluate
from stages.ingest import stage as ingest
from stages.pseudolabel import stage as pseudolabel
from stages.segtrain import stage as segtrain
from stages.teach import stage as teach
from stages.train_detector import stage as train_detector

logger = logging.getLogger(__name__)


# a round's stages as round 1 declares them, and what they write (a later round renames both)
ROUND = (teach.DECLARATION, pseudolabel.DECLARATION, segtrain.STUDENT)
ROUND_OUTPUTS = frozenset(name for declared in ROUND for name in declared.writes)


def _round_stages(round_: Round) -> tuple[Stage, Stage, Stage]:
    """teach -> pseudolabel -> train_student of one round, reading the round's teacher."""
    signals = round_.name("teacher_signals")
    teach_declared, pseudolabel_declared, student_declared = (
        round_.declaration(declared, ROUND_OUTPUTS) for declared in ROUND
    )
    return (
        Stage(
            teach_declared,
            lambda ctx: run_teach(ctx, round_),
            lambda ctx: {
                **teach_family(ctx, round_),
                "labeled": ctx.digest("images", "labeled"),
                "unlabeled": ctx.digest("images", "unlabeled"),
            },
        ),
        Stage(
            pseudolabel_declared,
            lambda ctx: run_pseudolabel(ctx, round_),
            lambda ctx: pseudolabel_key_fields(
                ctx.config,
                ctx.digest(signals),
                ctx.digest("detections") if uses_wpl(ctx.config) else None,
                ctx.digest("images", "unlabeled") if uses_ground_truth(ctx.config) else None,
            ),
        ),
        Stage(
            student_declared,
            lambda ctx: run_train_student(ctx, round_),
            lambda ctx: student_fields(ctx, round_),
        ),
    )


def _detector_enabled(config: PipelineConfig) -> bool:
    return config.detector.enabled


STAGES: tuple[Stage, ...] = (
    Stage(ingest.DECLARATION, run_ingest, ingest_fields),
    Stage(
        segtrain.TEACHER,
        run_train_teacher,
        lambda ctx: train_fields(ctx, ctx.config.teacher, ctx.config.teacher.weights),
    ),
    Stage(
        train_detector.DECLARATION,
        run_train_detector,
        lambda ctx: train_fields(ctx, ctx.config.detector, ctx.config.detector.weights),
        enabled=_detector_enabled,
    ),
    Stage(
        detect.DECLARATION,
        run_detect,
        lambda ctx: {**detect_family(ctx), "unlabeled": ctx.digest("images", "unlabeled")},
        enabled=_detector_enabled,
    ),
    *_round_stages(Round(1)),
    Stage(evaluate.DECLARATION, run_evaluate, evaluate_fields, figures=evaluate_figures),
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
    evaluate_stage = STAGES[-1].declaring(reads=("images", "teacher", *students))
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
