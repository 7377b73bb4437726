"""The whole pipeline on local Ray (CPU), through the CLI, as a user runs it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from stages.core import codec
from stages.core.cache import output_dataset
from stages.core.models import (
    load_checkpoint,
    model_from_checkpoint,
    segment_logits,
)
from stages.core.storage import DatasetRef, Storage
from tests.conftest import STAGE_NAMES, run_cli, stage_outputs

pytestmark = pytest.mark.ray

STAGES = set(STAGE_NAMES)


def _run(env: dict[str, str], root: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    args = ["run", "--config", "smoke", "--root", str(root)]
    for item in overrides:
        args += ["--set", item]
    result = run_cli(*args, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _table(root: Path, name: str) -> DatasetRef:
    return output_dataset(Storage(str(root)), name, stage_outputs(root)[name])


def _ids_by_split(root: Path) -> dict[str, set[str]]:
    table = _table(root, "images").read_table(["image_id", "split"]).to_pylist()
    return {
        s: {r["image_id"] for r in table if r["split"] == s}
        for s in ("labeled", "unlabeled", "val")
    }


def _expected_ids(folder: Path, stems: list[str]) -> set[str]:
    ids = set()
    for stem in stems:
        image = codec.decode_png((folder / "images" / f"{stem}.png").read_bytes())
        ids.add(codec.pixel_digest(image)[:24])
    return ids


def _runs(root: Path) -> tuple[object, list]:
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "pseudoflow"]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    return parents[0], [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    ]


def test_smoke_generated_end_to_end(tmp_path: Path, ray_env: dict[str, str]) -> None:
    """WPL end to end: detector, prototypes from teacher features, and a student on two Ray
    Train workers whose prototype memory is refreshed (all-reduced) every 2 steps. The
    thresholds are 0 so that a 4-step teacher and a 2-step detector still give reliable pixels."""
    root = tmp_path / "root"
    result = _run(
        ray_env,
        root,
        "pseudolabel.policy=wpl",
        "pseudolabel.tau=0.01",
        "pseudolabel.wpl.score_thresh=0.0",
        "pseudolabel.wpl.conf_thresh=0.0",
        "pseudolabel.wpl.refresh_every=2",
        "student.workers=2",
    )
    assert "student mIoU (val)" in result.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout

    (source,) = (root / "sources").iterdir()
    splits = {
        s: (source / "splits" / f"{s}.txt").read_text().split()
        for s in ("labeled", "unlabeled", "val")
    }
    assert {s: len(v) for s, v in splits.items()} == {"labeled": 8, "unlabeled": 12, "val": 6}
    ids = _ids_by_split(root)
    for split, stems in splits.items():
        assert ids[split] == _expected_ids(source, stems)
    unlabeled = ids["unlabeled"]
    for name in ("detections", "pseudolabels"):
        ref = _table(root, name)
        rows = ref.read_table(["image_id"])["image_id"].to_pylist()
        assert len(rows) == len(unlabeled) == ref.num_rows, name
        assert set(rows) == unlabeled, name
    signals = _table(root, "teacher_signals").read_table(["image_id", "split", "topk"])
    assert signals.num_rows == 20  # labeled (for WPL's prototypes) and unlabeled
    assert set(signals["topk"].to_pylist()) == {4}  # K = C by default: exact
    by_split = {
        (r["split"], r["image_id"]) for r in signals.select(["split", "image_id"]).to_pylist()
    }
    assert by_split == {("labeled", i) for i in ids["labeled"]} | {
        ("unlabeled", i) for i in unlabeled
    }
    labels = _table(root, "pseudolabels").read_table(["policy", "reliable", "margin"]).to_pylist()
    assert {r["policy"] for r in labels} == {"wpl"}
    assert all(r["reliable"] is not None and r["margin"] is None for r in labels)
    assert _table(root, "quarantine").num_rows == 0

    parent, children = _runs(root)
    assert {r.data.tags["pseudoflow.stage"] for r in children} == STAGES
    assert len(children) == len(STAGES)
    assert all(r.data.metrics and r.info.status == "FINISHED" for r in children)
    for key in ("teacher_miou", "student_miou", "pseudolabel_coverage", "pseudolabel_precision"):
        assert 0.0 <= parent.data.metrics[key] <= 1.0, key
    assert parent.data.metrics["quarantined_images"] == 0
    assert parent.data.params["pseudolabel.policy"] == "wpl"
    stage_runs = {r.data.tags["pseudoflow.stage"]: r for r in children}
    assert stage_runs["pseudolabel"].data.metrics["teacher_prototypes"] >= 1
    assert stage_runs["train_student"].data.metrics["wpl_prototypes"] >= 1

    storage = Storage(str(root))
    student = root / stage_outputs(root)["student"]["path"]
    checkpoint = load_checkpoint(student.read_bytes(), source=str(student))
    model = model_from_checkpoint(checkpoint)
    assert "teacher:" in checkpoint["config"]
    # both ranks' queues are saved; the prototypes they last refreshed are identical
    first, second = checkpoint["memory"]
    assert torch.equal(first["prototypes"].isnan(), second["prototypes"].isnan())
    torch.testing.assert_close(first["prototypes"].nan_to_num(), second["prototypes"].nan_to_num())
    assert first["labeled_count"].sum() + second["labeled_count"].sum() > 0
    assert storage.is_local
    logits = segment_logits(model, torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 4, 32, 32)
