"""The teach stage: the teacher over the unlabeled images -> ``teacher_signals``.

Per pixel the stage stores the top-K classes (uint8) and their softmax probabilities quantised to
uint16 (error <= 1/131070), at the image's own resolution: enough for every pseudo-label policy to
be computed later without running the teacher again. Never float32 logits.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from stages.core import codec, data
from stages.core.inference import (
    InferenceConfig,
    load_model,
    pick_device,
    predict_split,
    upsample_probs,
    write_committed,
)
from stages.core.models import segment_logits
from stages.core.storage import DatasetRef

logger = logging.getLogger(__name__)

SIGNALS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_classes", pa.int32()),
        ("topk", pa.int32()),
        ("topk_index", pa.binary()),  # uint8[K, H, W]
        ("topk_prob", pa.binary()),  # uint16[K, H, W], p = q / 65535
    ]
)


class TeachConfig(InferenceConfig):
    topk: int = Field(3, ge=1, le=255, description="classes kept per pixel")


def encode_signals(probs: torch.Tensor, topk: int) -> tuple[bytes, bytes, int]:
    """``probs: float[C, H, W]`` -> (top-K indices uint8 bytes, quantised probs uint16 bytes, K)."""
    k = min(topk, probs.shape[0])
    values, indices = probs.topk(k, dim=0)
    index_bytes = codec.to_bytes(indices.to(torch.uint8).cpu().numpy())
    prob_bytes = codec.to_bytes(codec.quantize_unit(values.cpu().numpy(), codec.PROB_LEVELS))
    return index_bytes, prob_bytes, k


def decode_signals(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A ``teacher_signals`` row -> (indices ``uint8[K, H, W]``, probs ``float32[K, H, W]``)."""
    shape = (int(row["topk"]), int(row["height"]), int(row["width"]))
    indices = codec.from_bytes(row["topk_index"], np.uint8, shape)
    probs = codec.dequantize_unit(
        codec.from_bytes(row["topk_prob"], np.uint16, shape), codec.PROB_LEVELS
    )
    return indices, probs


class TeacherPredictor:
    """Callable class for ``map_batches``: decoded images -> teacher signal rows."""

    def __init__(self, storage_url: str, checkpoint_path: str, topk: int, gpus: float = 0.0):
        self.device = pick_device(gpus)
        model, _ = load_model(storage_url, checkpoint_path)
        self.model = model.to(self.device)
        self.topk = topk

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = data.normalize(torch.from_numpy(batch["image"]).to(self.device))
        probs = segment_logits(self.model, images).softmax(dim=1)
        rows: dict[str, list[Any]] = {name: [] for name in SIGNALS_SCHEMA.names}
        for i, image_id in enumerate(batch["image_id"]):
            h, w = int(batch["height"][i]), int(batch["width"][i])
            index_bytes, prob_bytes, k = encode_signals(upsample_probs(probs[i], h, w), self.topk)
            for key, value in zip(
                SIGNALS_SCHEMA.names,
                (str(image_id), h, w, probs.shape[1], k, index_bytes, prob_bytes),
                strict=True,
            ):
                rows[key].append(value)
        return pa.table(rows, schema=SIGNALS_SCHEMA)


def run(
    cfg: TeachConfig, *, images: DatasetRef, checkpoint_path: str, image_size: int, out: DatasetRef
) -> dict[str, float]:
    """Run the teacher over the unlabeled split with an actor pool; write and commit signals."""
    signals = predict_split(
        images,
        "unlabeled",
        ["image_id", "height", "width", "image"],
        TeacherPredictor,
        {"checkpoint_path": checkpoint_path, "topk": cfg.topk},
        cfg=cfg,
        image_size=image_size,
    )
    manifest = write_committed(signals, out, "teacher_signals/1")
    return {"images": float(manifest["rows"])}
