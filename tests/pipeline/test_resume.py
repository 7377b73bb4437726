"""A training worker that dies mid-run (os._exit, as a killed node leaves it) is restarted by
Ray Train (FailureConfig), resumes from the last checkpoint with its step, optimizer, random state
and data position, and ends with exactly the weights of a run that never failed: the teacher's
loop and the detector's alike."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.runner import run_pipeline
from stages.core.models import resumable_path
from stages.core.storage import Storage
from stages.core.training import FAULT_ENV
from tests.conftest import local_ray, stage_outputs

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _state(root: Path, name: str) -> dict[str, torch.Tensor]:
    """The whole state the training ended with (the model's resumable copy)."""
    path = resumable_path(Storage(str(root)).resolve(stage_outputs(root)[name]["path"]))
    return torch.load(io.BytesIO(Path(path).read_bytes()), weights_only=True)


def _config(tmp_path: Path):
    return load_config(
        "smoke",
        [
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "teacher.steps=8",
            "teacher.checkpoint_every=3",  # checkpoints at 3 and 6; the fault at 5 resumes at 3
            "detector.steps=6",
            "detector.checkpoint_every=2",
        ],
    )


def test_killed_training_workers_resume_to_the_weights_of_a_clean_run(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with local_ray():
        run_pipeline(config, str(tmp_path / "clean"), until="train_detector")
    marker = tmp_path / "fault"
    with local_ray({FAULT_ENV: f"5:{marker}"}):
        run_pipeline(config, str(tmp_path / "faulty"), until="train_detector")
    # Each loop died once, at step 5.
    assert (tmp_path / "fault.segmenter").read_text() == "killed at step 5\n"
    assert (tmp_path / "fault.detector").read_text() == "killed at step 5\n"
    for name in ("teacher", "detector"):
        clean, faulty = _state(tmp_path / "clean", name), _state(tmp_path / "faulty", name)
        assert clean["step"] == faulty["step"] == (8 if name == "teacher" else 6)
        a, b = clean["state_dict"], faulty["state_dict"]
        assert a.keys() == b.keys()
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert unequal == [], f"{name}: {unequal[:5]}"
