"""The teach stage: the teacher over the labeled and unlabeled images -> ``teacher_signals``.

The teacher's probabilities ``P`` (``C`` per pixel) are never stored: on the device that runs the
teacher, batched over all images of a size, they are reduced to the per-pixel statistics every
policy reads (methods.md §5), quantised there, and copied to the host once per batch:

* always ``label`` ŷ = argmax_c P and ``conf`` = max_c P (threshold, WPL);
* S4MC: ``margin`` κ = p_(1) − p_(2) and ``refined_margin`` κ̃ = margin(P̃) (with the
  ``neighborhood`` and ``beta`` of :class:`SignalSpec`), and ``refined_label`` argmax P̃ under
  ``label_from: refined``;
* CSL: ``dispersion``, the residual dispersion r (methods.md §3), stored as ``√(4r)`` (r ≤ 1/4);
* WPL: the teacher's decoder features just before the classifier (methods.md §4, the
  prototypes' input) at the head's own stride, as float16.

Which of them a run stores (:class:`SignalSpec`) follows from its policy and ``teach.policies``
(the policies to store signals for besides it); the spec is part of the stage's cache key.

All maps are at the image's own resolution, uint8 ``q = round(255·v)``: 1 byte per pixel each
before Parquet's zstd, against 3·C bytes for the top-C probabilities stored before (63 at 21
classes). Bounds: a stored value is within 1/510 of the exact one, so a decision ``conf >= τ`` (or
``κ̃ > γ``) can differ from the one on float32 probabilities only for pixels within 1/510 of the
threshold; r is within ``√r/255`` of its value. What each policy's output loses against the exact
probabilities is measured in ``tests/stages/pseudolabel/test_stage.py`` and stated in README.

Labeled images are included (``split`` column, and their ground-truth ``mask``) because WPL's
labeled prototype queue is fed from them; unlabeled rows never carry a mask.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, field_validator
from torch import nn

from stages.core import codec, data
from stages.core.config import StrictModel
from stages.core.inference import (
    InferenceConfig,
    load_model,
    pick_device,
    predict_into_pool,
    to_image,
)
from stages.core.models import segment_logits, segment_with_features
from stages.core.shards import ShardPool
from stages.core.storage import DatasetRef
from stages.core.training import hold_point
from stages.pseudolabel import ops

logger = logging.getLogger(__name__)

SIGNAL_LEVELS = 255  # every stored map is uint8 q = round(v * 255)
MAPS = ("label", "conf", "margin", "refined_margin", "refined_label", "dispersion")
SIGNALS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_classes", pa.int32()),
        ("label", pa.binary()),  # uint8[H, W], argmax_c P
        ("conf", pa.binary()),  # uint8[H, W], max_c P = q / 255
        ("margin", pa.binary()),  # uint8[H, W], κ = q / 255
        ("refined_margin", pa.binary()),  # uint8[H, W], κ̃ = q / 255
        ("refined_label", pa.binary()),  # uint8[H, W], argmax_c P̃ (null unless the spec asks)
        ("dispersion", pa.binary()),  # uint8[H, W], √(4r) = q / 255
        ("split", pa.string()),
        ("feature_dim", pa.int32()),
        ("feature_height", pa.int32()),
        ("feature_width", pa.int32()),
        ("features", pa.binary()),  # float16[D, h, w], the classifier's input (WPL only)
        ("mask", pa.binary()),  # labeled rows: the ground-truth PNG (WPL's labeled queue)
    ]
)


TEACH_SPLITS = ("labeled", "unlabeled")  # the splits a teach stage labels


POLICY_NAMES = ("threshold", "s4mc", "csl", "wpl")


class SignalSpec(StrictModel):
    """Which statistics are stored, and what they depend on besides the teacher and the images:
    part of the teach stage's cache key, so that a change of one of these reruns the teacher and
    nothing else does. ``label`` and ``conf`` are always stored (threshold, WPL)."""

    margins: bool = Field(False, description="κ and κ̃ (S4MC)")
    neighborhood: Literal[4, 8] = Field(8, description="S4MC's refinement neighbourhood")
    beta: float = Field(1.0, ge=0.0, le=1.0, description="S4MC's refinement strength")
    refined_label: bool = Field(False, description="argmax P̃ (S4MC label_from: refined)")
    dispersion: bool = Field(False, description="r (CSL)")
    features: bool = Field(False, description="the decoder features (WPL)")


class TTAConfig(StrictModel):
    """Test-time augmentation of the teacher: its softmax averaged over the canvas scaled by each
    factor of ``scales`` and, with ``flip``, each of those mirrored (``len(scales) * (1 + flip)``
    forwards an image). WPL's features come from the plain view (scale 1, not flipped)."""

    scales: tuple[float, ...] = Field(
        (1.0,),
        strict=False,
        min_length=1,
        description="canvas scale factors (1.0 must be one of them), e.g. [0.75, 1.0, 1.25]",
    )
    flip: bool = Field(False, description="also each scale mirrored left to right")

    @field_validator("scales")
    @classmethod
    def _has_plain_view(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if 1.0 not in value:
            raise ValueError(f"teach.tta.scales must include 1.0 (the plain view); got {value}")
        if any(v <= 0 for v in value) or len(set(value)) != len(value):
            raise ValueError(f"teach.tta.scales must be distinct and > 0; got {value}")
        return value

    @property
    def enabled(self) -> bool:
        return self.scales != (1.0,) or self.flip


class TeachConfig(InferenceConfig):
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16",
        description="the teacher's forward on CUDA: bfloat16 or float16 autocast (with "
        "channels-last), or float32; CPUs always run float32. Softmax and every statistic are "
        "float32",
    )
    policies: list[Literal["threshold", "s4mc", "csl", "wpl", "ground_truth"]] = Field(
        default_factory=list,
        description="policies whose signals are stored besides pseudolabel.policy's, so that "
        "switching to one reuses this teach stage and the report compares them (ground_truth "
        "needs none)",
    )
    tta: TTAConfig = Field(default_factory=TTAConfig)


