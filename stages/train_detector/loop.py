"""The detector's Ray Train worker loop: resume from the latest checkpoint, step, log and
checkpoint on rank 0."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from stages.core.models import make_checkpoint
from stages.core.pretrained import decode_state
from stages.core.progress import Poster
from stages.core.run_config import loop_of
from stages.core.training import (
    endless_batches,
    hold_point,
    inject_fault,
    latest_checkpoint,
    report,
    restore_rng,
    rng_state,
    worker_logging,
)
from stages.train_detector.config import DetectorConfig
from stages.train_detector.step import DetectorLearner, detector_step, new_detector_learner

logger = logging.getLogger(__name__)


def train_loop(train_loop_config: dict[str, Any]) -> None:
    """Ray Train worker function for the detector (rank 0 logs and checkpoints)."""
    import ray.train
    import ray.train.torch

    loop = loop_of(train_loop_config)
    cfg = loop.train
    if not isinstance(cfg, DetectorConfig):
        raise TypeError(f"a detector trains from a DetectorConfig, got {type(cfg).__name__}")
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(loop.torch_threads)
    worker_logging()
    learner = new_detector_learner(
        cfg,
        num_classes=loop.num_classes,
        seed=loop.seed + rank,
        device=ray.train.torch.get_device(),
        init=decode_state(loop.init) if loop.init else None,
    )
    start = _restore(learner)
    learner.model = ray.train.torch.prepare_model(learner.model)
    batches = endless_batches(ray.train.get_dataset_shard("labeled"), cfg.batch_size, rank)
    for _ in range(start):  # the data position: the batches the checkpoint already trained on
        next(batches)
    sink = loop.rank_sink(rank)
    post = Poster(loop.progress if rank == 0 else None, cfg.steps, start)
    log_lines = rank == 0 and loop.log_lines
    started, losses = time.perf_counter(), []
    for step in range(start, cfg.steps):
        inject_fault(step, "detector")
        hold_point("detector", step)
        losses.append(detector_step(learner, next(batches), step))
        post(step + 1, {"loss": losses[-1]})
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            metrics = {
                "loss": float(np.mean(losses)),
                "steps_per_s": (step + 1 - start) / (time.perf_counter() - started),
            }
            losses = []
            if log_lines:
                logger.info("detector step %d/%d loss=%.4g", step + 1, cfg.steps, metrics["loss"])
            if sink is not None:
                sink.log_metrics(metrics, step + 1)
            every = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            _report(metrics, learner, step + 1, bool(rank == 0 and (last or every)))


def _report(metrics: dict[str, float], learner: DetectorLearner, step: int, save: bool) -> None:
    """``ray.train.report``; with ``save``, a checkpoint that resumes training (weights,
    optimizer, step, random state) and is the model a finished run keeps."""
    if not save:
        report(metrics)
        return
    extra = {
        "optimizer": learner.optimizer.state_dict(),
        "step": step,
        "rng": rng_state(learner.generator),
    }
    report(
        metrics,
        make_checkpoint(learner.model, kind="detector", model_args=learner.model_args, extra=extra),
    )


def _restore(learner: DetectorLearner) -> int:
    """Resume from Ray Train's latest checkpoint (a restarted worker group): the step to start at."""
    state = latest_checkpoint()
    if state is None:
        return 0
    learner.model.load_state_dict(state["state_dict"])
    learner.optimizer.load_state_dict(state["optimizer"])
    step = int(state["step"])
    if "rng" in state:
        restore_rng(state["rng"], learner.generator, 0, step)
    logger.info("detector resumed from step %d", step)
    return step
