"""The training stage of a segmenter (teacher or student): given weights, or a Ray Train run."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from stages.core.models import build_segmenter, finished_model, given_checkpoint, write_trained
from stages.core.pretrained import SEGMENTER, encode_state, load_init
from stages.core.run_config import LoopConfig
from stages.core.storage import Storage
from stages.core.training import fit
from stages.segtrain.config import SegTrainConfig
from stages.segtrain.loop import train_loop

logger = logging.getLogger(__name__)


def run_segmenter(
    cfg: SegTrainConfig,
    *,
    datasets: dict[str, Any],
    num_classes: int,
    storage: Storage,
    out_path: str,
    name: str,
    loop_extra: dict[str, Any],
    use_gpu: bool,
) -> dict[str, float]:
    """Train (or load given weights), then write the checkpoint to ``out_path`` in storage."""
    if cfg.weights:
        blob = given_checkpoint(
            cfg.weights, kind="segmenter", num_classes=num_classes, arch=cfg.arch
        )
        # as given, plus the image size it is used at (the model file's metadata)
        image_size = loop_extra["image_size"]
        storage.write_bytes(
            out_path,
            finished_model(
                blob, image_size=image_size, window=loop_extra.get("crop_size"), source=out_path
            ),
        )
        return {"trained_steps": 0.0}
    loop_config = LoopConfig(train=cfg, num_classes=num_classes, **loop_extra)
    metrics = {"trained_steps": float(cfg.steps)}
    if cfg.init:  # mapped here, once: a file that does not fit fails before any worker starts
        report = load_init(
            build_segmenter(arch=cfg.arch, num_classes=num_classes), cfg.init, SEGMENTER
        )
        logger.info("%s: init %s", name, report.summary())
        loop_config = replace(loop_config, init=encode_state(report.loaded))
        metrics.update(report.metrics())
    blob = fit(
        train_loop,
        loop_config=loop_config,
        datasets=datasets,
        workers=cfg.workers,
        use_gpu=use_gpu,
        storage=storage,
        name=name,
        max_failures=cfg.max_failures,
        resources=cfg.resources,
    )
    write_trained(
        storage,
        out_path,
        blob,
        image_size=loop_extra["image_size"],
        window=loop_extra.get("crop_size"),
    )
    return metrics
