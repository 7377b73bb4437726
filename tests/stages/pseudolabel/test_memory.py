"""Tests of the WPL prototype memory: FIFO queues, prototypes, pixel selection, checkpoints, and the
cross-rank all-reduce on two Ray Train CPU workers."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from stages.core.constants import IGNORE_INDEX
from stages.pseudolabel.memory import (
    QUEUES,
    PrototypeMemory,
    gather_states,
    restore_state,
    select_labeled,
    select_reliable,
)
from tests.conftest import local_ray

NAN = math.nan


def _vectors(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _labels(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _assert_prototypes(actual: torch.Tensor, expected: list[list[float]]) -> None:
    assert actual.dtype == torch.float32
    assert_close(actual, torch.tensor(expected), equal_nan=True)


# ------------------------------------------------------------------------------------ FIFO / mean
def test_fifo_keeps_the_last_size_vectors() -> None:
    memory = PrototypeMemory(num_classes=3, dim=2, size=2)
    assert memory.prototypes is None
    # Class 1 gets (0, 10), (2, 4), (4, 8) in that order: with size 2 only the last two remain,
    # so μ_1 = ((2, 4) + (4, 8)) / 2 = (3, 6). Keeping all three would give (2, 7.33); keeping the
    # first two (1, 7). Class 0 never seen, class 2 only unlabeled: both NaN.
    memory.push("labeled", _vectors((0.0, 10.0), (2.0, 4.0), (4.0, 8.0)), _labels(1, 1, 1))
    memory.push("unlabeled", _vectors((7.0, 7.0)), _labels(2))
    prototypes = memory.refresh()
    _assert_prototypes(prototypes, [[NAN, NAN], [3.0, 6.0], [NAN, NAN]])
    assert memory.prototypes is prototypes


def test_fifo_across_pushes_and_interleaved_classes() -> None:
    memory = PrototypeMemory(num_classes=2, dim=1, size=3)
    # Interleaved classes in one push: class 0 gets 1, 2; class 1 gets 10, 20, 30, 40 (keeps 20, 30, 40).
    memory.push(
        "labeled",
        _vectors((1.0,), (10.0,), (2.0,), (20.0,), (30.0,), (40.0,)),
        _labels(0, 1, 0, 1, 1, 1),
    )
    _assert_prototypes(memory.refresh(), [[1.5], [30.0]])
    # A second push wraps class 0 around: 1, 2, 3, 4 -> keeps 2, 3, 4 (mean 3); class 1 keeps 30, 40, 50.
    memory.push("labeled", _vectors((3.0,), (50.0,), (4.0,)), _labels(0, 1, 0))
    _assert_prototypes(memory.refresh(), [[3.0], [40.0]])


def test_prototype_is_the_mean_over_both_queues() -> None:
    memory = PrototypeMemory(num_classes=2, dim=2, size=4)
    # Class 0: labeled (1, 0), (3, 0); unlabeled (2, 6). Mean of all three vectors = (2, 2);
    # the mean of the two queue means would be (2, 3), the labeled mean alone (2, 0).
    memory.push("labeled", _vectors((1.0, 0.0), (3.0, 0.0)), _labels(0, 0))
    memory.push("unlabeled", _vectors((2.0, 6.0)), _labels(0))
    _assert_prototypes(memory.refresh(), [[2.0, 2.0], [NAN, NAN]])


def test_queues_are_separate_fifos() -> None:
    memory = PrototypeMemory(num_classes=1, dim=1, size=2)
    # Each queue keeps its own last 2: labeled {2, 3}, unlabeled {10, 20} -> (2+3+10+20)/4 = 8.75.
    memory.push("labeled", _vectors((1.0,), (2.0,), (3.0,)), _labels(0, 0, 0))
    memory.push("unlabeled", _vectors((10.0,), (20.0,)), _labels(0, 0))
    _assert_prototypes(memory.refresh(), [[8.75]])


def test_prototypes_stay_until_the_next_refresh() -> None:
    memory = PrototypeMemory(num_classes=1, dim=1, size=4)
    memory.push("labeled", _vectors((2.0,)), _labels(0))
    memory.refresh()
    memory.push("labeled", _vectors((4.0,)), _labels(0))
    assert memory.prototypes is not None
    _assert_prototypes(memory.prototypes, [[2.0]])
    _assert_prototypes(memory.refresh(), [[3.0]])


def test_push_detaches_and_accepts_empty_input() -> None:
    memory = PrototypeMemory(num_classes=2, dim=2, size=2)
    features = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    memory.push("labeled", features, _labels(1))
    memory.push("labeled", torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    prototypes = memory.refresh()
    assert not prototypes.requires_grad
    _assert_prototypes(prototypes, [[NAN, NAN], [1.0, 2.0]])


def test_push_rejects_bad_input() -> None:
    memory = PrototypeMemory(num_classes=2, dim=2)
    with pytest.raises(
        ValueError, match="unknown queue 'teacher'; choose one of labeled, unlabeled"
    ):
        memory.push("teacher", torch.zeros(1, 2), _labels(0))
    with pytest.raises(ValueError, match=r"features must be \[N, 2\]"):
        memory.push("labeled", torch.zeros(1, 3), _labels(0))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        memory.push("labeled", torch.zeros(2, 2), _labels(0, 2))
    assert QUEUES == ("labeled", "unlabeled")


# -------------------------------------------------------------------------------------- selection
def _one_row(*pixels: tuple[float, ...]) -> torch.Tensor:
    """One image of one row: each argument is one pixel's channel vector -> [1, K, 1, W]."""
    return torch.tensor(pixels, dtype=torch.float32).T[None, :, None, :]


