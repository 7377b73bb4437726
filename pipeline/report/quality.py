"""Each policy's pseudo-labels against the ground truth of the run's unlabeled images: the stored
ones, and those the other policies make from the stored teacher signals."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.cache.entries import output_dataset
from pipeline.cache.walk import look_up
from pipeline.config import PipelineConfig
from pipeline.graph import Context, all_stages
from pipeline.report.runs import RunRecords
from stages.core import codec
from stages.core.constants import IGNORE_INDEX
from stages.core.metrics import LabelCounts
from stages.core.storage import DatasetRef, Storage
from stages.pseudolabel.config import POLICIES, SIGNAL_POLICIES, PseudolabelConfig
from stages.pseudolabel.maps import missing_signals, policy_maps
from stages.pseudolabel.table import decode_pseudolabels
from stages.teach.table import MAPS, decode_signals

logger = logging.getLogger(__name__)

SIGNAL_COLUMNS = ["image_id", "height", "width", "num_classes", *MAPS]


MAX_IMAGES = 200  # unlabeled images with ground truth the quality figures are computed on


MAX_WEIGHTS = 200_000  # weights per policy kept for its histogram


LABEL_COLUMNS = ["image_id", "height", "width", "label", "keep", "weight", "weight_offset"]


# ----------------------------------------------------------------------- pseudo-label quality
@dataclass
class PolicyQuality:
    """Coverage, precision (also weighted, and per class where ``num_classes`` is given) of one
    policy on the images with ground truth, and its weights."""

    policy: str
    source: str  # where the maps came from
    num_classes: int | None = None
    counts: LabelCounts = field(default_factory=LabelCounts)
    images: int = 0
    weights: list[np.ndarray] = field(default_factory=list)

    def add(
        self, label: np.ndarray, keep: np.ndarray, weight: np.ndarray, truth: np.ndarray
    ) -> None:
        """label: int[H, W]; keep: bool[H, W]; weight: float[H, W]; truth: int[H, W] (255 unknown)."""
        self.counts += LabelCounts.of(
            label, keep, truth, num_classes=self.num_classes, weight=weight
        )
        self.images += 1
        if sum(w.size for w in self.weights) < MAX_WEIGHTS:
            self.weights.append(weight[keep].astype(np.float32))

    @property
    def coverage(self) -> float:
        return self.counts.coverage

    @property
    def precision(self) -> float:
        return self.counts.precision

    @property
    def weighted_precision(self) -> float | None:
        return self.counts.weighted_precision

    def weight_values(self) -> np.ndarray:
        return np.concatenate(self.weights) if self.weights else np.zeros(0, np.float32)


class ConfidenceSweep:
    """Counts of labelled pixels per teacher-confidence bin, all and correctly labelled."""

    def __init__(self, bins: int = 200):
        self.bins = bins
        self.total = np.zeros(bins, np.int64)
        self.correct = np.zeros(bins, np.int64)

    def add(self, conf: np.ndarray, label: np.ndarray, truth: np.ndarray) -> None:
        known = truth != IGNORE_INDEX
        index = np.minimum((conf[known] * self.bins).astype(np.int64), self.bins - 1)
        self.total += np.bincount(index, minlength=self.bins)
        self.correct += np.bincount(index[label[known] == truth[known]], minlength=self.bins)

    def curve(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(coverage, precision) when keeping pixels with conf >= each bin's lower edge."""
        labelled = self.total.sum()
        if labelled == 0:
            return None
        kept = np.cumsum(self.total[::-1])[::-1]
        right = np.cumsum(self.correct[::-1])[::-1]
        nonzero = kept > 0
        return kept[nonzero] / labelled, right[nonzero] / kept[nonzero]


def _truth_sample(images: DatasetRef, limit: int) -> dict[str, np.ndarray]:
    """Ground-truth masks of the first ``limit`` unlabeled images by id that have one."""
    table = images.read_table(["image_id", "split"])
    unlabeled = table.filter(pc.equal(table["split"], "unlabeled"))["image_id"].to_pylist()
    rows = images.read_rows(["image_id", "mask"], set(sorted(unlabeled)[:limit]))
    return {
        r["image_id"]: codec.decode_png(r["mask"])
        for r in rows.to_pylist()
        if r["mask"] is not None
    }


