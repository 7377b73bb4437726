"""Pure parts of the stages, without Ray: boxes, IoU, threshold maps, signal encoding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from stages.core import codec
from stages.core.metrics import LabelCounts, confusion, iou_from_confusion
from stages.pseudolabel.batches import label_batch
from stages.pseudolabel.config import PseudolabelConfig
from stages.pseudolabel.maps import policy_maps
from stages.pseudolabel.table import PSEUDOLABELS_SCHEMA
from stages.teach.table import SignalSpec, decode_signals, quantized_maps, stored_maps
from stages.train_detector.boxes import boxes_from_mask


def test_boxes_from_mask_components_per_class() -> None:
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 1:4] = 1  # rows 1-2, cols 1-3 -> (1, 1, 4, 3)
    mask[4, 6] = 1  # single pixel, below min_area 2 -> dropped
    mask[3:6, 5:7] = 2  # rows 3-5, cols 5-6 -> (5, 3, 7, 6)
    mask[0, 7] = 255
    boxes, labels = boxes_from_mask(mask, num_classes=3, min_area=2)
    assert labels.tolist() == [1, 2]
    assert boxes.tolist() == [[1, 1, 4, 3], [5, 3, 7, 6]]


def test_boxes_from_mask_diagonal_touch_is_one_component() -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = mask[1, 1] = 1  # 8-connected
    boxes, labels = boxes_from_mask(mask, num_classes=2, min_area=1)
    assert boxes.tolist() == [[0, 0, 2, 2]]
    assert labels.tolist() == [1]


def test_confusion_and_iou_hand_computed() -> None:
    target = np.array([0, 0, 1, 1, 2, 255])
    pred = np.array([0, 1, 1, 1, 0, 2])
    matrix = confusion(pred, target, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    iou, miou = iou_from_confusion(matrix)
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 0 fn 1 -> 0
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 0.0])
    assert abs(miou - 1 / 3) < 1e-12


def test_iou_absent_class_is_nan_and_skipped() -> None:
    matrix = np.array([[3, 0], [0, 0]])
    iou, miou = iou_from_confusion(matrix)
    assert iou[0] == 1.0
    assert np.isnan(iou[1])
    assert miou == 1.0


def test_label_counts_per_class_and_weighted_by_hand() -> None:
    """Two images of pseudo-labels against ground truth (255: unknown), 3 classes."""
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
    label = np.array([[0, 1, 1, 0], [2, 0, 1, 0]])
    keep = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], bool)
    weight = np.array([[1.0, 0.5, 0.25, 9.0], [0.75, 0.5, 9.0, 9.0]])
    first = LabelCounts.of(label[0], keep[0], truth[0], num_classes=3, weight=weight[0])
    second = LabelCounts.of(label[1], keep[1], truth[1], num_classes=3, weight=weight[1])
    total = LabelCounts() + first + second
    # kept and known: (0,0) right, (0,1) 0->1 wrong, (1,0) right, (2,2) right, (2,0) wrong
    assert (total.valid, total.kept, total.correct) == (7, 5, 3)
    assert total.truth is not None
    assert total.matrix is not None
    assert total.truth.tolist() == [3, 2, 2]
    assert total.matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert (total.coverage, total.precision) == (5 / 7, 3 / 5)
    # weights of the kept known pixels: 1, .5, .25, .75, .5; of the right ones 1, .25, .75
    assert total.weighted_precision == 2.0 / 3.0
    np.testing.assert_allclose(total.class_recall(), [1 / 3, 1 / 2, 1 / 2])
    np.testing.assert_allclose(total.class_precision(), [1 / 2, 1 / 2, 1.0])
    plain = LabelCounts.of(label[0], keep[0], truth[0])  # without classes or weights
    assert (plain.weighted_precision, plain.class_recall(), plain.class_precision()) == (None,) * 3
    absent = LabelCounts.of(np.zeros(2, int), np.ones(2, bool), np.zeros(2, int), num_classes=2)
    assert np.isnan(absent.class_recall()[1])
    assert np.isnan(absent.class_precision()[1])


def test_label_counts_refuse_classes_out_of_range() -> None:
    truth, keep = np.array([0, 3]), np.array([True, True])
    with pytest.raises(
        ValueError, match=r"ground truth holds class 3, outside the 3 classes 0\.\.2"
    ):
        LabelCounts.of(np.array([0, 0]), keep, truth, num_classes=3)
    with pytest.raises(ValueError, match="kept pseudo-label holds class 7"):
        LabelCounts.of(np.array([0, 7]), keep, np.array([0, 1]), num_classes=3)


def _row(probs: torch.Tensor) -> dict[str, object]:
    """``float[C, H, W]`` -> a ``teacher_signals`` row's map cells (every statistic)."""
    spec = SignalSpec(margins=True, dispersion=True)
    maps = quantized_maps(probs[None], spec)[:, 0].numpy()
    row: dict[str, object] = {"height": probs.shape[1], "width": probs.shape[2]}
    return row | {name: m.tobytes() for name, m in zip(stored_maps(spec), maps, strict=True)}


def test_signals_round_trip_within_quantisation_bound() -> None:
    probs = torch.tensor([[[0.96, 0.2]], [[0.03, 0.5]], [[0.01, 0.3]]])  # C=3, H=1, W=2
    signals = decode_signals(_row(probs))
    assert signals["label"].tolist() == [[0, 1]]
    np.testing.assert_allclose(signals["conf"], [[0.96, 0.5]], atol=1 / 510)
    np.testing.assert_allclose(signals["margin"], [[0.93, 0.2]], atol=1 / 510)


def test_threshold_keep_at_tau_from_stored_signals() -> None:
    # stored values are within 1/510 of the truth: decisions hold outside that band around τ;
    # 0.9515 -> 243/255 = 0.95294 is kept, 0.9485 -> 242/255 = 0.94902 is not
    probs = torch.tensor([[[0.9515, 0.9485, 0.99]], [[0.0485, 0.0515, 0.01]]])
    maps = policy_maps(PseudolabelConfig(), decode_signals(_row(probs)))
    assert maps["label"].tolist() == [[0, 0, 0]]
    assert maps["keep"].tolist() == [[True, False, True]]
    assert maps["weight"].tolist() == [[1.0, 1.0, 1.0]]
    # inside the band the stored value decides: 0.9505 is stored as 0.94902 and dropped
    inside = torch.tensor([[[0.9505]], [[0.0495]]])
    assert policy_maps(PseudolabelConfig(), decode_signals(_row(inside)))["keep"].tolist() == [
        [False]
    ]
    assert policy_maps(PseudolabelConfig(), inside)["keep"].tolist() == [[True]]


def test_label_batch_rows() -> None:
    probs = torch.tensor([[[0.97, 0.6]], [[0.03, 0.4]]])
    table = pa.Table.from_pylist([{"image_id": "x", "num_classes": 2, **_row(probs)}])
    out = label_batch(table, {"policy": "threshold", "tau": 0.95})
    assert out.schema == PSEUDOLABELS_SCHEMA
    assert out.num_rows == 1
    row = out.to_pylist()[0]
    assert codec.unpack_mask(row["keep"], 1, 2).tolist() == [[True, False]]
    assert codec.decode_png(row["label"]).tolist() == [[0, 0]]
    assert np.frombuffer(row["weight"], np.uint8).tolist() == [255, 0]
    assert abs(row["coverage"] - 0.5) < 1e-7
