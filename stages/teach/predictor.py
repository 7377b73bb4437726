"""The teacher as a callable over decoded uint8 batches (one per actor): forward (with TTA),
then the signals reduced on the device, one host copy per batch, rows out."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from stages.core import codec, data
from stages.core.inference import load_model, pick_device, to_image
from stages.core.models import segment_logits, segment_with_features
from stages.core.training import hold_point
from stages.teach.config import TTAConfig
from stages.teach.table import SIGNALS_SCHEMA, SignalSpec, quantized_maps, size_groups, stored_maps

logger = logging.getLogger(__name__)


class TeacherPredictor:
    """Callable class for ``map_batches``: decoded images -> teacher signal rows."""

    def __init__(
        self,
        storage_url: str,
        checkpoint_path: str,
        spec: dict[str, Any],
        precision: str = "bf16",
        gpus: float = 0.0,
        tta: dict[str, Any] | None = None,
    ):
        model, _ = load_model(storage_url, checkpoint_path)
        self._setup(model, pick_device(gpus), SignalSpec.model_validate(spec), precision)
        self.tta = TTAConfig.model_validate(tta or {})

    @classmethod
    def of_model(
        cls,
        model: nn.Module,
        device: torch.device,
        spec: SignalSpec | None = None,
        precision: str = "bf16",
    ) -> TeacherPredictor:
        """The same predictor around a network already in memory (``pseudoflow bench``: a student
        becomes the next round's teacher)."""
        predictor = cls.__new__(cls)
        predictor._setup(model, device, spec or SignalSpec(), precision)
        predictor.tta = TTAConfig()
        return predictor

    def _setup(
        self, model: nn.Module, device: torch.device, spec: SignalSpec, precision: str
    ) -> None:
        self.device, self.spec, self.maps = device, spec, stored_maps(spec)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if device.type != "cuda":
            self.dtype = None  # CPU autocast is slower than float32 on most CPUs
        self.model = model.to(device).eval()
        if self.dtype is not None:
            self.model = self.model.to(memory_format=torch.channels_last)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _averaged(self, images: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
        """The mean of the softmax over every TTA view (``plain``: the scale-1 unflipped one),
        each view's probabilities brought back to the canvas (unflipped, bilinear)."""
        side = images.shape[-2:]
        total = plain.clone()
        views = [
            (s, f) for s in self.tta.scales for f in ((False, True) if self.tta.flip else (False,))
        ]
        for scale, flip in views:
            if scale == 1.0 and not flip:
                continue
            view = images.flip(-1) if flip else images
            if scale != 1.0:
                size = [max(1, round(v * scale)) for v in side]
                view = nn.functional.interpolate(
                    view, size=size, mode="bilinear", align_corners=False
                )
            with self._autocast():
                logits = segment_logits(self.model, view)
            probs = logits.float().softmax(dim=1)
            if scale != 1.0:
                probs = nn.functional.interpolate(
                    probs, size=side, mode="bilinear", align_corners=False
                )
            total += probs.flip(-1) if flip else probs
        return total / len(views)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        hold_point("teach")
        images = data.normalize(torch.from_numpy(batch["image"]).to(self.device))
        if self.dtype is not None:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            logits, features = segment_with_features(self.model, images)
        probs = logits.float().softmax(dim=1)
        if self.tta.enabled:
            probs = self._averaged(images, probs)
        n = len(batch["image_id"])
        columns: dict[str, list[Any]] = {name: [None] * n for name in self.maps}
        extents = np.asarray(batch["extent"]).reshape(-1, 2)
        for h, w, index in size_groups(batch["height"], batch["width"]):
            group = probs if len(index) == n else probs[torch.from_numpy(index).to(self.device)]
            # images of one size have one fitted part on the canvas (data.fit_and_pad)
            fh, fw = (int(v) for v in extents[index[0]])
            group = to_image(group, (fh, fw), h, w)
            host = quantized_maps(group, self.spec).cpu().numpy()  # one copy per size
            for m, name in enumerate(self.maps):
                for j, i in enumerate(index):
                    columns[name][i] = host[m, j].tobytes()
        splits = [str(s) for s in batch.get("split", ["unlabeled"] * n)]
        masks = batch.get("mask", [None] * n)
        table: dict[str, Any] = {
            "image_id": [str(i) for i in batch["image_id"]],
            "height": batch["height"],
            "width": batch["width"],
            "num_classes": [probs.shape[1]] * n,
            **columns,
            "split": splits,
            "mask": [m if s == "labeled" else None for m, s in zip(masks, splits, strict=True)],
        }
        if self.spec.features:
            half = features.to(torch.float16).cpu().numpy()
            # each image's features: the part of the feature map over its fitted part
            side = images.shape[-1]
            parts = [
                half[
                    i,
                    :,
                    : math.ceil(fh * half.shape[2] / side),
                    : math.ceil(fw * half.shape[3] / side),
                ]
                for i, (fh, fw) in enumerate(extents.tolist())
            ]
            table |= {
                "feature_dim": [half.shape[1]] * n,
                "feature_height": [p.shape[1] for p in parts],
                "feature_width": [p.shape[2] for p in parts],
                "features": [codec.to_bytes(np.ascontiguousarray(p)) for p in parts],
            }
        arrays = [
            pa.array(table[f.name], f.type) if f.name in table else pa.nulls(n, f.type)
            for f in SIGNALS_SCHEMA
        ]
        return pa.Table.from_arrays(arrays, schema=SIGNALS_SCHEMA)