def stored_labels(
    storage: Storage, records: RunRecords, policy: str
) -> tuple[DatasetRef, str] | None:
    """The committed pseudo-labels of ``policy`` made from this run's teacher signals with this
    run's settings (the entry the run would reuse for that policy), if any."""
    if "teach" not in records.stages:
        return None
    cfg = records.config.model_copy(update={"pseudolabel": _with_policy(records.config, policy)})
    ctx = Context(cfg, storage, records.run_id, [])
    for use in records.stages.values():  # the run's outputs, as its stages read them
        ctx.outputs.update({n: {**o, "key": use.key} for n, o in use.record["outputs"].items()})
    stage = next(s for s in all_stages(cfg) if s.name == "pseudolabel")
    try:
        found = look_up(stage, ctx)
    except KeyError:  # an input this policy needs (WPL: detections) the run did not make
        return None
    if found.record is None:
        return None
    labels = found.record["outputs"]["pseudolabels"]
    return output_dataset(storage, "pseudolabels", labels), found.key


def _with_policy(config: PipelineConfig, policy: str) -> PseudolabelConfig:
    return config.pseudolabel.model_copy(update={"policy": policy})


def decode_labels(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stored ``pseudolabels`` row -> label int64[H, W], keep bool[H, W] and the training
    weight float32[H, W] (``weight_offset`` added where kept, 0 elsewhere)."""
    maps = decode_pseudolabels(row, ("label", "keep", "weight"))
    return maps["label"].astype(np.int64), maps["keep"], maps["weight"]


def _stored_maps(
    labels: DatasetRef, ids: set[str]
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(image id, label, keep, weight) from stored pseudo-label rows."""
    for row in labels.read_rows(LABEL_COLUMNS, ids).to_pylist():
        yield (row["image_id"], *decode_labels(row))


def policy_quality(
    storage: Storage, records: RunRecords, limit: int = MAX_IMAGES
) -> tuple[list[PolicyQuality], ConfidenceSweep, dict[str, str]]:
    """Each policy's coverage and precision on the run's unlabeled images with ground truth (the
    first ``limit`` by id), the confidence sweep, and why a policy is missing (policy -> reason)."""
    images, signals = records.output("ingest", "images"), records.output("teach", "teacher_signals")
    sweep, missing = ConfidenceSweep(), {}
    if images is None or signals is None:
        return [], sweep, dict.fromkeys(SIGNAL_POLICIES, "the run stopped before teach")
    truth = _truth_sample(output_dataset(storage, "images", images), limit)
    if not truth:
        reason = "no unlabeled image has ground truth"
        return [], sweep, dict.fromkeys(SIGNAL_POLICIES, reason)
    results: dict[str, PolicyQuality] = {}
    computed: list[PseudolabelConfig] = []
    classes = records.config.data.num_classes
    own, used = records.config.pseudolabel.policy, records.stages.get("pseudolabel")
    labels = records.output("pseudolabel", "pseudolabels")
    if own not in SIGNAL_POLICIES and used is not None and labels is not None:
        # ground_truth: no teacher signals to apply it to; the run's own stored rows
        results[own] = quality = PolicyQuality(own, f"stored (entry {used.key[:12]})", classes)
        for image_id, label, keep, weight in _stored_maps(
            output_dataset(storage, "pseudolabels", labels), set(truth)
        ):
            quality.add(label, keep, weight, truth[image_id])
    for policy in SIGNAL_POLICIES:
        found = stored_labels(storage, records, policy)
        if found is not None:
            ref, key = found
            results[policy] = quality = PolicyQuality(policy, f"stored (entry {key[:12]})", classes)
            for image_id, label, keep, weight in _stored_maps(ref, set(truth)):
                quality.add(label, keep, weight, truth[image_id])
        elif policy == "wpl":
            missing[policy] = (
                "needs the detector's boxes and prototypes: run with pseudolabel.policy=wpl"
                if "detect" in records.stages
                else "needs the detect stage (detector.enabled: true)"
            )
        else:
            results[policy] = PolicyQuality(
                policy, "applied here to the stored teacher signals", classes
            )
            computed.append(_with_policy(records.config, policy))
    rows = output_dataset(storage, "teacher_signals", signals).read_rows(SIGNAL_COLUMNS, set(truth))
    for row in rows.to_pylist():
        signals = decode_signals(row)
        target = truth[row["image_id"]]
        sweep.add(signals["conf"].numpy(), signals["label"].numpy(), target)
        for cfg in computed:
            if why := missing_signals(cfg, row):
                missing[cfg.policy] = why
                continue
            maps = policy_maps(cfg, signals)
            keep = maps["keep"].numpy()
            weight = maps["weight"].float().numpy() * keep
            results[cfg.policy].add(maps["label"].numpy(), keep, weight, target)
    results = {p: q for p, q in results.items() if p not in missing}
    return [results[p] for p in POLICIES if p in results], sweep, missing