def test_select_labeled_strict_threshold_correct_and_not_ignored() -> None:
    # pixel 0: pred 0 conf 0.99, target 0           -> selected
    # pixel 1: pred 1 conf 0.95, target 1           -> NOT selected (0.95 is not > 0.95)
    # pixel 2: pred 1 conf 0.96, target 0           -> wrong prediction
    # pixel 3: pred 0 conf 0.99, target 255         -> ignored
    # pixel 4: pred 1 conf 0.97, target 1           -> selected
    probs = _one_row((0.99, 0.01), (0.05, 0.95), (0.04, 0.96), (0.99, 0.01), (0.03, 0.97))
    features = _one_row(
        (0.0, 1.0, 2.0),
        (10.0, 11.0, 12.0),
        (20.0, 21.0, 22.0),
        (30.0, 31.0, 32.0),
        (40.0, 41.0, 42.0),
    )
    target = torch.tensor([[[0, 1, 0, IGNORE_INDEX, 1]]])
    vectors, labels = select_labeled(features, probs, target, conf_thresh=0.95)
    assert_close(vectors, _vectors((0.0, 1.0, 2.0), (40.0, 41.0, 42.0)))
    assert labels.tolist() == [0, 1]
    assert labels.dtype == torch.long


def test_select_labeled_raster_order_over_batch() -> None:
    # B=2, H=2, W=1, D=1; feature value = 100*b + 10*h; every pixel correct and confident.
    features = torch.tensor([[[[0.0], [10.0]]], [[[100.0], [110.0]]]])
    probs = torch.zeros(2, 2, 2, 1)
    probs[:, 1] = 1.0
    target = torch.ones(2, 2, 1, dtype=torch.long)
    vectors, labels = select_labeled(features, probs, target)
    assert vectors[:, 0].tolist() == [0.0, 10.0, 100.0, 110.0]
    assert labels.tolist() == [1, 1, 1, 1]


def test_select_labeled_rejects_mismatched_resolution() -> None:
    with pytest.raises(ValueError, match="resize the features first"):
        select_labeled(
            torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
        )


