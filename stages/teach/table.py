"""The ``teacher_signals`` table: what is stored (``SignalSpec``), its schema, the statistics made
from the teacher's probabilities, and the only decoders of its rows. Ray-free.

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
labeled prototype queue is fed from them; unlabeled rows never carry a mask."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from stages.core.config import StrictModel
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


SCHEMA = "teacher_signals/3"
