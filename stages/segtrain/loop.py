"""The Ray Train worker loop around ``train_step``: resume, batches, metrics, checkpoints."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from stages.core.models import make_checkpoint
from stages.core.pretrained import decode_state
from stages.core.progress import Poster
from stages.core.run_config import LoopConfig, loop_of
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
from stages.pseudolabel.config import PseudolabelConfig
from stages.pseudolabel.memory import gather_states, restore_state
from stages.segtrain.config import SegTrainConfig, StudentConfig
from stages.segtrain.step import Learner, learning_rate, new_learner, train_step

logger = logging.getLogger(__name__)


def train_loop(train_loop_config: dict[str, Any]) -> None:
    """Ray Train worker function (every rank runs it; rank 0 logs and checkpoints)."""
    import ray.train
    import ray.train.torch

    loop = loop_of(train_loop_config)
    cfg = loop.train
    if not isinstance(cfg, SegTrainConfig):
        raise TypeError(f"a segmenter trains from a SegTrainConfig, got {type(cfg).__name__}")
    if loop.policy is not None and not isinstance(loop.policy, PseudolabelConfig):
        raise TypeError(f"a student's policy is a PseudolabelConfig, got {type(loop.policy)}")
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(loop.torch_threads)
    worker_logging()
    learner = new_learner(
        cfg,
        num_classes=loop.num_classes,
        crop_size=loop.crop_size or loop.image_size,
        seed=loop.seed + rank,
        device=ray.train.torch.get_device(),
        policy=loop.policy,
        init=decode_state(loop.init) if loop.init else None,
    )
    start = _restore(learner, rank)
    learner.model = ray.train.torch.prepare_model(learner.model)
    labeled = endless_batches(ray.train.get_dataset_shard("labeled"), cfg.batch_size, rank)
    unlabeled = None
    if isinstance(cfg, StudentConfig) and learner.alpha > 0:
        shard = ray.train.get_dataset_shard("unlabeled")
        unlabeled = endless_batches(shard, cfg.unlabeled_batch_size, 1000 + rank, "unlabeled")
    for _ in range(start):  # the data position: the batches the checkpoint already trained on
        next(labeled)
        if unlabeled is not None:
            next(unlabeled)
    sink = loop.rank_sink(rank)
    post = Poster(loop.progress if rank == 0 else None, cfg.steps, start)
    log_lines = rank == 0 and loop.log_lines
    started, window = time.perf_counter(), []
    kind = "student" if isinstance(cfg, StudentConfig) else "teacher"
    for step in range(start, cfg.steps):
        inject_fault(step, "segmenter")
        hold_point(kind, step)
        stats = train_step(learner, next(labeled), next(unlabeled) if unlabeled else None, step)
        window.append(stats)
        post(step + 1, {k: stats[k] for k in ("loss_s", "loss_u")})
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            metrics = _window_metrics(window, step, cfg, started, start)
            window = []
            if log_lines:
                logger.info("step %d/%d %s", step + 1, cfg.steps, _fmt(metrics))
            if sink is not None:
                sink.log_metrics(metrics, step + 1)
            save = last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
            _report(metrics, learner, step + 1, loop, rank, bool(save))


def _window_metrics(
    window: list[dict[str, float]], step: int, cfg: SegTrainConfig, started: float, start: int
) -> dict[str, float]:
    elapsed = time.perf_counter() - started
    names = dict.fromkeys(name for entry in window for name in entry)
    metrics = {
        name: float(np.mean([entry[name] for entry in window if name in entry])) for name in names
    }
    return {
        **metrics,
        "lr": learning_rate(cfg, step),
        "steps_per_s": (step + 1 - start) / max(elapsed, 1e-9),
        "step": float(step + 1),
    }


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")


def _report(
    metrics: dict[str, float],
    learner: Learner,
    step: int,
    loop: LoopConfig,
    rank: int,
    save: bool,
) -> None:
    """``ray.train.report`` on every rank alike; rank 0 attaches the checkpoint when saving, with
    every rank's prototype memory (gathered by a collective all ranks join)."""
    memory = learner.memory
    memory_states = gather_states(memory) if save and memory is not None else None
    if not (save and rank == 0):
        report(metrics)
        return
    extra: dict[str, Any] = {
        "optimizer": learner.optimizer.state_dict(),
        "step": step,
        "config": loop.resolved_config,
        "rng": rng_state(learner.generator),
    }
    if learner.scaler.is_enabled():
        extra["scaler"] = learner.scaler.state_dict()
    if memory_states is not None:
        extra["memory"] = memory_states
    if learner.ema is not None:  # the checkpoint's weights are the EMA; these resume training
        trained = learner.network.state_dict()
        extra["trained_state_dict"] = {k: v.detach().cpu() for k, v in trained.items()}
        extra["ema_updates"] = int(learner.ema.n_averaged)
    model_args = {"arch": learner.cfg.arch, "num_classes": loop.num_classes}
    report(
        metrics,
        make_checkpoint(learner.result, kind="segmenter", model_args=model_args, extra=extra),
    )


def _restore(learner: Learner, rank: int) -> int:
    """Resume from Ray Train's latest checkpoint (same run name): returns the step to start at.
    The prototype memory comes back too, so every rank holds the same prototypes as before."""
    state = latest_checkpoint()
    if state is None:
        return 0
    learner.model.load_state_dict(state.get("trained_state_dict", state["state_dict"]))
    if learner.ema is not None:
        learner.ema.module.load_state_dict(state["state_dict"])
        learner.ema.n_averaged.fill_(state["ema_updates"])
    learner.optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        learner.scaler.load_state_dict(state["scaler"])
    if learner.memory is not None and "memory" in state:
        restore_state(learner.memory, state["memory"], rank)
    if "rng" in state:
        restore_rng(state["rng"], learner.generator, rank, int(state["step"]))
    logger.info("resumed from step %d", state["step"])
    return int(state["step"])
