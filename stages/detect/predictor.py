"""The detector as a callable over decoded uint8 batches (one per actor): boxes kept above
``min_score``, clipped to the fitted image and scaled to its own pixels, one row per image."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from stages.core.detectors import split_backend
from stages.core.inference import load_model, pick_device
from stages.core.training import hold_point
from stages.detect.table import DETECTIONS_SCHEMA


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