def quantize(values: torch.Tensor, levels: int = SIGNAL_LEVELS) -> torch.Tensor:
    """Floats in [0, 1] -> ``round(v * levels)`` on their device: uint8 for up to 255 levels,
    int32 above (:func:`stages.core.codec.quantize_unit`'s arithmetic, so the same integers)."""
    dtype = torch.uint8 if levels <= 255 else torch.int32
    return (values.clamp(0.0, 1.0) * levels).round_().to(dtype)


def signal_maps(probs: torch.Tensor, spec: SignalSpec) -> dict[str, torch.Tensor]:
    """The statistics of ``probs: float[B, C, H, W]`` that ``spec`` asks for, exact (float
    ``[B, H, W]``; labels int64), computed batched on the probabilities' device. CSL's r is
    ``(Σ_c P_c² − m² − (1 − m)²/(C − 1)) / (C − 1)``: methods.md §3's sum over c ≠ ŷ written with
    one reduction over the classes (Σ_c P_c = 1)."""
    classes = probs.shape[1]
    if classes < 2 or classes > 255:
        raise ValueError(f"teacher signals need 2 to 255 classes, got {classes}")
    conf, label = probs.max(dim=1)
    maps = {"label": label, "conf": conf}
    if spec.margins:
        refined = ops.s4mc_refine(probs, neighborhood=spec.neighborhood, beta=spec.beta)
        maps |= {"margin": ops.margin(probs), "refined_margin": ops.margin(refined)}
        if spec.refined_label:
            maps["refined_label"] = refined.argmax(dim=1)
    if spec.dispersion:
        squares = torch.linalg.vector_norm(probs, dim=1).square()
        spread = squares - conf.square() - (1.0 - conf).square() / (classes - 1)
        maps["dispersion"] = spread.clamp(min=0.0) / (classes - 1)
    return maps


def quantized_maps(probs: torch.Tensor, spec: SignalSpec) -> torch.Tensor:
    """:func:`signal_maps` as stored: ``uint8[M, B, H, W]`` with M = :func:`stored_maps` (spec),
    on the probabilities' device."""
    maps = signal_maps(probs, spec)
    out = []
    for name in stored_maps(spec):
        value = maps[name]
        if name in ("label", "refined_label"):
            out.append(value.to(torch.uint8))
        elif name == "dispersion":
            out.append(quantize((4.0 * value).sqrt()))
        else:
            out.append(quantize(value))
    return torch.stack(out)


