"""Checks of a config and its source before any work: the splits each stage needs, the weights
files it names, the networks that start from random weights."""

from __future__ import annotations

import logging

import fsspec

from pipeline.config import PipelineConfig
from stages.core.constants import SPLITS
from stages.core.errors import ModelError, SourceError
from stages.ingest.folder import SourceItem
from stages.segtrain.config import SegTrainConfig
from stages.train_detector.config import DetectorConfig

logger = logging.getLogger(__name__)


def needed_splits(config: PipelineConfig) -> dict[str, str]:
    """The splits this run cannot do without, each with the stage that needs it."""
    needs = {"unlabeled": "teach", "val": "evaluate"}
    training = [
        name
        for name, weights in (
            ("teacher", config.teacher.weights),
            ("student", config.student.weights),
        )
        if weights is None
    ]
    if config.detector.enabled and config.detector.weights is None:
        training.append("detector")
    if training:
        needs["labeled"] = "training the " + " and ".join(training)
    return needs


def check_splits(config: PipelineConfig, counts: dict[str, int], where: str) -> None:
    """Refuse a run whose needed split is empty (a training loop over an empty shard would never
    yield a batch); ``where`` says whose counts these are (the source's listing, or ingest's)."""
    empty = {split: need for split, need in needed_splits(config).items() if not counts.get(split)}
    if not empty:
        return
    found = ", ".join(f"{split} {counts.get(split, 0)}" for split in SPLITS)
    hint = {
        "folder": "the folder's splits/<split>.txt lists, or its masks/ and data.val_fraction",
        "voc": "data.voc and its split lists",
        "cityscapes": "data.cityscapes and its split lists",
        "generated": "data.generated",
    }[config.data.source]
    raise SourceError(
        f"{where}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
        f"({found}); needed for {'; '.join(empty.values())}. Check {hint}"
    )


def trained_sections(
    config: PipelineConfig,
) -> dict[str, SegTrainConfig | DetectorConfig]:
    """The config sections of the networks a run trains or loads: teacher, student and, when
    enabled, the detector."""
    sections: dict[str, SegTrainConfig | DetectorConfig] = {
        "teacher": config.teacher,
        "student": config.student,
    }
    if config.detector.enabled:
        sections["detector"] = config.detector
    return sections


def check_weights(config: PipelineConfig) -> None:
    """Every weights file the config names exists (local path or fsspec URL): refuse before any
    work, not when its stage starts after ingest."""
    for section, cfg in trained_sections(config).items():
        for key, path in (("weights", cfg.weights), ("init", cfg.init)):
            if path is None:
                continue
            try:
                fs, inner = fsspec.core.url_to_fs(path)
                found = fs.isfile(inner)
            except (OSError, ValueError) as exc:
                raise ModelError(f"{section}.{key}={path!r} cannot be read: {exc}") from exc
            if not found:
                what = {
                    "weights": "a checkpoint file (local path or URL), or leave it unset to train",
                    "init": "a state dict file (local path or URL), or leave it unset to train "
                    "from random weights",
                }[key]
                raise ModelError(f"{section}.{key}={path!r} does not exist: give {what}")


def random_start_warnings(config: PipelineConfig) -> list[str]:
    """On real data (any source but ``generated``), each network that trains from random
    weights: what the SSL recipes never do, and a missing ``*.init`` is the likeliest reason."""
    if config.data.source == "generated":
        return []
    return [
        f"{name} trains {cfg.arch} from random weights: the semi-supervised recipes fine-tune "
        f"ImageNet (detector: COCO) weights; give {name}.init (README: Pretrained weights)"
        for name, cfg in trained_sections(config).items()
        if cfg.init is None and cfg.weights is None
    ]


def split_counts(items: list[SourceItem]) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    for item in items:
        counts[item.split] += 1
    return counts
