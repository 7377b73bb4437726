"""Every call into a stage that ``bench throughput`` makes: those callables' internals change,
and only these few functions know their signatures."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from stages.detect.predictor import DetectorPredictor
from stages.detect.table import DETECTIONS_SCHEMA
from stages.pseudolabel.batches import label_batch
from stages.pseudolabel.config import PseudolabelConfig
from stages.pseudolabel.maps import signal_spec
from stages.segtrain import (
    Learner,
    StudentConfig,
    new_learner,
    pseudolabel_rows_to_arrays,
    train_step,
)
from stages.teach.config import TeachConfig
from stages.teach.predictor import TeacherPredictor
from stages.teach.table import SignalSpec

Labeler = Callable[[dict[str, np.ndarray]], pa.Table]


# ----------------------------------------------------------- adapters: every call into a stage
def policy_signals(policy: str) -> SignalSpec:
    """What the teach stage stores for ``policy`` (its default options)."""
    return signal_spec(PseudolabelConfig(policy=policy))


def teacher_predictor(
    model: nn.Module, device: torch.device, policy: str = "threshold"
) -> tuple[Labeler, torch.dtype | None]:
    """The teach stage's predictor around ``model``, storing what ``policy`` reads, at the
    teach stage's default precision; and the autocast dtype its forward runs in (None:
    float32). Called with {image_id, height, width, image uint8[B, 3, S, S], split, mask}, it
    returns the stage's signal rows."""
    precision = TeachConfig().precision
    predictor = TeacherPredictor.of_model(model, device, policy_signals(policy), precision)
    return predictor, predictor.dtype


def detector_predictor(
    model: nn.Module, model_args: dict[str, Any], device: torch.device
) -> Labeler:
    """The detect stage's predictor (min_score 0.05, ``DetectConfig``'s default)."""
    return DetectorPredictor.of_model(model, model_args, 0.05, device)


def detections_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows {image_id, boxes (x1, y1, x2, y2 flattened), labels, scores} as the detect
    stage's table."""
    full = [{**row, "num_boxes": len(row["labels"])} for row in rows]
    return pa.Table.from_pylist(full, schema=DETECTIONS_SCHEMA)


def label_rows(
    signals: pa.Table,
    policy: str,
    *,
    prototypes: np.ndarray | None = None,
    detections: pa.Table | None = None,
) -> pa.Table:
    """The pseudolabel stage's batch function: signal rows -> pseudo-label rows of ``policy``
    (its default options); WPL with ``prototypes`` float32[C, D] and ``detections``."""
    cfg = PseudolabelConfig(policy=policy).model_dump()
    return label_batch(signals, cfg, prototypes, detections)


def student(arch: str, num_classes: int, size: int, batch: int, device: torch.device) -> Learner:
    """A student learner (threshold policy, the config's defaults otherwise) taking ``batch``
    labeled and ``batch`` unlabeled images a step."""
    cfg = StudentConfig(arch=arch, batch_size=batch, unlabeled_batch_size=batch, steps=1_000_000)
    return new_learner(cfg, num_classes=num_classes, crop_size=size, seed=0, device=device)


def student_step(
    learner: Learner,
    labeled: dict[str, torch.Tensor],
    unlabeled: dict[str, torch.Tensor],
    step: int,
) -> None:
    train_step(learner, labeled, unlabeled, step)


def step_views(batch: int) -> int:
    """Images ``train_step`` forwards (threshold policy): the labeled weak view and two strong
    views of the unlabeled batch."""
    return 3 * batch


def training_parts(learner: Learner) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    """The learner's network, its optimizer, and whether it trains under float16 autocast."""
    return learner.model, learner.optimizer, learner.scaler.is_enabled()


def with_network(learner: Learner, network: nn.Module) -> Learner:
    """The same learner training ``network`` instead (a fresh AdamW over its parameters)."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=learner.cfg.lr)
    return dataclasses.replace(learner, model=network, optimizer=optimizer)


def unlabeled_arrays(rows: pa.Table, pngs: list[bytes], size: int) -> dict[str, torch.Tensor]:
    """Pseudo-label rows joined with their images' PNGs, as the student's Ray Data step
    makes them (what ``iter_torch_batches`` then yields)."""
    batch = {name: np.asarray(rows[name].to_pylist(), dtype=object) for name in rows.column_names}
    batch["image"] = np.asarray(pngs, dtype=object)
    arrays = pseudolabel_rows_to_arrays(batch, size)
    return {name: torch.from_numpy(value) for name, value in arrays.items()}


def parquet_bytes(table: pa.Table) -> int:
    """Size of ``table`` written as the stages write their shards (zstd Parquet)."""
    return len(zstd_parquet(table))


def zstd_parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def column_bytes(parquet: bytes) -> dict[str, int]:
    """Compressed bytes of each column of a Parquet file (its row groups' metadata)."""
    meta = pq.ParquetFile(io.BytesIO(parquet)).metadata
    sizes: dict[str, int] = {}
    for group in range(meta.num_row_groups):
        for index in range(meta.num_columns):
            column = meta.row_group(group).column(index)
            name = column.path_in_schema
            sizes[name] = sizes.get(name, 0) + column.total_compressed_size
    return sizes
