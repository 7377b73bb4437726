"""The pseudolabel stage: ``teacher_signals`` (+ ``detections``) -> ``pseudolabels`` for one policy.

Ray Data tasks, batched per image size on the CPU or, with ``pseudolabel.gpus_per_task``, on a GPU;
no model runs here, so changing the policy never triggers inference. Each row holds,
at the image's own resolution, what the student's loop needs (methods.md §5):

* ``label`` (PNG), ``keep`` (bit-packed) and ``weight`` (uint8, ``w = weight_offset + q / 255``);
* S4MC: the unrefined and refined margins κ and κ̃ (uint16), from which the loop makes its keep
  mask per batch; the stored ``keep`` is the t = 0 view (per-image γ at α_0), for reports only;
* CSL: the trusted mask (w == 1, exact, before quantisation) that TMP covers;
* WPL: the reliability mask R and the first weight map W from the teacher-feature prototypes.

``ground_truth`` is no method but the reference rows of a comparison (``full`` / ``oracle``: the
student loop on perfect labels): it reads the unlabeled images' own masks instead of the teacher
signals (label = the mask, keep = mask != 255, weight exactly 1), and fails before writing
anything when an unlabeled image has no mask.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.core.declaration import Declaration
from stages.core.errors import SourceError
from stages.core.inference import write_committed
from stages.core.storage import DatasetRef
from stages.core.tables import read_split, split_ids
from stages.pseudolabel.batches import ground_truth_batch, label_batch
from stages.pseudolabel.config import (
    GROUND_TRUTH,
    PseudolabelConfig,
)
from stages.pseudolabel.prototypes import detection_figures, teacher_prototypes
from stages.pseudolabel.table import SCHEMA
from stages.teach.table import MAPS

logger = logging.getLogger(__name__)


def _without_mask(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table["mask"])).select(["image_id", "stem"])


def check_masks(images: DatasetRef) -> int:
    """The number of unlabeled images, after checking (with Ray Data tasks; only the ids of
    images without a mask come to the driver) that every one has a ground-truth mask, as the
    ground_truth policy needs. Raises ``SourceError`` naming how many lack one and an example."""
    total = len(split_ids(images, "unlabeled"))
    missing = (
        read_split(images, "unlabeled", ["image_id", "stem", "mask"])
        .map_batches(_without_mask, batch_format="pyarrow")
        .take_all()
    )
    if missing:
        first = min(missing, key=lambda row: row["image_id"])
        raise SourceError(
            f"pseudolabel.policy=ground_truth: {len(missing)} of {total} unlabeled images have "
            f"no ground-truth mask (e.g. image {first['image_id']}, stem {first['stem']!r}); "
            "the ground_truth policy needs masks for the whole unlabeled split: give every "
            "unlabeled image its mask, or choose another pseudolabel.policy"
        )
    return total


DECLARATION = Declaration(
    "pseudolabel",
    reads=("teacher_signals", "detections", "images"),  # images: ground_truth's masks
    writes=("pseudolabels",),
    schema=SCHEMA,
    section="pseudolabel",
    key_figures=("images", "mean_image_coverage"),
)


def run(
    cfg: PseudolabelConfig,
    *,
    signals: DatasetRef,
    out: DatasetRef,
    detections: DatasetRef | None = None,
    images: DatasetRef | None = None,
) -> dict[str, float]:
    """Apply the policy to every unlabeled signal row with Ray Data tasks; write and commit.

    WPL also needs ``detections``, put once into the object store for both of its passes.
    ground_truth reads the unlabeled rows of ``images`` (their masks) instead of ``signals``,
    on the CPU (there is no math to speed up), after checking that every one has a mask.
    """
    import ray

    if cfg.policy == GROUND_TRUTH:
        if images is None:
            raise ValueError("the ground_truth policy needs the images dataset (their masks)")
        check_masks(images)
        labelled = read_split(images, "unlabeled", ["image_id", "height", "width", "mask"])
        return _write(
            labelled.map_batches(
                ground_truth_batch,
                fn_kwargs={"cfg": cfg.model_dump()},
                batch_format="pyarrow",
                batch_size=cfg.batch_size,
            ),
            out,
        )
    columns = ["image_id", "height", "width", "num_classes", *MAPS]
    prototypes, boxes, wpl_figures = None, None, {}
    if cfg.policy == "wpl":
        if detections is None:
            raise ValueError("the wpl policy needs the detect stage (detector.enabled: true)")
        columns += ["split", "feature_dim", "feature_height", "feature_width", "features"]
        found = detections.read_table(["image_id", "boxes", "labels", "scores"])
        boxes = ray.put(found)
        shape = signals.read_table(["num_classes", "feature_dim"]).slice(0, 1).to_pylist()[0]
        num_classes = int(shape["num_classes"])
        prototypes, reliable = teacher_prototypes(
            cfg,
            labeled=read_split(signals, "labeled", [*columns, "mask"]),
            unlabeled=read_split(signals, "unlabeled", columns),
            detections=boxes,
            num_classes=num_classes,
            dim=int(shape["feature_dim"]),
        )
        wpl_figures = {
            **detection_figures(found, cfg, num_classes),
            "reliable_images": float(reliable),
        }
        if not reliable:
            _warn_unreliable(cfg, wpl_figures, found.num_rows)
    dataset = read_split(signals, "unlabeled", columns).map_batches(
        label_batch,
        fn_kwargs={
            "cfg": cfg.model_dump(),
            "prototypes": prototypes,
            "detections": boxes,
            "device": "cuda" if cfg.gpus_per_task > 0 else "cpu",
        },
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        num_gpus=cfg.gpus_per_task,
    )
    metrics = _write(dataset, out) | wpl_figures
    if prototypes is not None:
        metrics["teacher_prototypes"] = float((~np.isnan(prototypes).any(axis=1)).sum())
    return metrics


def _warn_unreliable(cfg: PseudolabelConfig, figures: dict[str, float], images: int) -> None:
    """WPL without one reliable unlabeled pixel is threshold weighted by W against prototypes
    of the labeled pixels alone: say so, and why, rather than let the run look like WPL."""
    logger.warning(
        "wpl: no unlabeled pixel is reliable (R = 0 on all %d images): %.3g detections an "
        "image score >= wpl.score_thresh %.2f in a mapped class (best score %.3f), and R also "
        "needs the teacher's conf >= wpl.conf_thresh %.2f and label in the box. The unlabeled "
        "prototype queues stay empty: W comes from the labeled pixels alone. Train the detector "
        "longer (detector.steps) or from weights (detector.init), or check wpl.class_map",
        images,
        figures["confident_boxes_per_image"],
        cfg.wpl.score_thresh,
        figures["best_detection_score"],
        cfg.wpl.conf_thresh,
    )


def _write(dataset: Any, out: DatasetRef) -> dict[str, float]:
    """Write and commit the pseudo-label rows; the stage's metrics."""
    manifest = write_committed(dataset, out, SCHEMA)
    coverage = out.read_table(columns=["coverage"])["coverage"].to_numpy()
    return {"images": float(manifest["rows"]), "mean_image_coverage": float(coverage.mean())}
