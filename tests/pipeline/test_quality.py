"""``pseudoflow bench quality``: the summary's numbers by hand, and the quick mode end to end
(every row trained, the JSON keys, the run in a real SQLite MLflow store)."""

from __future__ import annotations

import json
import math
from math import nan
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import quality
from pipeline.quality import LabelQuality, SeedResult, Split, World
from stages import segtrain
from stages.core import codec, data
from stages.pseudolabel.ops import weighted_unsup_loss
from stages.pseudolabel.stage import PseudolabelConfig
from tests.conftest import run_cli

ROW_NAMES = [
    "supervised",
    "full",
    "oracle",
    "threshold",
    "threshold+r2",
    "s4mc",
    "s4mc+r2",
    "csl",
    "csl+r2",
    "wpl",
    "wpl+r2",
]


def _results() -> list[SeedResult]:
    return [
        SeedResult("supervised", 0, 0.2),
        SeedResult("supervised", 1, 0.4),
        SeedResult("full", 0, 0.6),
        SeedResult("full", 1, 0.8),
        SeedResult("csl+r2", 0, 0.5, LabelQuality(1.0, 0.7, [0.5, 0.2, 0.0], [0.9, 0.6, nan])),
        SeedResult("csl+r2", 1, 0.6, LabelQuality(0.8, 0.9, [0.7, 0.4, 0.0], [0.7, nan, nan])),
    ]


def test_summary_by_hand() -> None:
    rows = {row["name"]: row for row in quality.summarize(_results())}
    assert list(rows) == ["supervised", "full", "csl+r2"]
    assert rows["supervised"]["miou_mean"] == pytest.approx(0.3)
    assert rows["supervised"]["miou_std"] == pytest.approx(math.sqrt(0.02))  # ddof = 1
    assert rows["supervised"]["gap_closing"] == pytest.approx(0.0)
    assert rows["full"]["gap_closing"] == pytest.approx(1.0)
    assert rows["csl+r2"]["gap_closing"] == pytest.approx((0.55 - 0.3) / (0.7 - 0.3))
    assert rows["csl+r2"]["coverage"] == pytest.approx(0.9)
    assert rows["csl+r2"]["precision"] == pytest.approx(0.8)
    assert rows["csl+r2"]["seeds"] == [0, 1]
    assert rows["csl+r2"]["recall_per_class"] == pytest.approx([0.6, 0.3, 0.0])
    assert rows["csl+r2"]["precision_per_class"] == [pytest.approx(0.8), 0.6, None]
    assert "coverage" not in rows["full"]
    assert "nan" not in json.dumps(list(rows.values())).lower()
    metrics = quality.row_metrics(list(rows.values()))
    assert metrics["csl_r2.gap_closing"] == pytest.approx(0.625)
    table = quality.format_table(list(rows.values()))
    assert "csl+r2         0.5500 ± 0.0707   0.625     0.900     0.800" in table
    per_class = quality.format_table(list(rows.values()), ("background", "disc"))
    assert "row             background        disc     class 2" in per_class
    assert "csl+r2           0.60/0.80   0.30/0.60      0.00/-" in per_class


def test_label_quality_per_class_by_hand() -> None:
    """Two 2x2 images, classes 0..2: image a keeps 3 pixels (2 right), image b keeps 3, of
    which its ignore pixel does not count (2 right)."""
    truths = [np.array([[0, 0], [1, 2]], np.uint8), np.array([[1, 1], [255, 0]], np.uint8)]
    labels = [np.array([[0, 1], [1, 0]], np.uint8), np.array([[1, 0], [0, 0]], np.uint8)]
    keeps = [np.array([[1, 1], [1, 0]], bool), np.array([[1, 0], [1, 1]], bool)]
    ids = ["a", "b"]
    empty = torch.zeros(0)
    unlabeled = Split(ids, empty, empty, [b""] * 2, [codec.encode_png(t) for t in truths])
    world = World(unlabeled, unlabeled, unlabeled, num_classes=3, image_size=2)
    rows = pa.table(
        {
            "image_id": ids,
            "height": [2, 2],
            "width": [2, 2],
            "label": [codec.encode_png(label) for label in labels],
            "keep": [codec.pack_mask(keep) for keep in keeps],
        }
    )
    got = quality.label_quality(rows, world)
    assert got.coverage == pytest.approx(5 / 7)  # valid: a 4, b 3; kept and valid: a 3, b 2
    assert got.precision == pytest.approx(4 / 5)
    # true pixels: 0 and 1 three each, 2 one; kept right: 0 at a(0,0) b(1,1), 1 at a(1,0) b(0,0);
    # kept as 0: those two; kept as 1: those two and a(0,1), whose truth is 0; none kept as 2
    assert got.recall == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert got.precision_of == pytest.approx([2 / 2, 2 / 3, math.nan], nan_ok=True)


