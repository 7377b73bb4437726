"""The report's pictures as data: pseudo-label overlays, val predictions and training curves,
read from what the run stored (and from MLflow for the curves)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.compute as pc
import torch

from pipeline import figures
from pipeline.cache.entries import output_dataset
from pipeline.graph import final_round
from pipeline.models import model_from_bytes, predict_pictures
from pipeline.redact import redact
from pipeline.report.quality import LABEL_COLUMNS, decode_labels
from pipeline.report.runs import RunRecords
from stages.core import codec
from stages.core.constants import IGNORE_INDEX
from stages.core.storage import Storage
from stages.pseudolabel.table import decode_pseudolabels

logger = logging.getLogger(__name__)


SAMPLES = 6  # images shown in the overlay grid and the val predictions


# Model-input pixels per model the val predictions may cost on the CPU: every sample at 64 px,
# 4 images at 512 px.
MAX_PREDICTED_PIXELS = 4 * 512 * 512


RELIABILITY = {
    "threshold": "reliable: conf ≥ τ",
    "s4mc": "reliable: refined margin > γ",
    "csl": "trusted: w = 1",
    "wpl": "reliable R: detector ∧ segmentation",
    "ground_truth": "kept: ground truth known (mask ≠ 255)",
}


# ------------------------------------------------------------------------------- overlays
def overlay_samples(
    storage: Storage, records: RunRecords, count: int = SAMPLES
) -> list[figures.Sample]:
    """The first ``count`` unlabeled images by id, with the run's own stored pseudo-labels."""
    images, labels = (
        records.output("ingest", "images"),
        records.output("pseudolabel", "pseudolabels"),
    )
    if images is None or labels is None:
        return []
    labels_ref = output_dataset(storage, "pseudolabels", labels)
    ids = set(sorted(labels_ref.read_table(["image_id"])["image_id"].to_pylist())[:count])
    pictures = {
        r["image_id"]: r
        for r in output_dataset(storage, "images", images)
        .read_rows(["image_id", "image", "mask"], ids)
        .to_pylist()
    }
    samples = []
    for row in labels_ref.read_rows(
        [*LABEL_COLUMNS, "trusted", "reliable", "policy"], ids
    ).to_pylist():
        label, keep, weight = decode_labels(row)
        mask_column = {"csl": "trusted", "wpl": "reliable"}.get(row["policy"], "keep")
        reliable = decode_pseudolabels(row, [mask_column]).get(mask_column, keep)
        picture = pictures[row["image_id"]]
        truth = codec.decode_png(picture["mask"]) if picture["mask"] is not None else None
        samples.append(
            figures.Sample(
                image_id=row["image_id"],
                image=codec.decode_png(picture["image"]),
                truth=truth,
                label=label,
                keep=keep,
                reliable=reliable,
                weight=weight,
            )
        )
    return sorted(samples, key=lambda s: s.image_id)


# ------------------------------------------------------------------------- val predictions
def val_predictions(
    storage: Storage, records: RunRecords, count: int = SAMPLES
) -> list[figures.Predicted]:
    """The first val images by id (``count``, fewer at large image sizes: see
    ``MAX_PREDICTED_PIXELS``) with the teacher's and the final student's label maps, computed
    on the CPU as ``pseudoflow predict`` computes them."""
    images = records.output("ingest", "images")
    last = final_round(records.config)
    outputs = {
        "teacher": records.output("train_teacher", "teacher"),
        "student": records.output(last.name("train_student"), last.name("student")),
    }
    models = {name: output for name, output in outputs.items() if output is not None}
    if images is None or "student" not in models:
        return []
    size = records.config.data.image_size
    count = max(1, min(count, MAX_PREDICTED_PIXELS // (size * size)))
    ref = output_dataset(storage, "images", images)
    table = ref.read_table(["image_id", "split"])
    val = sorted(table.filter(pc.equal(table["split"], "val"))["image_id"].to_pylist())[:count]
    rows = sorted(
        ref.read_rows(["image_id", "image", "mask"], set(val)).to_pylist(),
        key=lambda r: str(r["image_id"]),
    )
    if not rows:
        return []
    pictures = [codec.decode_png(r["image"]) for r in rows]
    device = torch.device("cpu")
    labels = {}
    for name, output in models.items():
        path = storage.resolve(output["path"])
        model = model_from_bytes(storage.read_bytes(path), source=path, device=device)
        labels[name] = predict_pictures(model, pictures, device=device)
    return [
        figures.Predicted(
            image_id=row["image_id"],
            image=picture,
            truth=_truth(row["mask"], picture),
            labels={name: labels[name][i] for name in labels},
        )
        for i, (row, picture) in enumerate(zip(rows, pictures, strict=True))
    ]


def _truth(mask: bytes | None, picture: np.ndarray) -> np.ndarray:
    """A stored mask, or all ignored where the image has none."""
    if mask is None:
        return np.full(picture.shape[:2], IGNORE_INDEX, np.uint8)
    return codec.decode_png(mask)


# ------------------------------------------------------------------------- training curves
def training_curves(
    records: RunRecords, uri: str | None
) -> tuple[dict[str, dict[str, list[tuple[int, float]]]], dict[str, str]]:
    """Per training stage of the run: its logged losses and learning rate by step (from the
    stage's MLflow run, or for a cache hit the run that trained the entry), and a note (where
    reused curves come from, or why there are none)."""
    from pipeline.tracking import stage_histories

    stages = {
        use.stage: (use.key, use.hit)
        for use in records.stages.values()
        if use.stage.startswith("train_")
    }
    if not stages:
        return {}, {}
    if uri is None:
        return {}, dict.fromkeys(stages, "no MLflow store for this run")
    try:
        found = stage_histories(uri, records.config.tracking.experiment, records.run_id, stages)
    except Exception as exc:  # an unreachable server: the rest of the report still shows
        logger.warning("training curves: cannot read MLflow at %s: %s", redact(uri), exc)
        return {}, dict.fromkeys(stages, f"cannot read MLflow at {redact(uri)}")
    curves, notes = {}, {}
    for stage, history in found.items():
        curves[stage] = history.metrics
        if history.reused and history.run_id:
            notes[stage] = f"reused: curves of MLflow run {history.run_id[:12]}"
        if history.note:
            notes[stage] = history.note
    return curves, notes
