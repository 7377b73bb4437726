"""The teach stage: the teacher over the labeled and unlabeled images -> ``teacher_signals``.

What is stored lets every pseudo-label policy be computed later without running the teacher again
(a policy change never triggers inference), compactly, never as float32 logits:

* per pixel, at the image's own resolution, the top-K classes (uint8) and their softmax
  probabilities quantised to uint16 (``p = q / 65535``, error <= 1/131070 per stored value);
* the teacher's decoder features just before the classifier (methods.md §4, for WPL's prototypes)
  at the head's own stride, as float16.

Bounds. With K = C (the default, ``topk: null``) the probabilities are exact up to quantisation.
With K < C the missing mass ``1 - sum(top-K)`` is spread evenly over the C - K missing classes
(:func:`full_probs`); every missing class's true probability lies in ``[0, min(p_(K), 1 - sum)]``
as does its estimate, so its error is at most ``min(p_(K), 1 - sum(top-K))``. The top-2 margin and
the confidence stay exact (up to quantisation) whenever K >= 2. A threshold decision such as
``conf >= tau`` can differ from the one on float32 probabilities only for pixels within 1/131070
of the threshold. Labeled images are included (``split`` column, and
their ground-truth ``mask``) because WPL's labeled prototype queue is fed from them; unlabeled rows
never carry a mask.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field
from torch import nn

from stages.core import codec, data
from stages.core.cache import ShardPool
from stages.core.inference import (
    InferenceConfig,
    load_model,
    pick_device,
    predict_into_pool,
    upsample_probs,
)
from stages.core.models import segment_with_features
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
        ("split", pa.string()),
        ("feature_dim", pa.int32()),
        ("feature_height", pa.int32()),
        ("feature_width", pa.int32()),
        ("features", pa.binary()),  # float16[D, h, w], the classifier's input
        ("mask", pa.binary()),  # labeled rows: the ground-truth PNG (WPL's labeled queue)
    ]
)


SPLITS = ("labeled", "unlabeled")


class TeachConfig(InferenceConfig):
    topk: int | None = Field(
        None, ge=2, le=255, description="classes kept per pixel; null: all (exact)"
    )


def encode_signals(probs: torch.Tensor, topk: int | None) -> tuple[bytes, bytes, int]:
    """``probs: float[C, H, W]`` -> (top-K indices uint8 bytes, quantised probs uint16 bytes, K)."""
    k = probs.shape[0] if topk is None else min(topk, probs.shape[0])
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


def full_probs(indices: np.ndarray, probs: np.ndarray, num_classes: int) -> torch.Tensor:
    """Stored top-K signals -> probabilities ``float32[C, H, W]``.

    indices: uint8[K, H, W]; probs: float32[K, H, W] in [0, 1], descending. With K < C the missing
    mass is spread evenly over the missing classes (see the module docstring for the bound).
    """
    k = indices.shape[0]
    index = torch.from_numpy(indices.astype(np.int64))
    values = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))
    spread = 0.0
    if k < num_classes:
        spread = ((1.0 - values.sum(dim=0)).clamp(min=0.0) / (num_classes - k))[None]
    out = torch.zeros((num_classes, *indices.shape[1:]), dtype=torch.float32) + spread
    return out.scatter_(0, index, values)


def decode_features(row: dict[str, Any]) -> torch.Tensor:
    """A ``teacher_signals`` row -> the teacher's features ``float32[D, h, w]``."""
    shape = (int(row["feature_dim"]), int(row["feature_height"]), int(row["feature_width"]))
    return torch.from_numpy(codec.from_bytes(row["features"], np.float16, shape).astype(np.float32))


class TeacherPredictor:
    """Callable class for ``map_batches``: decoded images -> teacher signal rows."""

    def __init__(self, storage_url: str, checkpoint_path: str, topk: int | None, gpus: float = 0.0):
        self.device = pick_device(gpus)
        model, _ = load_model(storage_url, checkpoint_path)
        self.model = model.to(self.device)
        self.topk = topk

    @classmethod
    def of_model(cls, model: nn.Module, topk: int | None, device: torch.device) -> TeacherPredictor:
        """The same predictor around a network already in memory (``pseudoflow bench quality``:
        a student becomes the next round's teacher)."""
        predictor = cls.__new__(cls)
        predictor.device, predictor.model, predictor.topk = device, model.to(device).eval(), topk
        return predictor

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = data.normalize(torch.from_numpy(batch["image"]).to(self.device))
        logits, features = segment_with_features(self.model, images)
        probs = logits.softmax(dim=1)
        half = features.to(torch.float16).cpu().numpy()
        rows: dict[str, list[Any]] = {name: [] for name in SIGNALS_SCHEMA.names}
        for i, image_id in enumerate(batch["image_id"]):
            h, w = int(batch["height"][i]), int(batch["width"][i])
            index_bytes, prob_bytes, k = encode_signals(upsample_probs(probs[i], h, w), self.topk)
            split = str(batch["split"][i])
            mask = batch["mask"][i] if split == "labeled" else None
            values: tuple[Any, ...] = (str(image_id), h, w, probs.shape[1], k, index_bytes)
            values += (prob_bytes, split, *half.shape[1:], codec.to_bytes(half[i]), mask)
            for key, value in zip(SIGNALS_SCHEMA.names, values, strict=True):
                rows[key].append(value)
        return pa.table(rows, schema=SIGNALS_SCHEMA)


SCHEMA = "teacher_signals/2"


def run(
    cfg: TeachConfig,
    *,
    images: DatasetRef,
    checkpoint_path: str,
    image_size: int,
    out: DatasetRef,
    pool: ShardPool,
) -> dict[str, float]:
    """Run the teacher over the labeled and unlabeled images that ``pool`` does not hold yet
    (actor pool, a shard committed at a time); commit ``out`` over all of them."""
    return predict_into_pool(
        images,
        SPLITS,
        ["image_id", "height", "width", "image", "split", "mask"],
        TeacherPredictor,
        {"checkpoint_path": checkpoint_path, "topk": cfg.topk},
        cfg=cfg,
        image_size=image_size,
        pool=pool,
        out=out,
        schema=SCHEMA,
    )