def stored_maps(spec: SignalSpec) -> list[str]:
    """The map columns a spec fills, in :data:`MAPS` order."""
    wanted = {"label", "conf"}
    if spec.margins:
        wanted |= {"margin", "refined_margin"} | (
            {"refined_label"} if spec.refined_label else set()
        )
    if spec.dispersion:
        wanted.add("dispersion")
    return [name for name in MAPS if name in wanted]


def decode_signals(row: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A ``teacher_signals`` row -> its maps ``[H, W]``: ``label`` (and ``refined_label``, where
    stored) int64, ``conf``, ``margin``, ``refined_margin`` and ``dispersion`` (r) float32."""
    return {name: value[0] for name, value in decode_signal_batch([row]).items()}


def decode_signal_batch(
    rows: Sequence[Mapping[str, Any]], device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """``teacher_signals`` rows of one size -> their maps ``[B, H, W]`` on ``device``, as
    :func:`decode_signals` gives them (the only decoder of the table's maps): the uint8 bytes
    are stacked on the host, copied once, and dequantised on the device."""
    if not rows:
        raise ValueError("decode_signal_batch needs at least one row")
    shape = (len(rows), int(rows[0]["height"]), int(rows[0]["width"]))
    if any((int(r["height"]), int(r["width"])) != shape[1:] for r in rows):
        raise ValueError("decode_signal_batch takes rows of one image size (see size_groups)")
    out: dict[str, torch.Tensor] = {}
    for name in MAPS:
        if rows[0].get(name) is None:
            continue
        values = np.concatenate([np.frombuffer(r[name], np.uint8) for r in rows])
        stored = torch.from_numpy(values.reshape(shape)).to(device or "cpu")
        if name in ("label", "refined_label"):
            out[name] = stored.long()
            continue
        unit = stored.float() / float(SIGNAL_LEVELS)
        out[name] = unit.square_() / 4.0 if name == "dispersion" else unit
    return out


def decode_features(row: Mapping[str, Any]) -> torch.Tensor:
    """A ``teacher_signals`` row -> the teacher's features ``float32[D, h, w]``."""
    return decode_feature_batch([row])[0]


def decode_feature_batch(
    rows: Sequence[Mapping[str, Any]], device: torch.device | None = None
) -> torch.Tensor:
    """Rows of one feature shape -> their features ``float32[B, D, h, w]`` on ``device`` (one
    float16 host-to-device copy)."""
    for row in rows:
        if row.get("features") is None:
            raise ValueError(
                f"teacher signals of image {row['image_id']} hold no features: they were made "
                "for a policy other than wpl; run teach again with pseudolabel.policy=wpl"
            )
    shapes = {
        (int(r["feature_dim"]), int(r["feature_height"]), int(r["feature_width"])) for r in rows
    }
    if len(shapes) != 1:
        raise ValueError(f"decode_feature_batch takes rows of one feature shape, got {shapes}")
    (shape,) = shapes
    half = np.concatenate([np.frombuffer(r["features"], np.float16) for r in rows])
    return torch.from_numpy(half.reshape(len(rows), *shape)).to(device or "cpu").float()


def size_groups(heights: np.ndarray, widths: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(height, width, indices)`` of the images of each size, sizes in first-seen order."""
    sizes = np.stack([np.asarray(heights, np.int64), np.asarray(widths, np.int64)], axis=1)
    found, first, inverse = np.unique(sizes, axis=0, return_index=True, return_inverse=True)
    for group in np.argsort(first):
        h, w = found[group]
        yield int(h), int(w), np.flatnonzero(inverse.reshape(-1) == group)


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


SCHEMA = "teacher_signals/3"


def run(
    cfg: TeachConfig,
    *,
    spec: SignalSpec,
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
        TEACH_SPLITS,
        ["image_id", "height", "width", "image", "split", "mask"],
        TeacherPredictor,
        {
            "checkpoint_path": checkpoint_path,
            "spec": spec.model_dump(),
            "precision": cfg.precision,
            "tta": cfg.tta.model_dump(mode="json"),
        },
        cfg=cfg,
        image_size=image_size,
        pool=pool,
        out=out,
        schema=SCHEMA,
    )
