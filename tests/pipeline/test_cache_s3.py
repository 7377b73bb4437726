"""The pipeline with its storage root on a real S3-protocol server (moto on 127.0.0.1, through
s3fs): every stage's entry is committed there, a rerun reuses all of it, and ``cache verify``
finds a deleted shard. Credentials come from the environment and never reach MLflow or a log."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import fsspec
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cache.entries import iter_entries
from pipeline.cache.verify import verify_entry
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from stages.core.models import build_segmenter
from stages.core.storage import Storage
from stages.ingest.generated import GeneratedSpec, generate_dataset
from tests.conftest import local_ray, run_cli

pytestmark = pytest.mark.ray

STAGES = ("ingest", "train_teacher", "teach", "pseudolabel", "train_student", "evaluate")


def test_pipeline_on_s3_commits_reuses_and_verifies(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "data"
    generate_dataset(
        GeneratedSpec(
            seed=7, num_labeled=6, num_unlabeled=8, num_val=4, image_size=32, num_classes=4
        ),
        local,
    )
    source = f"{s3}/source-{secrets.token_hex(3)}"
    fs, _ = fsspec.core.url_to_fs(source)
    fs.put(f"{local}/", source.removeprefix("s3://") + "/", recursive=True)
    weights = tmp_path / "teacher.pt"
    torch.save(
        build_segmenter(arch="lraspp_mobilenet_v3_large", num_classes=4).state_dict(), weights
    )
    root = f"{s3}/runs-{secrets.token_hex(3)}"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = load_config(
        "smoke",
        [
            "data.source=folder",
            f"data.root={source}",
            "detector.enabled=false",
            f"teacher.weights={weights}",
            "student.steps=2",
            "pseudolabel.policy=csl",
            f"tracking.uri={uri}",
        ],
    )
    with local_ray():
        cold = run_pipeline(config, root)
    assert {s: hit for s, (_, hit) in cold.cache.items()} == dict.fromkeys(STAGES, False)
    storage = Storage(root)
    entries = {e.stage: e for e in iter_entries(storage)}
    assert set(entries) == set(STAGES)
    assert entries["teach"].record["outputs"]["teacher_signals"]["rows"] == 14
    assert entries["pseudolabel"].record["outputs"]["pseudolabels"]["rows"] == 8
    assert not storage.is_local
    # MLflow artifacts (the evaluate plot) went to the same bucket.
    assert storage.fs.find(f"{storage.root}/mlartifacts", withdirs=False)

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached rerun must not start any stage")

    monkeypatch.setattr("pipeline.runner.init_ray", no_ray)
    again = run_pipeline(config, root)
    assert all(hit for _, hit in again.cache.values())
    assert again.metrics["evaluate.student_miou"] == cold.metrics["evaluate.student_miou"]

    for entry in iter_entries(storage):
        assert verify_entry(storage, entry) == []
    shard = storage.resolve(entries["teach"].record["outputs"]["teacher_signals"]["directory"])
    manifest = storage.read_json(f"{shard}/_manifest.json")
    storage.fs.rm(storage.resolve(manifest["files"][0]["path"]))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    result = run_cli("cache", "verify", "--root", root, env=env)
    assert result.returncode == 1
    assert "DAMAGED teach" in result.stdout

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in result.stdout + result.stderr
    client = MlflowClient(tracking_uri=uri)
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(secret in v for v in values)
