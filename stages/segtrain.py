"""Training a segmentation network with Ray Train: the teacher (labeled only) and the student
(labeled + offline pseudo-labels). One loop, top to bottom:

    L = L_s + alpha * L_u,   L_u = sum_p w_p keep_p valid_p CE_p / sum_p valid_p   (methods.md §0)

The labeled batch gets a weak view; the unlabeled batch a strong view whose geometry is applied to
the image and to the stored label and weight maps alike. Periodic work is ``if step % n == 0``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from stages.core import codec, data
from stages.core.config import StrictModel
from stages.core.models import (
    build_segmenter,
    given_checkpoint,
    make_checkpoint,
    segment_logits,
)
from stages.core.storage import DatasetRef, Storage
from stages.core.tables import join_on_image_id, read_dataset, read_split
from stages.core.training import CHECKPOINT_FILE, fit, worker_logging
from stages.pseudolabel.ops import weighted_unsup_loss

logger = logging.getLogger(__name__)


class MetricSink(Protocol):
    """Where rank 0 sends its metrics (the pipeline passes an MLflow-backed sink)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class SegTrainConfig(StrictModel):
    """How a segmentation network is trained (teacher or student)."""

    arch: str = "lraspp_mobilenet_v3_large"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    log_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    workers: int = Field(1, ge=1, description="Ray Train workers (execution only)")
    weights: str | None = Field(None, description="skip training and load this checkpoint file")


class StudentConfig(SegTrainConfig):
    alpha: float = Field(1.0, ge=0)
    unlabeled_batch_size: int = Field(8, ge=1)


def labeled_rows_to_arrays(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data CPU step: stored labeled rows -> fixed-size arrays for ``iter_torch_batches``.

    Returns image ``uint8[B, 3, S, S]``, label ``uint8[B, S, S]``, weight ``float32[B, S, S]``.
    """
    resize = data.resize_transform(image_size)
    out: dict[str, list[np.ndarray]] = {"image": [], "label": [], "weight": []}
    for png, mask, h, w in zip(
        batch["image"], batch["mask"], batch["height"], batch["width"], strict=True
    ):
        label = data.decode_mask(mask, int(h), int(w)).to(torch.uint8)
        image, maps = data.apply_joint(resize, data.decode_image(png), {"label": label})
        out["image"].append(image.numpy())
        out["label"].append(maps["label"].numpy())
        out["weight"].append(np.ones((image_size, image_size), np.float32))
    return {k: np.stack(v) for k, v in out.items()}


def pseudolabel_rows_to_arrays(
    batch: dict[str, np.ndarray], image_size: int
) -> dict[str, np.ndarray]:
    """Ray Data CPU step: unlabeled images joined with their pseudo-labels -> arrays.

    ``weight`` already includes the keep mask (w * keep), as ``weighted_unsup_loss`` expects.
    """
    resize = data.resize_transform(image_size)
    out: dict[str, list[np.ndarray]] = {"image": [], "label": [], "weight": []}
    for i in range(len(batch["image_id"])):
        h, w = int(batch["height"][i]), int(batch["width"][i])
        label = torch.from_numpy(codec.decode_png(batch["label"][i]))
        keep = codec.unpack_mask(batch["keep"][i], h, w)
        weight = codec.dequantize_unit(
            codec.from_bytes(batch["weight"][i], np.uint8, (h, w)), codec.WEIGHT_LEVELS
        )
        maps = {"label": label, "weight": torch.from_numpy(weight * keep)}
        image, maps = data.apply_joint(resize, data.decode_image(batch["image"][i]), maps)
        out["image"].append(image.numpy())
        out["label"].append(maps["label"].numpy())
        out["weight"].append(maps["weight"].numpy())
    return {k: np.stack(v) for k, v in out.items()}


def _batches(shard: Any, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches from a Ray Data shard, reshuffled locally each pass."""
    epoch = 0
    while True:
        yield from shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=False,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed + epoch,
        )
        epoch += 1


