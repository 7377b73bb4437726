"""The train_detector stage: a Faster R-CNN (torchvision's, or detectron2's where it is
installed: ``detector.backend``) trained with Ray Train on the labeled images, with boxes taken
from the connected components of each class in the ground-truth masks.

Detector class ``d`` is segmentation class ``d`` (1..C-1); 0 is the detector's background.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from scipy import ndimage
from torch import nn

from stages.core.detectors import (
    DEFAULT_ARCHITECTURES,
    DEFAULT_BACKEND,
    BackendName,
    check_arch,
    detector_backend,
)
from stages.core.models import (
    build_detector,
    finished_model,
    make_checkpoint,
)
from stages.core.pretrained import (
    DETECTRON2_DETECTOR,
    TORCHVISION_DETECTOR,
    Layout,
    apply_state,
    decode_state,
)
from stages.core.progress import Poster
from stages.core.run_config import LoopConfig, TrainingRun, loop_of, poly_lr
from stages.core.training import (
    CHECKPOINT_FILE,
    endless_batches,
    hold_point,
    inject_fault,
    restore_rng,
    rng_state,
    worker_logging,
)

logger = logging.getLogger(__name__)

# ``grad_clip`` when the config gives none, per backend. detectron2's R-50 from random weights at
# the default lr 0.01 (no warm-up) diverged within ~20 steps in 3 of 4 runs on the smoke data
# (detectron2 raises FloatingPointError); clipped at 10 it trained in all. torchvision's default
# network trains unclipped, as it always has.
DEFAULT_GRAD_CLIP: dict[str, float | None] = {"torchvision": None, "detectron2": 10.0}


class DetectorConfig(TrainingRun):
    """How the object detector is trained (or which weights are loaded instead)."""

    enabled: bool = True
    backend: BackendName = Field(
        DEFAULT_BACKEND, description="torchvision, or detectron2 where it is installed"
    )
    arch: str = Field(
        DEFAULT_ARCHITECTURES[DEFAULT_BACKEND],
        description="the backend's architecture (detectron2: a model-zoo config); "
        "default: the backend's default",
    )
    steps: int = Field(200, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(0.01, gt=0)
    min_size: int = Field(128, ge=32, description="the detector's internal resize (short side)")
    min_box_area: int = Field(4, ge=1, description="smaller mask components give no box")
    proposals: int = Field(128, ge=1, description="RPN proposals kept after NMS per image")
    roi_samples: int = Field(64, ge=1, description="RoIs sampled per image for the box head")
    max_detections: int = Field(32, ge=1, description="detections returned per image")
    grad_clip: float | None = Field(
        None,
        gt=0,
        description="clip the gradients' total L2 norm to this before each step (None: never); "
        "default: the backend's (torchvision: never, detectron2: 10)",
    )
    log_every: int = Field(25, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _backend_defaults(cls, data: Any) -> Any:
        """Without an ``arch`` or ``grad_clip``, the selected backend's default."""
        if not isinstance(data, dict):
            return data
        backend = data.get("backend", DEFAULT_BACKEND)
        if isinstance(backend, str) and backend in DEFAULT_ARCHITECTURES:
            data = {"arch": DEFAULT_ARCHITECTURES[backend], **data}
        if isinstance(backend, str) and backend in DEFAULT_GRAD_CLIP:
            data = {"grad_clip": DEFAULT_GRAD_CLIP[backend], **data}
        return data

    @model_validator(mode="after")
    def _known_arch(self) -> DetectorConfig:
        check_arch(self.backend, self.arch)
        return self


def check_detector_backend(cfg: DetectorConfig) -> None:
    """Raise :class:`~stages.core.detectors.BackendUnavailable` (a ``ValueError``) when the
    detector is enabled and its backend cannot be imported here: a config error to report before
    any stage runs, not a failure inside a Ray worker."""
    if cfg.enabled:
        detector_backend(cfg.backend)


def detector_args(cfg: DetectorConfig, num_classes: int) -> dict[str, Any]:
    """Builder arguments (stored in the checkpoint, with the backend that builds them): the
    backends' proposal and RoI counts are sized for 800-pixel images; these scale them to the
    small inputs this detector sees. Both backends take the same arguments."""
    return {
        "backend": cfg.backend,
        "arch": cfg.arch,
        "num_classes": num_classes,
        "min_size": cfg.min_size,
        "max_size": cfg.min_size,
        "rpn_pre_nms_top_n_train": 4 * cfg.proposals,
        "rpn_post_nms_top_n_train": cfg.proposals,
        "rpn_pre_nms_top_n_test": 2 * cfg.proposals,
        "rpn_post_nms_top_n_test": cfg.proposals // 2 or 1,
        "box_batch_size_per_image": cfg.roi_samples,
        "box_detections_per_img": cfg.max_detections,
    }


