"""Sources a run cannot use: an empty split stops it before any work (a training loop over an empty
shard never yielded a batch, and looped forever), a split emptied by quarantine stops it after
ingest, and more quarantined items than ``data.max_bad_fraction`` fail it with the quarantine
table's path."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.graph import check_splits, needed_splits
from pipeline.runner import run_pipeline
from stages.core import training
from stages.core.errors import ModelError, SourceError
from stages.core.run_config import LoopConfig
from stages.core.training import EmptyShardError
from stages.train_detector.loop import train_loop as detector_train_loop
from tests.conftest import local_ray, write_png


class _Shard:
    """A Ray Data shard stand-in that yields ``rows`` batches per pass."""

    def __init__(self, rows: int) -> None:
        self.rows, self.passes = rows, 0

    def iter_torch_batches(self, **kwargs: Any) -> Any:
        self.passes += 1
        return iter([{"image": np.zeros(1)}] * self.rows)


@pytest.mark.timeout(20)
def test_batches_over_an_empty_shard_raise_instead_of_looping_forever() -> None:
    batches = training.endless_batches(_Shard(0), batch_size=4, seed=0, name="unlabeled")
    with pytest.raises(EmptyShardError, match="this worker's unlabeled shard holds no rows"):
        next(batches)
    full = _Shard(2)
    taken = [next(b) for b in [training.endless_batches(full, 4, 0, cache_bytes=0)] * 5]
    assert len(taken) == 5
    assert full.passes == 3  # endless over a non-empty shard: 2 batches a pass


@pytest.mark.timeout(30)
def test_detector_loop_over_an_empty_shard_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.train
    import ray.train.torch

    monkeypatch.setattr(
        ray.train, "get_context", lambda: types.SimpleNamespace(get_world_rank=lambda: 0)
    )
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: _Shard(0))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: "cpu")
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)
    config = load_config("smoke")
    loop = LoopConfig(train=config.detector, num_classes=4, seed=0, image_size=64)
    with pytest.raises(EmptyShardError, match="labeled shard holds no rows"):
        detector_train_loop({"loop": loop})


def test_needed_splits_follow_what_the_run_trains() -> None:
    assert needed_splits(load_config("smoke")) == {
        "unlabeled": "teach",
        "val": "evaluate",
        "labeled": "training the teacher and student and detector",
    }
    given = load_config(
        "smoke",
        ["teacher.weights=/w/t.pt", "student.weights=/w/s.pt", "detector.enabled=false"],
    )
    assert needed_splits(given) == {"unlabeled": "teach", "val": "evaluate"}
    check_splits(given, {"labeled": 0, "unlabeled": 3, "val": 1}, "here")  # nothing to train


def _folder(root: Path, val: int, corrupt: dict[str, int], duplicate: bool = False) -> Path:
    """images/ + masks/ + split lists: 6 labeled, 8 unlabeled, ``val`` val images; ``corrupt``
    names, per split, how many more (listed) files are not images at all; ``duplicate`` adds a
    copy of a labeled picture to the unlabeled list."""
    lists: dict[str, list[str]] = {"labeled": [], "unlabeled": [], "val": []}
    rng = np.random.default_rng(0)
    for split, count in (("labeled", 6), ("unlabeled", 8), ("val", val)):
        for i in range(count):
            stem = f"{split}{i}"
            write_png(root / "images" / f"{stem}.png", rng.integers(0, 255, (16, 16, 3), np.uint8))
            if split != "unlabeled":
                write_png(root / "masks" / f"{stem}.png", np.zeros((16, 16), np.uint8))
            lists[split].append(stem)
    for split, count in corrupt.items():
        for i in range(count):
            stem = f"bad_{split}{i}"
            (root / "images" / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
            if split != "unlabeled":
                write_png(root / "masks" / f"{stem}.png", np.zeros((16, 16), np.uint8))
            lists[split].append(stem)
    if duplicate:  # the same pixels as labeled0, listed as unlabeled
        (root / "images" / "unlabeled_dup.png").write_bytes(
            (root / "images" / "labeled0.png").read_bytes()
        )
        lists["unlabeled"].append("unlabeled_dup")
    (root / "splits").mkdir()
    for split, stems in lists.items():
        (root / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    return root


def _config(folder: Path, tmp_path: Path, *extra: str):
    return load_config(
        "smoke",
        [
            "data.source=folder",
            f"data.root={folder}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            *extra,
        ],
    )


def test_empty_val_split_stops_the_run_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path / "data", val=0, corrupt={})

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("no stage may start")

    monkeypatch.setattr("pipeline.runner.init_ray", no_ray)
    with pytest.raises(SourceError) as caught:
        run_pipeline(_config(folder, tmp_path), str(tmp_path / "runs"))
    assert str(caught.value) == (
        "data source folder: the val split is empty (labeled 6, unlabeled 8, val 0); needed for "
        "evaluate. Check the folder's splits/<split>.txt lists, or its masks/ and "
        "data.val_fraction"
    )
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.ray
def test_quarantine_limits_fail_the_run_after_ingest(tmp_path: Path) -> None:
    # 3 unreadable items and a duplicate picture, 4 of 19 (21.1 %): more than the default 5 %.
    too_bad = _folder(tmp_path / "bad", val=1, corrupt={"unlabeled": 3}, duplicate=True)
    # Every val item bad, allowed by the fraction: val is empty after ingest.
    no_val = _folder(tmp_path / "noval", val=0, corrupt={"val": 2})
    with local_ray():
        with pytest.raises(SourceError) as caught:
            run_pipeline(_config(too_bad, tmp_path), str(tmp_path / "runs"))
        message = str(caught.value)
        assert message.startswith(
            "4 of 19 items (21.1%) were quarantined, more than data.max_bad_fraction=0.05; the "
            "reasons are in the quarantine table at "
        )
        table = Path(message.rsplit(" ", 1)[1])
        reasons = pq.read_table(table).to_pylist()
        dup = [r for r in reasons if r["stem"] == "unlabeled_dup"]
        assert [r["reason"] for r in dup] == ["same picture as labeled0"]
        reasons = [r for r in reasons if r["stem"] != "unlabeled_dup"]
        assert sorted(r["stem"] for r in reasons) == [
            "bad_unlabeled0",
            "bad_unlabeled1",
            "bad_unlabeled2",
        ]
        assert all("is not a readable PNG/JPEG image" in r["reason"] for r in reasons)
        with pytest.raises(SourceError) as caught:
            run_pipeline(
                _config(no_val, tmp_path, "data.max_bad_fraction=0.5"), str(tmp_path / "runs2")
            )
    assert str(caught.value).startswith(
        "after ingest (quarantined items removed): the val split is empty (labeled 6, "
        "unlabeled 8, val 0); needed for evaluate."
    )


def test_unknown_arch_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("smoke", ["student.arch=deeplabv3_resnet5"])
    assert caught.value.problems == [
        "student.arch: unknown segmentation arch 'deeplabv3_resnet5'; choose one of "
        "deeplabv3_mobilenet_v3_large, deeplabv3_resnet101, deeplabv3_resnet50, fcn_resnet101, "
        "fcn_resnet50, lraspp_mobilenet_v3_large (got 'deeplabv3_resnet5')"
    ]


def test_missing_weights_file_stops_the_run_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path / "data", val=1, corrupt={})
    missing = tmp_path / "teacher-typo.pt"

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("no stage may start")

    monkeypatch.setattr("pipeline.runner.init_ray", no_ray)
    expected = {
        "teacher.weights": "give a checkpoint file (local path or URL), or leave it unset to train",
        "student.init": "give a state dict file (local path or URL), or leave it unset to train "
        "from random weights",
    }
    for key, advice in expected.items():
        config = _config(folder, tmp_path, f"{key}={missing}")
        with pytest.raises(ModelError) as caught:
            run_pipeline(config, str(tmp_path / "runs"))
        assert str(caught.value) == f"{key}='{missing}' does not exist: {advice}"
        assert not (tmp_path / "runs").exists()
