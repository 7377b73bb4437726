"""The ``pseudolabels`` table: its schema, its only encoder (:func:`encode_rows`) and its only
decoder (:func:`decode_pseudolabels`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from stages.core import codec
from stages.pseudolabel.config import (
    PseudolabelConfig,
    weight_offset,
)
from stages.teach.table import quantize

logger = logging.getLogger(__name__)


PSEUDOLABELS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("policy", pa.string()),
        ("label", pa.binary()),  # PNG uint8[H, W]
        ("keep", pa.binary()),  # bit-packed bool[H, W]
        ("weight", pa.binary()),  # uint8[H, W], w = weight_offset + q / 255 (where kept)
        ("weight_offset", pa.float32()),
        ("margin", pa.binary()),  # S4MC κ, uint16[H, W], q / 65535
        ("refined_margin", pa.binary()),  # S4MC κ̃, uint16[H, W], q / 65535
        ("trusted", pa.binary()),  # CSL, bit-packed bool[H, W]
        ("reliable", pa.binary()),  # WPL R, bit-packed bool[H, W]
        ("coverage", pa.float32()),
    ]
)


def encode_row(
    cfg: PseudolabelConfig, image_id: str, maps: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Per-image maps ``[H, W]`` -> one ``pseudolabels`` row (:func:`encode_rows` of one)."""
    return encode_rows(cfg, [image_id], {name: value[None] for name, value in maps.items()})[0]


def encode_rows(
    cfg: PseudolabelConfig, image_ids: list[str], maps: Mapping[str, torch.Tensor]
) -> list[dict[str, Any]]:
    """The table's only encoder: maps ``[B, H, W]`` of :func:`batch_policy_maps` -> ``pseudolabels``
    rows. Quantisation and coverage run batched on the maps' device; the host gets one copy of
    the uint8 maps (and one of the margins), then packs bits and encodes the label PNG per row."""
    batch, h, w = maps["keep"].shape
    if len(image_ids) != batch:
        raise ValueError(f"{len(image_ids)} image ids for a batch of {batch} maps")
    keep = maps["keep"].bool()
    weight = maps["weight"].float() * keep
    offset = weight_offset(cfg)
    masks = [name for name in ("trusted", "reliable") if name in maps]
    margins = [name for name in ("margin", "refined_margin") if name in maps]
    small = torch.stack(
        [
            maps["label"].to(torch.uint8),
            keep.to(torch.uint8),
            quantize(weight, codec.WEIGHT_LEVELS),
            *(maps[name].to(torch.uint8) for name in masks),
        ]
    ).cpu()
    wide = {
        name: quantize(maps[name], codec.PROB_LEVELS).cpu().numpy().astype(np.uint16)
        for name in margins
    }
    coverage = (((weight + offset * keep) > 0).sum(dim=(1, 2)).cpu() / float(h * w)).tolist()
    host = dict(zip(["label", "keep", "weight", *masks], small.numpy(), strict=True))
    rows = []
    for i, image_id in enumerate(image_ids):
        row: dict[str, Any] = dict.fromkeys(PSEUDOLABELS_SCHEMA.names)
        row |= {
            "image_id": image_id,
            "height": h,
            "width": w,
            "policy": cfg.policy,
            "label": codec.encode_png(host["label"][i]),
            "keep": codec.pack_mask(host["keep"][i]),
            "weight": codec.to_bytes(host["weight"][i]),
            "weight_offset": offset,
            "coverage": coverage[i],
        }
        row |= {name: codec.pack_mask(host[name][i]) for name in masks}
        row |= {name: codec.to_bytes(wide[name][i]) for name in margins}
        rows.append(row)
    return rows


MASKS = ("keep", "trusted", "reliable")


PSEUDOLABEL_MAPS = ("label", "keep", "weight", "margin", "refined_margin", "trusted", "reliable")


def decode_pseudolabels(
    row: Mapping[str, Any], names: Iterable[str] = PSEUDOLABEL_MAPS
) -> dict[str, np.ndarray]:
    """The only decoder of a ``pseudolabels`` row (:func:`encode_row` is its encoder): the maps
    of ``names`` that the row holds, ``[H, W]`` each: ``label`` uint8, ``keep``, ``trusted`` and
    ``reliable`` bool, ``weight`` float32 (the training weight: ``weight_offset`` added where
    kept, 0 elsewhere), ``margin`` and ``refined_margin`` float32."""
    h, w = int(row["height"]), int(row["width"])
    wanted = set(names)
    out: dict[str, np.ndarray] = {}
    if "label" in wanted:
        out["label"] = codec.decode_png(row["label"])
    for name in MASKS:
        if name in wanted and row.get(name) is not None:
            out[name] = codec.unpack_mask(row[name], h, w)
    if "weight" in wanted:
        keep = out["keep"] if "keep" in out else codec.unpack_mask(row["keep"], h, w)
        unit = codec.dequantize_unit(
            codec.from_bytes(row["weight"], np.uint8, (h, w)), codec.WEIGHT_LEVELS
        )
        out["weight"] = ((unit + float(row["weight_offset"])) * keep).astype(np.float32)
    for name in ("margin", "refined_margin"):
        if name in wanted and row.get(name) is not None:
            values = codec.from_bytes(row[name], np.uint16, (h, w))
            out[name] = codec.dequantize_unit(values, codec.PROB_LEVELS).astype(np.float32)
    return out


SCHEMA = "pseudolabels/2"
