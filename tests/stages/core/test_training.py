"""Test hooks and scheduling hints of :mod:`stages.core.training` (no Ray needed)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

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
