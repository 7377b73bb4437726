"""The detect stage: the detector over the unlabeled images -> ``detections`` (actor pool).

Boxes are stored in the image's own pixel coordinates as (x1, y1, x2, y2), flattened. The table
is the same whichever backend (torchvision, detectron2) the checkpoint names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field
from torch import nn

from stages.core.detectors import split_backend
from stages.core.inference import load_model, pick_device, predict_into_pool
from stages.core.run_config import InferenceConfig
from stages.core.shards import ShardPool
from stages.core.storage import DatasetRef
from stages.core.training import hold_point

DETECTIONS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("boxes", pa.list_(pa.float32())),  # N * 4 values: x1, y1, x2, y2 per box
        ("labels", pa.list_(pa.int32())),  # detector classes = segmentation classes 1..C-1
        ("scores", pa.list_(pa.float32())),
        ("num_boxes", pa.int32()),
    ]
)


class DetectConfig(InferenceConfig):
    min_score: float = Field(0.05, ge=0.0, le=1.0, description="detections below are not stored")


class DetectorPredictor:
    """Callable class for ``map_batches``: decoded images -> one detections row per image."""

    def __init__(self, storage_url: str, checkpoint_path: str, min_score: float, gpus: float = 0.0):
        self.device = pick_device(gpus)
        model, checkpoint = load_model(storage_url, checkpoint_path)
        self.backend, _ = split_backend(checkpoint["model_args"])
        self.model = model.to(self.device)
        self.min_score = min_score

    @classmethod
    def of_model(
        cls, model: nn.Module, model_args: dict[str, Any], min_score: float, device: torch.device
    ) -> DetectorPredictor:
        """The same predictor around a detector already in memory (its builder ``model_args``
        name the backend)."""
        predictor = cls.__new__(cls)
        predictor.device, predictor.min_score = device, min_score
        predictor.backend, _ = split_backend(model_args)
        predictor.model = model.to(device).eval()
        return predictor

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        hold_point("detect")
        images = [torch.from_numpy(i).to(self.device).float() / 255.0 for i in batch["image"]]
        outputs = self.backend.predict(self.model, images)
        rows: list[dict[str, Any]] = []
        for i, output in enumerate(outputs):
            # canvas -> the image's own pixels: the fitted part is the image scaled
            fitted_h, fitted_w = (int(v) for v in batch["extent"][i])
            scale = torch.tensor(
                [batch["width"][i] / fitted_w, batch["height"][i] / fitted_h] * 2,
                device=self.device,
            )
            keep = output["scores"] >= self.min_score
            # clipped to the fitted part: what lies over the canvas's padding is not the image
            limit = torch.tensor([fitted_w, fitted_h] * 2, dtype=torch.float32, device=self.device)
            clipped = output["boxes"][keep].clamp(min=torch.zeros_like(limit), max=limit)
            boxes = (clipped * scale).cpu().numpy().astype(np.float32)
            rows.append(
                {
                    "image_id": str(batch["image_id"][i]),
                    "boxes": boxes.reshape(-1).tolist(),
                    "labels": output["labels"][keep].cpu().numpy().astype(np.int32).tolist(),
                    "scores": output["scores"][keep].cpu().numpy().astype(np.float32).tolist(),
                    "num_boxes": int(keep.sum()),
                }
            )
        return pa.Table.from_pylist(rows, schema=DETECTIONS_SCHEMA)


SCHEMA = "detections/1"


def run(
    cfg: DetectConfig,
    *,
    images: DatasetRef,
    checkpoint_path: str,
    image_size: int,
    out: DatasetRef,
    pool: ShardPool,
) -> dict[str, float]:
    """Run the detector over the unlabeled images ``pool`` does not hold yet (actor pool, a
    shard committed at a time); commit ``out`` over all of them."""
    metrics = predict_into_pool(
        images,
        "unlabeled",
        ["image_id", "height", "width", "image"],
        DetectorPredictor,
        {"checkpoint_path": checkpoint_path, "min_score": cfg.min_score},
        cfg=cfg,
        image_size=image_size,
        pool=pool,
        out=out,
        schema=SCHEMA,
    )
    counts = out.read_table(columns=["num_boxes"])["num_boxes"].to_numpy()
    return {**metrics, "boxes_per_image": float(counts.mean())}
