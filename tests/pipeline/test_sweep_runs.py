"""Sweeps of real pipeline runs, as a user runs them from the command line: ``bench quality
--quick`` on a VOC-layout folder with its own 5 classes, after a first sweep of three policies on
the same root, reruns only what the fourth policy adds (the MLflow cache-hit tags say so)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.sweep.run import ROW_TAG, SWEEP_TAG
from pipeline.tracking import HIT_TAG, STAGE_TAG
from tests.conftest import run_cli
from tests.stages.ingest.layouts import write_palette_png

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAMES = ["background", "crack", "rust", "dent", "scratch"]
LABELED = [f"part_{i:03d}" for i in range(1, 5)]
UNLABELED = [f"part_{i:03d}" for i in range(5, 11)]
VAL = [f"part_{i:03d}" for i in range(101, 104)]
# What a new policy adds to a root: its pseudo-labels, students and scores, and in round 2 the
# teach of its own round-1 student.
POLICY_STAGES = {"pseudolabel", "train_student", "evaluate", "teach_r2"}
POLICY_STAGES |= {"pseudolabel_r2", "train_student_r2"}


def _voc_folder(root: Path) -> Path:
    """A VOC2012-layout folder of 5 classes: 24x32 images, each a coloured box of one class on
    background, its mask with a 255 border; train = labeled.txt + the unlabeled rest."""
    rng = np.random.default_rng(0)
    for index, stem in enumerate(LABELED + UNLABELED + VAL):
        cls = 1 + index % 4
        image = rng.integers(0, 40, (24, 32, 3), dtype=np.uint8)
        mask = np.zeros((24, 32), np.uint8)
        top, left = rng.integers(2, 10), rng.integers(2, 16)
        image[top : top + 10, left : left + 12] = (60 * cls, 200 - 40 * cls, 50)
        mask[top : top + 10, left : left + 12] = cls
        mask[0, :] = 255
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        write_palette_png(root / "SegmentationClass" / f"{stem}.png", mask)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("".join(f"{s}\n" for s in LABELED + UNLABELED))
    (lists / "val.txt").write_text("".join(f"{s}\n" for s in VAL))
    (lists / "labeled.txt").write_text("".join(f"{s}\n" for s in LABELED))
    return root


def _config(tmp_path: Path, source: Path) -> Path:
    path = tmp_path / "parts.yaml"
    path.write_text(
        f"""name: parts
data:
  source: voc
  root: {source}
  num_classes: 5
  class_names: [{", ".join(NAMES)}]
  image_size: 32
  voc: {{labeled: labeled}}
teacher: {{arch: lraspp_mobilenet_v3_large}}
student: {{arch: lraspp_mobilenet_v3_large}}
tracking: {{uri: "sqlite:///{tmp_path}/mlflow.db"}}
"""
    )
    return path


def _stage_runs(client: MlflowClient, pipeline_run: str) -> dict[str, bool]:
    """Stage name -> cache hit, of one pipeline run's nested stage runs."""
    experiment = client.get_run(pipeline_run).info.experiment_id
    runs = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{pipeline_run}'"
    )
    return {r.data.tags[STAGE_TAG]: r.data.tags[HIT_TAG] == "true" for r in runs}


@pytest.mark.timeout(2700)  # 20 pipeline runs, 11 of them training a student
def test_bench_quality_on_a_voc_folder_reruns_only_the_new_policy(
    tmp_path: Path, ray_env: dict[str, str]
) -> None:
    config = _config(tmp_path, _voc_folder(tmp_path / "voc"))
    root = tmp_path / "root"
    first = run_cli(
        "sweep",
        "--config",
        f"{config},quality,quality-quick",
        "--root",
        str(root),
        "--grid",
        "pseudolabel.policy=threshold,s4mc,csl",
        "--seeds",
        "1",
        "--parallel",
        "3",
        env=ray_env,
        timeout=1800,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(
        "bench",
        "quality",
        "--quick",
        "--config",
        str(config),
        "--root",
        str(root),
        "--seeds",
        "1",
        "--parallel",
        "3",
        "--json",
        str(tmp_path / "quality.json"),
        env=ray_env,
        timeout=1800,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    rows = {row["row"]: row for row in json.loads((tmp_path / "quality.json").read_text())}
    grid = [f"policy={p} rounds={r}" for p in ("threshold", "s4mc", "csl", "wpl") for r in (1, 2)]
    assert list(rows) == ["supervised", "full", "oracle", *grid]
    for name, row in rows.items():
        assert row["failed"] == {}, name
        assert row["seeds"] == [0], name
        assert 0.0 <= row["miou_mean"] <= 1.0, name
    # the reference rows learn from the ground truth: every valid pixel kept, all of them right
    assert rows["oracle"]["coverage"] == pytest.approx(1.0)
    assert rows["oracle"]["precision"] == pytest.approx(1.0)
    assert rows["supervised"]["coverage"] is None  # alpha 0: no pseudo-labels learned from
    assert "policy=wpl rounds=2" in second.stdout
    assert "oracle" in second.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("pseudoflow")
    assert experiment is not None
    sweeps = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.run_name LIKE 'sweep-%'",
        order_by=["attributes.start_time ASC"],
    )
    assert len(sweeps) == 2
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{sweeps[1].info.run_id}'",
    )
    assert all(c.data.tags[SWEEP_TAG] == sweeps[1].data.tags[SWEEP_TAG] for c in children)
    # --parallel: one run of the ingest stage alone first (every run shares it), then a run a row
    shared = [c for c in children if ROW_TAG not in c.data.tags]
    assert len(shared) == 1
    assert _stage_runs(client, shared[0].info.run_id) == {"ingest": True}
    children = [c for c in children if ROW_TAG in c.data.tags]
    assert len(children) == 11  # one pipeline run a row, one seed
    for child in children:
        row = child.data.tags[ROW_TAG]
        stages = _stage_runs(client, child.info.run_id)
        ran = {name for name, hit in stages.items() if not hit}
        if row.startswith("policy=wpl"):
            # only what wpl adds: its pseudo-labels and students (and their scores)
            assert ran, row
            assert ran <= POLICY_STAGES, (row, ran)
            assert "teach" not in ran
            assert "train_teacher" not in ran
        else:
            assert ran == set(), (row, ran)