def test_gap_closing_is_undefined_without_a_gap() -> None:
    flat = [SeedResult("supervised", 0, 0.5), SeedResult("full", 0, 0.5)]
    assert [row["gap_closing"] for row in quality.summarize(flat)] == [None, None]
    assert "nan" not in json.dumps(quality.summarize(flat)).lower()


def test_oracle_loss_is_the_plain_cross_entropy_of_the_ground_truth() -> None:
    """The oracle row's student learns every unlabeled pixel with its true class at weight 1:
    its L_u under the threshold policy's live weight is the mean cross-entropy (ln 2 where the
    logits tie between two classes, ln(1 + e^-2) where the true class leads by 2)."""
    masks = torch.tensor([[[0, 1], [1, 0]]], dtype=torch.uint8)
    split = Split(["a"], torch.zeros(1, 3, 2, 2, dtype=torch.uint8), masks, [b""], [b""])
    maps = quality.oracle_arrays(split)
    assert torch.equal(maps["label"], masks)
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 1] = 2.0  # pixel (0, 1) is class 1 and leads by 2; the rest tie
    valid = maps["label"] != data.IGNORE_INDEX
    weight = segtrain._live_weight(PseudolabelConfig(), maps, valid, None, None, (0, 1))
    loss = weighted_unsup_loss(logits, maps["label"].long(), weight, valid)
    tied, leading = math.log(2), math.log(1 + math.exp(-2))
    assert loss.item() == pytest.approx((3 * tied + leading) / 4)


def test_batches_draw_every_item_once_per_pass() -> None:
    arrays = {"x": torch.arange(10)}
    batches = quality._endless(arrays, 3, seed=0)
    first = torch.cat([next(batches)["x"] for _ in range(3)])
    assert len(set(first.tolist())) == 9  # one pass: 3 full batches, no repeats


def test_quick_benchmark_runs_every_row_and_logs_to_mlflow(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    result = run_cli(
        "bench", "quality", "--quick", "--seeds", "1", "--jobs", "1", "--json", str(out),
        "--root", str(tmp_path / "runs"), timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["name"] for row in rows] == ROW_NAMES
    for row in rows:
        assert {"name", "miou_mean", "miou_std", "seeds", "gap_closing"} <= set(row)
        assert row["seeds"] == [0]
        assert 0.0 <= row["miou_mean"] <= 1.0
    assert "coverage" not in rows[2]  # oracle: no pseudo-labels to score
    for row in rows[3:]:
        assert 0.0 <= row["coverage"] <= 1.0
        assert len(row["recall_per_class"]) == len(row["precision_per_class"]) == 5
    assert "wall time" in result.stdout
    for name in ROW_NAMES:  # the main table, and pseudo-label rows in the per-class one too
        assert result.stdout.count(f"\n{name} ") == (1 if name in quality.REFERENCE_ROWS else 2)
    assert "ring" in result.stdout.split("kept per class")[1]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/runs/mlflow.db")
    experiment = client.get_experiment_by_name("pseudoflow-bench")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["full.miou_mean"] == pytest.approx(rows[1]["miou_mean"])
    assert run.data.params["rounds"] == "2"
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"quality.json", "quality.png", "quality.txt"}