def test_select_reliable_raster_order() -> None:
    # B=1, D=2, H=2, W=2; pixel (h, w) has features (10h + w, -(10h + w)).
    grid = torch.tensor([[0.0, 1.0], [10.0, 11.0]])
    features = torch.stack([grid, -grid])[None]
    labels = torch.tensor([[[3, 1], [2, 0]]])
    reliable = torch.tensor([[[False, True], [True, False]]])
    vectors, classes = select_reliable(features, labels, reliable)
    assert_close(vectors, _vectors((1.0, -1.0), (10.0, -10.0)))
    assert classes.tolist() == [1, 2]


# ------------------------------------------------------------------------------------- checkpoint
def _filled_memory() -> PrototypeMemory:
    memory = PrototypeMemory(num_classes=3, dim=2, size=2)
    memory.push("labeled", _vectors((0.0, 10.0), (2.0, 4.0), (4.0, 8.0)), _labels(1, 1, 1))
    memory.push("unlabeled", _vectors((6.0, 0.0)), _labels(1))
    return memory


def test_state_dict_round_trip_through_torch_save_weights_only() -> None:
    memory = _filled_memory()
    before = memory.refresh()  # class 1: ((2, 4) + (4, 8) + (6, 0)) / 3 = (4, 4)
    _assert_prototypes(before, [[NAN, NAN], [4.0, 4.0], [NAN, NAN]])
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = PrototypeMemory(num_classes=3, dim=2, size=2)
    restored.load_state_dict(state)
    assert restored.prototypes is not None
    _assert_prototypes(restored.prototypes, [[NAN, NAN], [4.0, 4.0], [NAN, NAN]])
    # The queues came back, FIFO position included: one more class-1 vector evicts (2, 4), so
    # μ_1 = ((4, 8) + (8, 2) + (6, 0)) / 3 = (6, 10/3).
    restored.push("labeled", _vectors((8.0, 2.0)), _labels(1))
    _assert_prototypes(restored.refresh(), [[NAN, NAN], [6.0, 10.0 / 3.0], [NAN, NAN]])


def test_state_dict_before_refresh_has_no_prototypes() -> None:
    state = PrototypeMemory(num_classes=2, dim=2).state_dict()
    assert "prototypes" not in state
    restored = PrototypeMemory(num_classes=2, dim=2)
    restored.load_state_dict(state)
    assert restored.prototypes is None


def test_load_state_dict_rejects_other_configuration() -> None:
    state = PrototypeMemory(num_classes=3, dim=2, size=2).state_dict()
    with pytest.raises(ValueError, match=r"'dim': 2.*'dim': 4"):
        PrototypeMemory(num_classes=3, dim=4, size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"'size': 2.*'size': 256"):
        PrototypeMemory(num_classes=3, dim=2).load_state_dict(state)
    del state["labeled_features"]
    with pytest.raises(ValueError, match="lacks keys"):
        PrototypeMemory(num_classes=3, dim=2, size=2).load_state_dict(state)


def test_gather_and_restore_without_process_group() -> None:
    memory = _filled_memory()
    memory.refresh()
    states = gather_states(memory)
    assert len(states) == 1
    restored = PrototypeMemory(num_classes=3, dim=2, size=2)
    restore_state(restored, states, rank=0)
    assert restored.prototypes is not None
    _assert_prototypes(restored.prototypes, [[NAN, NAN], [4.0, 4.0], [NAN, NAN]])
    _assert_prototypes(restored.refresh(), [[NAN, NAN], [4.0, 4.0], [NAN, NAN]])


def test_restore_state_after_world_size_change_warns(caplog: pytest.LogCaptureFixture) -> None:
    # Two saved ranks with different queues and the same prototypes; this process is one rank
    # (world size 1), restoring as rank 3 -> states[3 % 2] = states[1].
    first = PrototypeMemory(num_classes=1, dim=1)
    first.push("labeled", _vectors((1.0,)), _labels(0))
    second = PrototypeMemory(num_classes=1, dim=1)
    second.push("labeled", _vectors((5.0,)), _labels(0))
    shared = torch.tensor([[3.0]])
    states = [first.state_dict(), second.state_dict()]
    for state in states:
        state["prototypes"] = shared
    memory = PrototypeMemory(num_classes=1, dim=1)
    with caplog.at_level(logging.WARNING, logger="stages.pseudolabel.memory"):
        restore_state(memory, states, rank=3)
    assert "saved by 2 ranks, restored on 1" in caplog.text
    assert memory.prototypes is not None
    _assert_prototypes(memory.prototypes, [[3.0]])
    _assert_prototypes(memory.refresh(), [[5.0]])  # rank 1's queue only


