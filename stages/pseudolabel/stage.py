"""The pseudolabel stage: ``teacher_signals`` -> ``pseudolabels`` for one policy (CPU tasks).

Each row holds the label map (PNG), the keep mask (bit-packed) and the weight map (uint8,
w = q / 255), at the image's own resolution, plus its coverage (kept / all pixels).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from stages.core import codec
from stages.core.config import StrictModel
from stages.core.inference import write_committed
from stages.core.storage import DatasetRef
from stages.core.tables import read_dataset
from stages.pseudolabel import ops
from stages.teach import decode_signals

PSEUDOLABELS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("policy", pa.string()),
        ("label", pa.binary()),  # PNG uint8[H, W]
        ("keep", pa.binary()),  # bit-packed bool[H, W]
        ("weight", pa.binary()),  # uint8[H, W], w = q / 255
        ("coverage", pa.float32()),
    ]
)


class PseudolabelConfig(StrictModel):
    """Which pixels of an unlabeled image get which pseudo-label, and with what weight."""

    policy: Literal["threshold"] = "threshold"
    tau: float = Field(0.95, gt=0.0, le=1.0, description="confidence threshold (methods.md §1)")


def threshold_maps(
    probs_top: np.ndarray, labels_top: np.ndarray, tau: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Threshold policy on stored top-K signals of one image.

    probs_top: float[K, H, W] in [0, 1] (sorted, descending); labels_top: uint8[K, H, W].
    Returns label uint8[H, W], keep bool[H, W] (conf >= tau), weight float32[H, W] (all 1).
    """
    conf = torch.from_numpy(probs_top[0])[None]
    valid = torch.ones_like(conf, dtype=torch.bool)
    keep = ops.threshold_keep(conf, valid, tau=tau)[0].numpy()
    return labels_top[0], keep, np.ones(keep.shape, np.float32)


def label_batch(table: pa.Table, cfg: dict[str, Any]) -> pa.Table:
    """Ray Data batch function: signal rows -> pseudo-label rows."""
    policy = PseudolabelConfig.model_validate(cfg)
    rows: dict[str, list[Any]] = {name: [] for name in PSEUDOLABELS_SCHEMA.names}
    for row in table.to_pylist():
        indices, probs = decode_signals(row)
        label, keep, weight = threshold_maps(probs, indices, policy.tau)
        values = (
            row["image_id"],
            row["height"],
            row["width"],
            policy.policy,
            codec.encode_png(np.ascontiguousarray(label)),
            codec.pack_mask(keep),
            codec.to_bytes(codec.quantize_unit(weight * keep, codec.WEIGHT_LEVELS)),
            float(keep.mean()),
        )
        for key, value in zip(PSEUDOLABELS_SCHEMA.names, values, strict=True):
            rows[key].append(value)
    return pa.table(rows, schema=PSEUDOLABELS_SCHEMA)


def run(cfg: PseudolabelConfig, *, signals: DatasetRef, out: DatasetRef) -> dict[str, float]:
    """Apply the policy to every signal row with Ray Data tasks; write and commit."""
    dataset = read_dataset(signals).map_batches(
        label_batch, fn_kwargs={"cfg": cfg.model_dump()}, batch_format="pyarrow", batch_size=16
    )
    manifest = write_committed(dataset, out, "pseudolabels/1")
    coverage = out.read_table(columns=["coverage"])["coverage"].to_numpy()
    return {"images": float(manifest["rows"]), "mean_image_coverage": float(coverage.mean())}
