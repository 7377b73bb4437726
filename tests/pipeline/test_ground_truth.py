"""A run with ``pseudolabel.policy=ground_truth`` (the reference rows of a sweep): the student
learns from the unlabeled split's own masks, and one ground-truth set serves every teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cache.entries import CacheEntry
from pipeline.config import load_config
from pipeline.report import build_report
from pipeline.runner import run_pipeline
from stages.core.storage import Storage
from tests.conftest import local_ray, stage_outputs

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # two pipeline runs: beyond the default budget


def test_ground_truth_labels_are_the_masks_and_are_shared_across_teachers(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    overrides = [
        "pseudolabel.policy=ground_truth",
        "detector.enabled=false",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    with local_ray():
        first = run_pipeline(load_config("smoke", overrides), str(root))
        # another teacher (another teacher key): the same images, so the same ground truth
        second = run_pipeline(load_config("smoke", [*overrides, "teacher.lr=0.004"]), str(root))
    metrics = first.metrics
    assert metrics["evaluate.pseudolabel_coverage"] == 1.0
    assert metrics["evaluate.pseudolabel_precision"] == 1.0
    assert metrics["evaluate.pseudolabel_images_with_truth"] == 12.0
    assert metrics["pseudolabel.images"] == 12.0
    key, hit = first.cache["pseudolabel"]
    assert not hit
    record = CacheEntry(Storage(str(root)), "pseudolabel", key).record()
    assert record is not None
    digests = stage_outputs(root, root / "pipelines" / first.run_id)["images"]["digests"]
    assert record["fields"] == {
        "unlabeled": digests["unlabeled"],
        "policy": "ground_truth",
        "num_classes": 4,
    }
    assert second.cache["train_teacher"][0] != first.cache["train_teacher"][0]
    assert not second.cache["teach"][1]
    assert second.cache["pseudolabel"] == (key, True)
    # the student's key holds the pseudo-labels' key, not the teacher: reused as well
    assert second.cache["train_student"] == (first.cache["train_student"][0], True)
    # the report of such a run shows its own policy's stored labels
    _, quality, _ = build_report(Storage(str(root)), first.run_id, samples=2, limit=4)
    own = {q.policy: q for q in quality}["ground_truth"]
    assert (own.coverage, own.precision, own.images) == (1.0, 1.0, 4)
    assert own.source == f"stored (entry {key[:12]})"