# ------------------------------------------------------------------------------ two Ray workers
# Per rank: (queue, class, vector, repeats). Class 1 has three 1.0 vectors on rank 0 and one 3.0
# vector on rank 1 -> global mean (3·1 + 3) / 4 = 1.5 (the mean of the rank means would be 2.0).
# Class 2 only on rank 1: labeled (2, 4) and unlabeled (4, 8) -> (3, 6). Class 3 only unlabeled
# (rank 0) -> NaN. Class 0 never pushed -> NaN.
_RANK_PUSHES: dict[int, list[tuple[str, int, tuple[float, float], int]]] = {
    0: [("labeled", 1, (1.0, 1.0), 3), ("unlabeled", 3, (5.0, 5.0), 1)],
    1: [
        ("labeled", 1, (3.0, 3.0), 1),
        ("labeled", 2, (2.0, 4.0), 1),
        ("unlabeled", 2, (4.0, 8.0), 1),
    ],
}
_GLOBAL_PROTOTYPES = [[NAN, NAN], [1.5, 1.5], [3.0, 6.0], [NAN, NAN]]
_MEMORY_FILE = "memory.pt"


def _memory_worker(config: dict[str, Any]) -> None:
    """Ray Train loop: push (first run) or restore (second run), refresh, record, report."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    memory = PrototypeMemory(num_classes=4, dim=2, size=8)
    record: dict[str, Any] = {}
    if config["phase"] == "first":
        for queue, cls, vector, repeats in _RANK_PUSHES[rank]:
            memory.push(queue, torch.tensor([vector] * repeats), torch.full((repeats,), cls))
    else:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            raise RuntimeError("second run found no checkpoint to resume from")
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / _MEMORY_FILE, weights_only=True)
        restore_state(memory, saved["memory"], rank)
        assert memory.prototypes is not None
        record["restored"] = memory.prototypes.tolist()
    record["refreshed"] = memory.refresh().tolist()
    states = gather_states(memory)  # collective: every rank calls it
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0 and config["phase"] == "first":
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"memory": states}, Path(tmp) / _MEMORY_FILE)
            ray.train.report(
                {"ranks": len(states)}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
            )
    else:
        ray.train.report({"ranks": len(states)}, checkpoint=None)


def _fit(phase: str, out: Path, storage: Path) -> Any:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out.mkdir()
    trainer = TorchTrainer(
        _memory_worker,
        train_loop_config={"phase": phase, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="memory", storage_path=str(storage)),
    )
    return trainer.fit()


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.ray
def test_two_ray_workers_share_prototypes_and_resume_queues(tmp_path: Path) -> None:
    import ray.cloudpickle

    # The worker loop lives in this test module, which the workers cannot import by name.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with local_ray():
            first = _fit("first", tmp_path / "first", tmp_path / "ray")
            assert first.checkpoint is not None
            assert first.metrics["ranks"] == 2
            second = _fit("second", tmp_path / "second", tmp_path / "ray")
            assert second.error is None
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    for record in _records(tmp_path / "first"):
        _assert_prototypes(torch.tensor(record["refreshed"]), _GLOBAL_PROTOTYPES)
    for record in _records(tmp_path / "second"):
        # Restored prototypes, then a refresh from the restored queues alone (nothing pushed).
        _assert_prototypes(torch.tensor(record["restored"]), _GLOBAL_PROTOTYPES)
        _assert_prototypes(torch.tensor(record["refreshed"]), _GLOBAL_PROTOTYPES)
