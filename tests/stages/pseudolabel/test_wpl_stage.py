"""WPL in the pseudolabel stage (Ray Data): what it reports of the detections it was given, and
its warning when no unlabeled pixel is reliable, so that a detector that finds nothing usable
(the generated benchmark's 60-step ones score at most 0.15 to 0.25) does not pass for WPL."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from stages.core import codec
from stages.core.inference import decode_for_inference
from stages.core.models import build_segmenter
from stages.core.storage import DatasetRef, Storage
from stages.detect.table import DETECTIONS_SCHEMA
from stages.pseudolabel import stage
from stages.pseudolabel.config import PseudolabelConfig
from stages.pseudolabel.maps import signal_spec
from stages.pseudolabel.prototypes import detection_figures
from stages.teach.predictor import TeacherPredictor
from stages.teach.table import decode_signals
from tests.conftest import local_ray

UNLABELED = [f"{i:024x}" for i in range(2, 5)]


def _detections(scores: list[list[float]], labels: list[list[int]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "image_id": image_id,
                "boxes": [0.0, 0.0, 16.0, 16.0] * len(s),  # every box covers the whole image
                "labels": labels_,
                "scores": s,
                "num_boxes": len(s),
            }
            for image_id, s, labels_ in zip(UNLABELED, scores, labels, strict=True)
        ],
        schema=DETECTIONS_SCHEMA,
    )


def test_detection_figures_count_what_the_box_masks_draw() -> None:
    cfg = PseudolabelConfig(policy="wpl")  # score_thresh 0.95, classes 1 and 2 mapped of 3
    table = _detections(
        [[0.99, 0.95, 0.949], [0.99], []],  # 0.95 itself is used (float32, as rasterised)
        [[1, 2, 1], [7], []],  # detector class 7 is in no class map
    )
    assert detection_figures(table, cfg, num_classes=3) == {
        "confident_boxes_per_image": pytest.approx(2 / 3),
        "best_detection_score": pytest.approx(0.99),
    }
    empty = _detections([[], [], []], [[], [], []])
    assert detection_figures(empty, cfg, 3) == {
        "confident_boxes_per_image": 0.0,
        "best_detection_score": 0.0,
    }


def _signals(storage: Storage, cfg: PseudolabelConfig) -> DatasetRef:
    """Teacher signals (WPL's) of 2 labeled and 3 unlabeled 16-px images, random LRASPP."""
    torch.manual_seed(3)
    model = build_segmenter(arch="lraspp_mobilenet_v3_large", num_classes=3)
    predictor = TeacherPredictor.of_model(model, torch.device("cpu"), signal_spec(cfg))
    rng = np.random.default_rng(5)
    splits = ["labeled", "labeled", "unlabeled", "unlabeled", "unlabeled"]
    batch = {
        "image_id": np.array([f"{i:024x}" for i in range(5)]),
        "height": np.full(5, 16),
        "width": np.full(5, 16),
        "image": np.array(
            [codec.encode_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in splits],
            dtype=object,
        ),
        "mask": np.array(
            [codec.encode_png(rng.integers(0, 3, (16, 16), dtype=np.uint8)) for _ in splits],
            dtype=object,
        ),
        "split": np.array(splits),
    }
    ref = DatasetRef(storage, storage.path("teacher_signals"), "teacher_signals")
    ref.write_table(predictor(decode_for_inference(batch, 32)))
    ref.commit()
    return ref


def _write(storage: Storage, name: str, table: pa.Table) -> DatasetRef:
    ref = DatasetRef(storage, storage.path(name), "detections")
    ref.write_table(table)
    ref.commit()
    return ref


@pytest.mark.ray
def test_wpl_reports_its_usable_detections_and_warns_when_nothing_is_reliable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage(str(tmp_path))
    # conf_thresh 0: R is the teacher's label in a box, whatever its confidence; detector
    # class 1 is segmentation class 0, 2 is 1 (7: none)
    class_map = {1: 0, 2: 1}
    cfg = PseudolabelConfig(policy="wpl", wpl={"conf_thresh": 0.0, "class_map": class_map})
    signals = _signals(storage, cfg)
    rows = {r["image_id"]: r for r in signals.read_table().to_pylist()}
    weak = _write(storage, "weak", _detections([[0.25, 0.1], [0.3], [0.05]], [[1, 2], [2], [1]]))
    scores, labels = [[0.99, 0.95], [0.97, 0.99], [0.96]], [[1, 2], [2, 7], [1]]
    sure = _write(storage, "sure", _detections(scores, labels))
    # the reliable images: a confident whole-image box of a class the teacher gives some pixel
    expected = sum(
        any(class_map.get(c) in set(decode_signals(rows[i])["label"].unique().tolist()) for c in c_)
        for i, c_ in zip(UNLABELED, labels, strict=True)
    )
    assert expected == 2  # this teacher labels every pixel 0: images 2 and 4
    with local_ray(), caplog.at_level(logging.WARNING, logger="stages.pseudolabel.stage"):
        outs = [DatasetRef(storage, storage.path(f"out-{n}"), "pseudolabels") for n in "ab"]
        found = stage.run(cfg, signals=signals, out=outs[0], detections=weak)
        warned = [r.getMessage() for r in caplog.records]
        caplog.clear()
        used = stage.run(cfg, signals=signals, out=outs[1], detections=sure)
    assert found["images"] == 3.0
    assert found["confident_boxes_per_image"] == 0.0
    assert found["best_detection_score"] == pytest.approx(0.3)
    assert found["reliable_images"] == 0.0
    assert len(warned) == 1
    assert "no unlabeled pixel is reliable (R = 0 on all 3 images)" in warned[0]
    assert "best score 0.300" in warned[0]
    assert "detector.steps" in warned[0]
    # class 7 maps to no segmentation class: 4 of 5 detections are usable
    assert used["confident_boxes_per_image"] == pytest.approx(4 / 3)
    assert used["best_detection_score"] == pytest.approx(0.99)
    assert used["reliable_images"] == float(expected)
    assert not caplog.records