def _augment(
    batch: dict[str, torch.Tensor], transform: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample joint augmentation; returns normalised images, int64 labels, float weights."""
    images, labels, weights = [], [], []
    for image, label, weight in zip(batch["image"], batch["label"], batch["weight"], strict=True):
        image, maps = data.apply_joint(transform, image, {"label": label, "weight": weight})
        images.append(image)
        labels.append(maps["label"].long())
        weights.append(maps["weight"].float())
    return data.normalize(torch.stack(images)), torch.stack(labels), torch.stack(weights)


def poly_lr(base_lr: float, step: int, total: int, power: float = 0.9) -> float:
    """Poly schedule: base_lr * (1 - step/total)^power."""
    return base_lr * (1.0 - step / total) ** power


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function (every rank runs it; rank 0 logs and checkpoints)."""
    import ray.train
    import ray.train.torch

    model_cls = StudentConfig if "alpha" in loop_config["train"] else SegTrainConfig
    cfg = model_cls.model_validate(loop_config["train"])
    alpha = float(loop_config.get("alpha", 0.0))
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(loop_config["seed"] + rank)
    torch.set_num_threads(loop_config["torch_threads"])
    worker_logging()
    model = build_segmenter(arch=cfg.arch, num_classes=loop_config["num_classes"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = _restore(model, optimizer)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    labeled = _batches(ray.train.get_dataset_shard("labeled"), cfg.batch_size, rank)
    unlabeled = None
    if alpha > 0:
        shard = ray.train.get_dataset_shard("unlabeled")
        unlabeled = _batches(shard, loop_config["unlabeled_batch_size"], 1000 + rank)
    size = loop_config["image_size"]
    weak, strong = data.weak_transform(size), data.strong_transform(size)
    sink: MetricSink | None = loop_config.get("sink") if rank == 0 else None
    started, window = time.perf_counter(), []
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(cfg.lr, step, cfg.steps)
        x, y, _ = (t.to(device) for t in _augment(next(labeled), weak))
        loss_s = F.cross_entropy(segment_logits(model, x), y, ignore_index=data.IGNORE_INDEX)
        loss_u = torch.zeros((), device=device)
        if unlabeled is not None:
            xu, yu, wu = (t.to(device) for t in _augment(next(unlabeled), strong))
            valid = yu != data.IGNORE_INDEX
            loss_u = weighted_unsup_loss(segment_logits(model, xu), yu, wu, valid)
        loss = loss_s + alpha * loss_u
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append((loss_s.item(), loss_u.item()))
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            metrics = _window_metrics(window, step, cfg, started, start)
            window = []
            if rank == 0:
                logger.info("step %d/%d %s", step + 1, cfg.steps, _fmt(metrics))
                if sink is not None:
                    sink.log_metrics(metrics, step + 1)
            save = last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
            _report(metrics, model, optimizer, step + 1, loop_config, rank, bool(save))


def _window_metrics(
    window: list[tuple[float, float]], step: int, cfg: SegTrainConfig, started: float, start: int
) -> dict[str, float]:
    losses = np.asarray(window)
    elapsed = time.perf_counter() - started
    return {
        "loss_s": float(losses[:, 0].mean()),
        "loss_u": float(losses[:, 1].mean()),
        "lr": poly_lr(cfg.lr, step, cfg.steps),
        "steps_per_s": (step + 1 - start) / max(elapsed, 1e-9),
        "step": float(step + 1),
    }


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")


def _report(
    metrics: dict[str, float],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    loop_config: dict[str, Any],
    rank: int,
    save: bool,
) -> None:
    """``ray.train.report`` on every rank alike; rank 0 attaches the checkpoint when saving."""
    import ray.train

    if not (save and rank == 0):
        ray.train.report(metrics, checkpoint=None)
        return
    inner: nn.Module = getattr(model, "module", model)
    checkpoint = make_checkpoint(
        inner,
        kind="segmenter",
        model_args={
            "arch": loop_config["train"]["arch"],
            "num_classes": loop_config["num_classes"],
        },
        extra={
            "optimizer": optimizer.state_dict(),
            "step": step,
            "config": loop_config["resolved_config"],
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(checkpoint, Path(tmp) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Resume from Ray Train's latest checkpoint (same run name): returns the step to start at."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resumed from step %d", state["step"])
    return int(state["step"])


def labeled_dataset(images: DatasetRef, image_size: int) -> Any:
    """The labeled split as fixed-size arrays (materialised: it is iterated every epoch)."""
    columns = ["image_id", "height", "width", "image", "mask"]
    return (
        read_split(images, "labeled", columns)
        .map_batches(labeled_rows_to_arrays, fn_kwargs={"image_size": image_size}, batch_size=16)
        .materialize()
    )


def unlabeled_dataset(images: DatasetRef, pseudolabels: DatasetRef, image_size: int) -> Any:
    """Unlabeled images joined with their pseudo-labels, as fixed-size arrays (materialised).

    Only image columns are read from ``images``: the ground truth that generated data keeps for
    unlabeled images is never seen by training.
    """
    pixels = read_split(images, "unlabeled", ["image_id", "image"])
    labels = read_dataset(pseudolabels, ["image_id", "height", "width", "label", "keep", "weight"])
    joined = join_on_image_id(labels, pixels, num_partitions=4)
    return joined.map_batches(
        pseudolabel_rows_to_arrays, fn_kwargs={"image_size": image_size}, batch_size=16
    ).materialize()


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
        storage.write_bytes(out_path, blob)
        return {"trained_steps": 0.0}
    loop_config = {"train": cfg.model_dump(), "num_classes": num_classes, **loop_extra}
    blob = fit(
        train_loop,
        loop_config=loop_config,
        datasets=datasets,
        workers=cfg.workers,
        use_gpu=use_gpu,
        storage=storage,
        name=name,
    )
    storage.write_bytes(out_path, blob)
    return {"trained_steps": float(cfg.steps)}
