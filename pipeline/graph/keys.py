"""What each stage's cache key is computed from: its inputs' digests and the semantic fields of
its config section (execution-only settings never enter a key)."""

from __future__ import annotations

import logging
from typing import Any

import fsspec

from pipeline.config import PipelineConfig
from pipeline.graph.model import Context, Round, final_round
from stages.core.config import StrictModel
from stages.core.errors import ModelError
from stages.core.run_config import TrainingRun
from stages.core.shards import file_digest
from stages.pseudolabel.config import GROUND_TRUTH
from stages.pseudolabel.maps import signal_spec
from stages.teach.table import SignalSpec

logger = logging.getLogger(__name__)


def semantic(section: StrictModel, also: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The section's settings that enter a key: all but those it declares execution only
    (``EXECUTION``) and ``also``."""
    execution = section.EXECUTION | also
    return {k: v for k, v in section.model_dump(mode="json").items() if k not in execution}


def given_weights(path: str) -> str:
    """sha256 of a weights file the config names (local path or URL)."""
    fs, inner = fsspec.core.url_to_fs(path)
    if not fs.exists(inner):
        raise ModelError(f"weights file {path!r} does not exist")
    return file_digest(fs, inner)


def pseudolabel_fields(config: PipelineConfig) -> dict[str, Any]:
    """The pseudo-label settings that matter for the chosen policy (others' options excluded;
    ground_truth: the policy alone)."""
    cfg = config.pseudolabel
    fields: dict[str, Any] = {"policy": cfg.policy}
    if cfg.policy in {"threshold", "wpl"}:
        fields["tau"] = cfg.tau
    if cfg.policy in {"s4mc", "csl", "wpl"}:
        fields[cfg.policy] = getattr(cfg, cfg.policy).model_dump(mode="json")
    return fields


def pseudolabel_key_fields(
    config: PipelineConfig, signals: str, detections: str | None, unlabeled: str | None = None
) -> dict[str, Any]:
    """What the pseudolabel stage's key is computed from: its inputs' digests (the detections
    only for WPL) and the chosen policy's settings. ground_truth reads no teacher signals: its
    key is the unlabeled images' digest (``unlabeled``, masks included), the policy and the
    classes, so every teacher and seed shares one ground-truth set of the same images."""
    if uses_ground_truth(config):
        if unlabeled is None:
            raise ValueError("the ground_truth policy's key needs the unlabeled images' digest")
        return {
            "unlabeled": unlabeled,
            **pseudolabel_fields(config),
            "num_classes": config.data.num_classes,
        }
    return {
        "signals": signals,
        "detections": detections if uses_wpl(config) else None,
        **pseudolabel_fields(config),
        "num_classes": config.data.num_classes,
    }


def train_fields(
    ctx: Context, section: TrainingRun, weights: str | None, unread: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """A training stage's key fields: the given weights by content, or what trains (the
    section's semantic settings less ``unread``, the labeled images, geometry, seed, init)."""
    base = {"num_classes": ctx.config.data.num_classes}
    if weights:
        return {**base, "arch": getattr(section, "arch", None), "weights": given_weights(weights)}
    fields = {
        **base,
        "train": semantic(section, unread),
        "labeled": ctx.digest("images", "labeled"),
        **geometry(ctx),
        "crop_size": ctx.config.data.crop,
        "seed": ctx.config.seed,
    }
    if section.init:  # the pretrained weights by content, wherever they are read from
        fields["init"] = given_weights(section.init)
    return fields


def geometry(ctx: Context) -> dict[str, Any]:
    """How images reach the models: fitted (long side, aspect kept) to an image_size canvas."""
    return {"image_size": ctx.config.data.image_size, "canvas": "fit-long-side-pad"}


def ingest_fields(ctx: Context) -> dict[str, Any]:
    return {"source": ctx.source_digest, "num_classes": ctx.config.data.num_classes}


def detect_family(ctx: Context) -> dict[str, Any]:
    return {
        "stage": "detect",
        "detector": ctx.digest("detector"),
        "min_score": ctx.config.detect.min_score,
        **geometry(ctx),
    }


def stored_signals(ctx: Context) -> SignalSpec:
    return signal_spec(ctx.config.pseudolabel, ctx.config.teach.policies)


def teach_family(ctx: Context, round_: Round) -> dict[str, Any]:
    return {
        "stage": "teach",
        "teacher": ctx.digest(round_.teacher),
        # teach.tta only where set: the keys of runs without it stay what they were
        "teach": semantic(
            ctx.config.teach, frozenset() if ctx.config.teach.tta.enabled else frozenset({"tta"})
        ),
        "signals": stored_signals(ctx).model_dump(),
        **geometry(ctx),
    }


# What only the unlabeled loss reads: a student with alpha 0 (a sweep's `supervised` row) trains on
# the labeled batches alone, exactly as these settings, the unlabeled images and the pseudo-labels
# vary (tests/stages/test_segtrain.py checks it weight for weight).
UNLABELED_ONLY = frozenset({"unlabeled_batch_size", "cutmix", "strong"})


def student_fields(ctx: Context, round_: Round) -> dict[str, Any]:
    student = ctx.config.student
    if student.alpha == 0 and not student.weights:
        return {**train_fields(ctx, student, None, UNLABELED_ONLY), "unlabeled_loss": False}
    return {
        **train_fields(ctx, student, student.weights),
        "unlabeled": ctx.digest("images", "unlabeled"),
        "pseudolabels": ctx.digest(round_.name("pseudolabels")),
        "pseudolabel": pseudolabel_fields(ctx.config),
    }


def evaluate_fields(ctx: Context) -> dict[str, Any]:
    last = final_round(ctx.config)
    fields = {
        "teacher": ctx.digest("teacher"),
        "student": ctx.digest(last.name("student")),
        "val": ctx.digest("images", "val"),
        "unlabeled": ctx.digest("images", "unlabeled"),
        "pseudolabels": ctx.digest(last.name("pseudolabels")),
        "num_classes": ctx.config.data.num_classes,
        **geometry(ctx),
        "window": ctx.config.data.crop,
    }
    if last.number > 1:  # earlier rounds are evaluated too
        fields["rounds"] = [
            [ctx.digest(Round(r).name("student")), ctx.digest(Round(r).name("pseudolabels"))]
            for r in range(1, last.number)
        ]
    return fields


def uses_wpl(config: PipelineConfig) -> bool:
    return config.pseudolabel.policy == "wpl"


def uses_ground_truth(config: PipelineConfig) -> bool:
    return config.pseudolabel.policy == GROUND_TRUTH
