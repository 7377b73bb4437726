"""Val mIoU and per-class IoU of several checkpoints in one pass over the val images."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from stages.core import data
from stages.core.inference import (
    decode_for_inference,
    label_maps,
    load_model,
    pick_device,
    predict_split,
)
from stages.core.metrics import confusion, iou_from_confusion
from stages.core.models import segment_logits
from stages.core.storage import DatasetRef
from stages.core.tables import (
    DRIVER_SPLIT_BYTES,
    numpy_batch,
    small_split_ids,
)
from stages.evaluate.config import EvaluateConfig


class ConfusionPredictor:
    """Callable class: decoded val images -> one row holding, for each model, the batch's
    confusion matrix (every model is evaluated in the same pass over the images)."""

    def __init__(
        self, storage_url: str, checkpoints: dict[str, str], num_classes: int, gpus: float = 0.0
    ):
        self.device = pick_device(gpus)
        self.models, self.windows = {}, {}
        for name, path in checkpoints.items():
            model, checkpoint = load_model(storage_url, path)
            self.models[name] = model.to(self.device)
            # its training crop: the sliding window (0, in older checkpoints: the whole canvas)
            self.windows[name] = int(checkpoint.get("window") or 0)
        self.num_classes = num_classes

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = data.normalize(torch.from_numpy(batch["image"]).to(self.device))
        sizes = [(int(h), int(w)) for h, w in zip(batch["height"], batch["width"], strict=True)]
        targets = [
            data.decode_mask(m, h, w).numpy()
            for m, (h, w) in zip(batch["mask"], sizes, strict=True)
        ]
        out = {}
        for name, model in self.models.items():
            forward = functools.partial(segment_logits, model)
            labels = label_maps(forward, images, self.windows[name], batch["extent"], sizes)
            total = np.zeros((self.num_classes, self.num_classes), np.int64)
            for pred, target in zip(labels, targets, strict=True):
                total += confusion(pred.cpu().numpy(), target, self.num_classes)
            out[f"confusion_{name}"] = total.reshape(1, -1)
        return out


def evaluate_models(
    cfg: EvaluateConfig,
    *,
    images: DatasetRef,
    checkpoints: dict[str, str],
    num_classes: int,
    image_size: int,
    driver_bytes: int = DRIVER_SPLIT_BYTES,
) -> dict[str, dict[str, Any]]:
    """Val mIoU and per-class IoU of each checkpoint (name -> storage path), in one pass: on
    this process where the val split holds at most ``driver_bytes`` (estimated) and no custom
    resources are asked for, through Ray Data's actor pool otherwise."""
    columns = ["image_id", "height", "width", "image", "mask"]
    ids = None if cfg.resources else small_split_ids(images, "val", driver_bytes)
    if ids is not None:
        table = images.read_rows(columns[1:], ids).sort_by("image_id")
        gpus = float(torch.cuda.is_available())
        predictor = ConfusionPredictor(images.storage.url, checkpoints, num_classes, gpus)
        rows = []
        for start in range(0, table.num_rows, cfg.batch_size):
            batch = numpy_batch(table.slice(start, cfg.batch_size))
            rows.append(predictor(decode_for_inference(batch, image_size)))
    else:
        rows = predict_split(
            images,
            "val",
            columns,
            ConfusionPredictor,
            {"checkpoints": checkpoints, "num_classes": num_classes},
            cfg=cfg,
            image_size=image_size,
        ).take_all()
    results = {}
    for name in checkpoints:
        parts = [np.asarray(r[f"confusion_{name}"]) for r in rows]
        matrix = np.sum(parts, axis=0).reshape(num_classes, num_classes)
        iou, miou = iou_from_confusion(matrix)
        results[name] = {"miou": miou, "iou": iou.tolist(), "val_pixels": int(matrix.sum())}
    return results
