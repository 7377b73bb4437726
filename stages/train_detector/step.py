"""The detector in training (``DetectorLearner``) and its step: a random flip, boxes from the
masks, the backend's summed losses, an SGD step. Ray-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stages.core.detectors import detector_backend
from stages.core.models import build_detector
from stages.core.pretrained import apply_state
from stages.core.run_config import poly_lr
from stages.train_detector.boxes import flipped_targets
from stages.train_detector.config import DetectorConfig, detector_args


@dataclass
class DetectorLearner:
    """A detector in training: network, its backend's loss, optimizer, builder arguments."""

    model: nn.Module
    backend: Any
    optimizer: torch.optim.Optimizer
    model_args: dict[str, Any]
    cfg: DetectorConfig
    num_classes: int
    device: torch.device
    generator: torch.Generator = field(default_factory=torch.Generator)  # saved with checkpoints


def new_detector_learner(
    cfg: DetectorConfig,
    *,
    num_classes: int,
    seed: int,
    device: torch.device,
    init: dict[str, torch.Tensor] | None = None,
) -> DetectorLearner:
    """A detector with random weights (then ``init``'s tensors where given), its optimizer."""
    torch.manual_seed(seed)
    model_args = detector_args(cfg, num_classes)
    model = build_detector(**model_args)
    if init is not None:
        apply_state(model, init)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    backend = detector_backend(cfg.backend)
    return DetectorLearner(model, backend, optimizer, model_args, cfg, num_classes, device)


def detector_step(learner: DetectorLearner, batch: dict[str, torch.Tensor], step: int) -> float:
    """One SGD step on a labeled batch (image uint8[B, 3, S, S], label [B, S, S]): a random
    flip, boxes from the mask's components, the backend's summed losses, the gradients' total
    norm clipped to ``grad_clip`` (when set). Returns the loss."""
    cfg = learner.cfg
    for group in learner.optimizer.param_groups:
        group["lr"] = poly_lr(cfg.lr, step, cfg.steps)
    images, targets = flipped_targets(batch, learner.num_classes, cfg.min_box_area)
    images = [i.to(learner.device) for i in images]
    targets = [{k: v.to(learner.device) for k, v in t.items()} for t in targets]
    losses = learner.backend.losses(learner.model, images, targets)
    loss = torch.stack(list(losses.values())).sum()
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(learner.model.parameters(), cfg.grad_clip)
    learner.optimizer.step()
    return float(loss.item())