def detector_layout(backend: str) -> Layout:
    """Where the backend's detector keeps its backbone and its class-count-dependent head."""
    return DETECTRON2_DETECTOR if backend == "detectron2" else TORCHVISION_DETECTOR


def boxes_from_mask(
    mask: np.ndarray, num_classes: int, min_area: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of the 8-connected components of each object class in a label map.

    mask: uint8[H, W] with values 0..C-1 (0 = background) or 255 (ignored).
    Returns boxes float32[N, 4] as (x1, y1, x2, y2) with x2, y2 exclusive (a component covering
    columns 3..5 gives x1 = 3, x2 = 6), and labels int64[N] in 1..C-1.
    """
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    structure = np.ones((3, 3), dtype=bool)
    for cls in range(1, num_classes):
        components, count = ndimage.label(mask == cls, structure=structure)
        if count == 0:
            continue
        areas = np.bincount(components.ravel(), minlength=count + 1)
        for index, region in enumerate(ndimage.find_objects(components), start=1):
            if region is not None and areas[index] >= min_area:
                rows, cols = region
                boxes.append((cols.start, rows.start, cols.stop, rows.stop))
                labels.append(cls)
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def _targets(
    batch: dict[str, torch.Tensor], num_classes: int, min_area: int
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Random horizontal flip, then images in [0, 1] and box targets from the (flipped) masks."""
    images, targets = [], []
    for image, label in zip(batch["image"], batch["label"], strict=True):
        if torch.rand(()) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        boxes, labels = boxes_from_mask(label.numpy(), num_classes, min_area)
        images.append(image.float() / 255.0)
        targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)})
    return images, targets


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
    images, targets = _targets(batch, learner.num_classes, cfg.min_box_area)
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
    import ray.train

    if not save:
        ray.train.report(metrics, checkpoint=None)
        return
    extra = {
        "optimizer": learner.optimizer.state_dict(),
        "step": step,
        "rng": rng_state(learner.generator),
    }
    checkpoint = make_checkpoint(
        learner.model, kind="detector", model_args=learner.model_args, extra=extra
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(checkpoint, Path(tmp) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(learner: DetectorLearner) -> int:
    """Resume from Ray Train's latest checkpoint (a restarted worker group): the step to start at."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    learner.model.load_state_dict(state["state_dict"])
    learner.optimizer.load_state_dict(state["optimizer"])
    step = int(state["step"])
    if "rng" in state:
        restore_rng(state["rng"], learner.generator, 0, step)
    logger.info("detector resumed from step %d", step)
    return step


def run(
    cfg: DetectorConfig,
    *,
    labeled: Any,
    num_classes: int,
    storage: Any,
    out_path: str,
    name: str,
    loop_extra: dict[str, Any],
    use_gpu: bool,
) -> dict[str, float]:
    """Train the detector with Ray Train (or load given weights); write its checkpoint."""
    from stages.core.models import given_checkpoint, load_checkpoint
    from stages.core.training import train_and_write

    if cfg.weights:
        # The backend before the arch (given_checkpoint's check): the arch of another backend's
        # checkpoint differs too, and "detector.backend is ..." says what to change.
        blob = given_checkpoint(cfg.weights, kind="detector", num_classes=num_classes)
        model_args = load_checkpoint(blob, source=cfg.weights)["model_args"]
        found = model_args.get("backend") or DEFAULT_BACKEND
        if found != cfg.backend:
            raise ValueError(
                f"{cfg.weights}: a {found} detector; detector.backend is {cfg.backend}"
            )
        if model_args.get("arch") != cfg.arch:  # the cache key records the config's arch
            raise ValueError(
                f"{cfg.weights}: a {model_args.get('arch')} detector; the config's arch is "
                f"{cfg.arch}"
            )
        # as given, plus the image size it is used at (the model file's metadata)
        image_size = loop_extra["image_size"]
        storage.write_bytes(out_path, finished_model(blob, image_size=image_size, source=out_path))
        return {"trained_steps": 0.0}
    return train_and_write(
        train_loop,
        LoopConfig(train=cfg, num_classes=num_classes, **loop_extra),
        steps=cfg.steps,
        init_into=lambda: build_detector(**detector_args(cfg, num_classes)),
        layout=detector_layout(cfg.backend),
        datasets={"labeled": labeled},
        storage=storage,
        out_path=out_path,
        name=name,
        use_gpu=use_gpu,
    )
