"""The trained model out: each trained segmenter is an MLflow model (pt2, no pickle) logged with
every run that uses it, loadable without pseudoflow in a fresh process; ``pseudoflow predict``
on the logged student reproduces the evaluate stage's val mIoU; the model file a user loads
holds no training state (that is in its resumable copy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import load_config
from pipeline.models import MODEL_TAG, STUDENT_TAG, load_model, predict_images
from pipeline.runner import RunSummary, run_pipeline
from pipeline.tracking import local_uri
from stages.core import data
from stages.core.metrics import confusion, iou_from_confusion
from stages.core.models import load_checkpoint, model_from_checkpoint, resumable_path
from tests.conftest import local_ray, run_cli, stage_outputs

# A whole pipeline run and MLflow exports: the slow step keeps the default suite in its budget.
pytestmark = [pytest.mark.ray, pytest.mark.slow]
SMOKE = ["detector.enabled=false", "tracking.log_models=true"]


@dataclass
class Trained:
    root: Path
    summary: RunSummary
    source: Path  # the generated image folder

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "MLFLOW_TRACKING_URI": local_uri(str(self.root))}

    def val(self) -> list[str]:
        return (self.source / "splits" / "val.txt").read_text().split()

    def student_file(self) -> Path:
        outputs = stage_outputs(self.root, self.root / "pipelines" / self.summary.run_id)
        return self.root / outputs["student"]["path"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("predict") / "runs"
    with local_ray():
        summary = run_pipeline(load_config("smoke", SMOKE), str(root))
    (source,) = (root / "sources").iterdir()
    return Trained(root, summary, source)


def _student_run(trained: Trained) -> str:
    client = MlflowClient(tracking_uri=local_uri(str(trained.root)))
    uri = client.get_run(trained.summary.mlflow_run_id).data.tags[STUDENT_TAG]
    return uri.removeprefix("runs:/").split("/")[0]


def test_predict_on_the_logged_student_reproduces_evaluate(
    trained: Trained, tmp_path: Path
) -> None:
    stems = trained.val()
    images = trained.source / "images"
    unreadable = tmp_path / "notes.png"
    unreadable.write_text("not a picture")
    out = tmp_path / "out"
    result = run_cli(
        "predict",
        *[str(images / f"{stem}.png") for stem in stems],
        str(unreadable),
        "--model",
        trained.summary.mlflow_run_id,  # the pipeline run: its final student
        "--root",
        str(trained.root),
        "--out",
        str(out),
        env=trained.env,
    )
    assert result.returncode == 1, result.stderr  # one file skipped
    assert f"skipped {unreadable}: {unreadable} is not a readable PNG/JPEG image" in result.stderr
    assert f"wrote {len(stems)} label maps to {out}; 1 skipped" in result.stdout
    assert "4 classes, trained at 32 px" in result.stdout
    total = np.zeros((4, 4), np.int64)
    for stem in stems:
        labels = np.asarray(Image.open(out / f"{stem}.png"))
        truth = np.asarray(Image.open(trained.source / "masks" / f"{stem}.png"))
        assert labels.shape == truth.shape
        assert (out / f"{stem}_overlay.png").is_file()
        total += confusion(labels, truth, 4)
    _, miou = iou_from_confusion(total)
    assert miou == pytest.approx(trained.summary.metrics["evaluate.student_miou"], abs=1e-9)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        name for stem in stems for name in (f"{stem}.png", f"{stem}_overlay.png")
    )


def test_the_mlflow_model_loads_in_a_fresh_process_without_pickle(trained: Trained) -> None:
    run = _student_run(trained)
    client = MlflowClient(tracking_uri=local_uri(str(trained.root)))
    assert client.get_run(run).data.tags[MODEL_TAG] == f"runs:/{run}/model"
    files = {a.path for a in client.list_artifacts(run, "model/data")}
    assert files == {"model/data/model.pt2"}  # a torch.export archive, no pickled model.pth
    stem = trained.val()[0]
    picture = np.asarray(Image.open(trained.source / "images" / f"{stem}.png").convert("RGB"))
    batch = torch.from_numpy(picture).permute(2, 0, 1)[None].contiguous()
    student = trained.student_file()
    expected = model_from_checkpoint(load_checkpoint(student.read_bytes(), source="student"))
    with torch.inference_mode():
        reference = expected(data.normalize(batch))["out"]
    np.save(trained.root.parent / "batch.npy", batch.numpy())
    script = (
        "import sys, json, numpy, torch, mlflow.pytorch\n"
        f"model = mlflow.pytorch.load_model('runs:/{run}/model')\n"
        f"batch = torch.from_numpy(numpy.load({str(trained.root.parent / 'batch.npy')!r}))\n"
        "with torch.inference_mode():\n"
        "    logits = model(batch)\n"
        f"numpy.save({str(trained.root.parent / 'logits.npy')!r}, logits.numpy())\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pipeline', 'stages', 'torchvision'))))\n"
    )
    env = {**trained.env, "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=trained.root.parent,  # not the checkout: pseudoflow is not importable by path
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert [m for m in imported if m.split(".")[0] in ("pipeline", "stages")] == []
    logits = torch.from_numpy(np.load(trained.root.parent / "logits.npy"))
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_the_model_a_user_loads_holds_no_training_state(trained: Trained) -> None:
    student = trained.student_file()
    model = load_checkpoint(student.read_bytes(), source="student")
    assert sorted(model) == [
        "config",
        "format",
        "image_size",
        "kind",
        "model_args",
        "state_dict",
        "window",
    ]
    assert (model["image_size"], model["window"]) == (32, 32)  # smoke: crops are the canvas
    state = load_checkpoint(Path(resumable_path(str(student))).read_bytes(), source="state")
    assert {"optimizer", "step", "rng"} <= set(state)
    assert state["step"] == 4
    assert student.stat().st_size < Path(resumable_path(str(student))).stat().st_size / 1.5
    # The file predicts as the logged MLflow model does: evaluate's mIoU.
    model = load_model(str(student), tracking_uri=None, device=torch.device("cpu"))
    stems = trained.val()
    files = [trained.source / "images" / f"{stem}.png" for stem in stems]
    total = np.zeros((4, 4), np.int64)
    for stem, found in zip(
        stems, predict_images(model, files, batch_size=4, device=torch.device("cpu")), strict=True
    ):
        assert not isinstance(found, tuple)
        truth = np.asarray(Image.open(trained.source / "masks" / f"{stem}.png"))
        total += confusion(found.labels, truth, 4)
    assert iou_from_confusion(total)[1] == pytest.approx(
        trained.summary.metrics["evaluate.student_miou"], abs=1e-9
    )


def test_a_cached_rerun_logs_the_same_model_again(trained: Trained) -> None:
    again = run_pipeline(load_config("smoke", SMOKE), str(trained.root))
    assert all(hit for _, hit in again.cache.values())
    client = MlflowClient(tracking_uri=local_uri(str(trained.root)))
    uri = client.get_run(again.mlflow_run_id).data.tags[STUDENT_TAG]
    run = uri.removeprefix("runs:/").split("/")[0]
    assert run != _student_run(trained)
    assert {a.path for a in client.list_artifacts(run, "model/data")} == {"model/data/model.pt2"}


def test_predict_errors_name_the_problem(trained: Trained, tmp_path: Path) -> None:
    image = trained.source / "images" / f"{trained.val()[0]}.png"
    base = ["--root", str(trained.root), "--out", str(tmp_path / "o")]
    unknown = run_cli("predict", str(image), "--model", "0123abcd", *base, env=trained.env)
    assert unknown.returncode == 2
    assert "error: cannot load model '0123abcd'" in unknown.stderr
    missing = run_cli("predict", str(tmp_path / "x.png"), "--model", "m.pt", *base)
    assert missing.returncode == 2
    assert f"error: {tmp_path / 'x.png'}: no such image file or folder" in missing.stderr
    detector = trained.root / "nothing.pt"
    torch.save({"format": "x"}, detector)
    wrong = run_cli("predict", str(image), "--model", str(detector), *base)
    assert wrong.returncode == 2
    assert "not a pseudoflow checkpoint" in wrong.stderr
