"""Test hooks and scheduling hints of :mod:`stages.core.training` (no Ray needed)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.graph import semantic
from stages.core import training
from stages.core.training import HOLD_ENV, hold_point, worker_resources


def test_worker_resources_keep_the_default_cpu_or_gpu() -> None:
    assert worker_resources(False, None) is None
    assert worker_resources(False, {}) is None
    assert worker_resources(False, {"fast": 1}) == {"CPU": 1.0, "fast": 1}
    assert worker_resources(True, {"fast": 0.5}) == {"GPU": 1.0, "fast": 0.5}


def test_resources_are_execution_only() -> None:
    plain = load_config("smoke")
    pinned = load_config("smoke", ["student.resources={gpu_node: 1}", "teach.resources={a: 1}"])
    assert pinned.student.resources == {"gpu_node": 1.0}
    assert semantic(plain.student) == semantic(pinned.student)


def test_inference_settings_are_all_execution_only() -> None:
    """Every InferenceConfig knob is execution only (a new one must be declared, or it would
    silently enter the teach, detect and evaluate keys); teach's policies count through the
    signals they make it store."""
    from stages.core.run_config import InferenceConfig

    assert set(InferenceConfig.model_fields) == InferenceConfig.EXECUTION
    plain = load_config("smoke")
    assert {"batch_size", "policies"}.isdisjoint(semantic(plain.teach))
    assert "precision" in semantic(plain.teach)
    assert set(semantic(plain.student)).isdisjoint({"workers", "weights", "init", "log_every"})


def test_hold_point_holds_once_at_its_step_and_writes_its_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HOLD_ENV, f"teach:2:{tmp_path}/hold")
    monkeypatch.setattr(training, "HOLD_SECONDS", 0.5)
    monkeypatch.setattr(training, "_held_calls", {})
    marker = tmp_path / "hold.teach"
    hold_point("detect")  # another kind: nothing
    hold_point("teach")  # its first call: nothing
    assert not marker.exists()
    seen: list[bool] = []
    watcher = threading.Thread(target=lambda: (time.sleep(0.3), seen.append(marker.exists())))
    watcher.start()
    started = time.monotonic()
    hold_point("teach")  # the second: holds (here until HOLD_SECONDS), marker first
    watcher.join()
    assert time.monotonic() - started >= 0.5
    assert seen == [True]
    assert marker.read_text() == f"{os.getpid()}\n"
    started = time.monotonic()
    hold_point("teach", 2)  # the marker exists: a restarted process goes on
    assert time.monotonic() - started < 0.2


def test_hold_point_unset_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HOLD_ENV, raising=False)
    hold_point("student", 5)


class _Rows:
    """A Ray Data shard stand-in: ``count`` rows (``id`` int64, ``pixels`` uint8[2]: 10 bytes a
    row) in batches, in order (the shuffle of a pass is Ray's), recording each pass's seed."""

    def __init__(self, count: int) -> None:
        self.count, self.seeds = count, list[int]()

    def iter_torch_batches(self, *, batch_size: int, local_shuffle_seed: int, **_: object):  # type: ignore[no-untyped-def]
        self.seeds.append(local_shuffle_seed)
        ids = torch.arange(self.count)
        for start in range(0, self.count, batch_size):
            part = ids[start : start + batch_size]
            yield {"id": part, "pixels": part[:, None].repeat(1, 2).to(torch.uint8)}


def _passes(batches: Iterator[dict[str, torch.Tensor]], sizes: list[int]) -> list[list[int]]:
    return [[i for _ in range(size) for i in next(batches)["id"].tolist()] for size in sizes]


def test_a_small_shard_is_read_once_and_reshuffled_in_memory_every_pass() -> None:
    shard = _Rows(10)  # batches of 4: 3 batches a pass (4, 4, 2)
    batches = training.endless_batches(shard, batch_size=4, seed=5)
    first = next(batches)
    first["id"].fill_(-1)  # a step writing into its batch changes no later pass
    rest = _passes(batches, [2, 3, 3, 3])
    assert shard.seeds == [5]  # one Ray Data pass, its shuffle seeded by the seed
    assert rest[0] == [4, 5, 6, 7, 8, 9]
    later = rest[1:]
    for order in later:
        assert sorted(order) == list(range(10))  # every row once a pass
    assert later[0] != later[1] != later[2]  # each pass its own order
    # pass e is the kept rows in torch.randperm(10) order seeded by seed + e
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5 + 1)).tolist()
    assert later[0] == expected
    again = training.endless_batches(_Rows(10), batch_size=4, seed=5)
    assert _passes(again, [3, 3, 3, 3])[1:] == later  # a resumed run finds the same batches
    other = training.endless_batches(_Rows(10), batch_size=4, seed=6)
    assert _passes(other, [3, 3])[1] != later[0]


def test_a_shard_over_the_budget_streams_every_pass() -> None:
    shard = _Rows(10)  # 100 bytes in all: over a budget of 80 with the third batch
    batches = training.endless_batches(shard, batch_size=4, seed=5, cache_bytes=80)
    passes = _passes(batches, [3, 3, 3])
    assert passes == [list(range(10))] * 3  # this stand-in's passes, as it streams them
    assert shard.seeds == [5, 6, 7]  # a Ray Data pass each, seeded seed + pass
    kept = training.endless_batches(_Rows(10), batch_size=4, seed=5, cache_bytes=100)
    assert _passes(kept, [3, 3])[1] != list(range(10))  # 100 bytes fit: the second is shuffled


def test_rows_that_are_not_arrays_are_never_kept() -> None:
    class _Objects(_Rows):
        def iter_torch_batches(self, **kwargs: object):  # type: ignore[no-untyped-def]
            for batch in super().iter_torch_batches(**kwargs):  # type: ignore[arg-type]
                yield {**batch, "name": np.asarray([str(i) for i in batch["id"]], dtype=object)}

    shard = _Objects(6)
    batches = training.endless_batches(shard, batch_size=4, seed=0)
    assert _passes(batches, [2, 2, 2]) == [list(range(6))] * 3
    assert shard.seeds == [0, 1, 2]
