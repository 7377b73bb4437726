"""Submitting to a real Ray cluster: a head started with ``ray start --head`` on 127.0.0.1 with
token auth, tracking on a real ``mlflow server`` (PostgreSQL backend from initdb/pg_ctl, SQLite
where those are absent) with proxied artifacts. Every CLI call is a fresh process.

The smoke run submitted here is the project's end-to-end check: WPL with a detector trained on
Ray Train, prototypes from teacher features, and a student whose prototype memory is refreshed
every 2 steps (two workers sharing it: tests/stages/pseudolabel/test_memory.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cache.entries import output_dataset
from stages.core import codec
from stages.core.models import (
    load_checkpoint,
    model_from_checkpoint,
    resumable_path,
    segment_logits,
)
from stages.core.storage import DatasetRef, Storage
from tests.conftest import STAGE_NAMES, run_cli, stage_outputs
from tests.servers import RayHead, mlflow_server, postgres, postgres_available, ray_head

pytestmark = pytest.mark.ray

SMOKE_WPL = (
    "pseudolabel.policy=wpl",
    "pseudolabel.tau=0.01",
    "pseudolabel.wpl.score_thresh=0.0",
    "pseudolabel.wpl.conf_thresh=0.0",
    "pseudolabel.wpl.refresh_every=2",
)
# The S3 credentials reach the cluster's nodes under other names than boto's, so a job can only
# use them if its by-reference environment (``${PF_S3_*}``) is expanded on the cluster.
S3_REFS = ("AWS_ACCESS_KEY_ID=PF_S3_KEY_ID", "AWS_SECRET_ACCESS_KEY=PF_S3_SECRET")


@dataclass(frozen=True)
class World:
    head: RayHead
    tracking_uri: str
    artifacts: Path
    secret: str  # the S3 secret the cluster holds (never to be seen in a job or MLflow)


@pytest.fixture(scope="module")
def world(s3: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("cluster")
    artifacts = folder / "mlflow-artifacts"
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    database = postgres() if postgres_available() else nullcontext(f"sqlite:///{folder}/mlflow.db")
    with (
        database as backend,
        mlflow_server(backend, artifacts) as uri,
        ray_head(
            extra_env={"PF_S3_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"], "PF_S3_SECRET": secret},
            drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
        ) as head,
    ):
        yield World(head, uri, artifacts, secret)


def _env(world: World, token: str | None, home: Path) -> dict[str, str]:
    """A client's environment: the cluster token (or none), a HOME without ~/.ray/auth_token,
    and no S3 secret (the submitting machine does not need it)."""
    env = {k: v for k, v in world.head.env.items() if not k.startswith("AWS_")}
    env["HOME"] = str(home)
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return env


def _cli(
    world: World, *args: str, token: str | None = "", home: Path
) -> subprocess.CompletedProcess[str]:
    env = _env(world, world.head.token if token == "" else token, home)
    return run_cli(*args, "--address", world.head.address, env=env, timeout=900)


def _submit(
    world: World, home: Path, *extra: str, token: str | None = ""
) -> subprocess.CompletedProcess[str]:
    args = ("submit", "--tracking-uri", world.tracking_uri, *extra)
    return _cli(world, *args, token=token, home=home)


def _job_id(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.stdout.splitlines()[0]
    return first.split()[-1] if first.startswith("submitted") else first.split(": ")[1].split()[0]


def test_submit_smoke_run_follow_and_find_it_in_mlflow(world: World, tmp_path: Path) -> None:
    root = tmp_path / "root"
    args = ("--config", "smoke", "--root", str(root), *[f"--set={o}" for o in SMOKE_WPL])
    result = _submit(world, tmp_path, *args)
    job_id = _job_id(result)
    assert result.stdout.startswith(f"submitted {job_id}")
    assert job_id.startswith("pseudoflow-smoke-")

    followed = _cli(world, "logs", job_id, "--follow", home=tmp_path)
    assert followed.returncode == 0, followed.stdout[-4000:] + followed.stderr[-2000:]
    assert "student mIoU (val)" in followed.stdout
    assert followed.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    _check_quiet_log(followed.stdout)

    status = _cli(world, "status", job_id, home=tmp_path)
    assert status.stdout.startswith(f"{job_id}: SUCCEEDED")
    assert "pseudoflow-submitted.yaml" in status.stdout
    listing = _cli(world, "status", home=tmp_path)
    assert f"SUCCEEDED  {job_id}" in listing.stdout

    # the same run again: the same id, found, not run twice; --again runs it under <id>-2
    again = _submit(world, tmp_path, *args)
    assert again.stdout.startswith(f"an identical run was already submitted: {job_id} (SUCCEEDED)")
    changed = _job_id(_submit(world, tmp_path, *args, "--set=student.steps=5"))
    assert changed != job_id
    stopped = _cli(world, "stop", changed, home=tmp_path)
    assert stopped.stdout.startswith(f"stopping {changed}"), stopped.stderr
    assert _cli(world, "logs", changed, "--follow", home=tmp_path).returncode == 1
    assert _cli(world, "status", changed, home=tmp_path).stdout.startswith(f"{changed}: STOPPED")

    _check_outputs(root)
    _check_mlflow(world, root)
    _check_no_secrets(world, job_id, followed.stdout)


def _table(root: Path, name: str) -> DatasetRef:
    return output_dataset(Storage(str(root)), name, stage_outputs(root)[name])


def _expected_ids(folder: Path, stems: list[str]) -> set[str]:
    ids = set()
    for stem in stems:
        image = codec.decode_png((folder / "images" / f"{stem}.png").read_bytes())
        ids.add(codec.pixel_digest(image)[:24])
    return ids


def _check_outputs(root: Path) -> None:
    (source,) = (root / "sources").iterdir()
    splits = {
        s: (source / "splits" / f"{s}.txt").read_text().split()
        for s in ("labeled", "unlabeled", "val")
    }
    assert {s: len(v) for s, v in splits.items()} == {"labeled": 8, "unlabeled": 12, "val": 6}
    rows = _table(root, "images").read_table(["image_id", "split"]).to_pylist()
    ids = {s: {r["image_id"] for r in rows if r["split"] == s} for s in splits}
    for split, stems in splits.items():
        assert ids[split] == _expected_ids(source, stems)
    unlabeled = ids["unlabeled"]
    for name in ("detections", "pseudolabels"):
        ref = _table(root, name)
        got = ref.read_table(["image_id"])["image_id"].to_pylist()
        assert len(got) == len(unlabeled) == ref.num_rows, name
        assert set(got) == unlabeled, name
    signals = _table(root, "teacher_signals").read_table(["image_id", "split", "num_classes"])
    assert signals.num_rows == 20  # labeled (for WPL's prototypes) and unlabeled
    assert set(signals["num_classes"].to_pylist()) == {4}
    by_split = {(r["split"], r["image_id"]) for r in signals.to_pylist()}
    assert by_split == {("labeled", i) for i in ids["labeled"]} | {
        ("unlabeled", i) for i in unlabeled
    }
    labels = _table(root, "pseudolabels").read_table(["policy", "reliable", "margin"]).to_pylist()
    assert {r["policy"] for r in labels} == {"wpl"}
    assert all(r["reliable"] is not None for r in labels)
    assert all(r["margin"] is None for r in labels)
    assert _table(root, "quarantine").num_rows == 0

    student = root / stage_outputs(root)["student"]["path"]
    checkpoint = load_checkpoint(student.read_bytes(), source=str(student))
    assert "teacher:" in checkpoint["config"]
    assert "optimizer" not in checkpoint  # the model a user loads: weights, no training state
    state = Path(resumable_path(str(student)))
    (memory,) = load_checkpoint(state.read_bytes(), source=str(state))["memory"]  # one worker's
    assert memory["labeled_count"].sum() > 0
    assert not memory["prototypes"].isnan().all()
    logits = segment_logits(model_from_checkpoint(checkpoint), torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 4, 32, 32)


def _check_mlflow(world: World, root: Path) -> None:
    """The run is on the server: one parent, a finished nested run per stage, and artifacts
    uploaded through the server into its artifact store (the job never wrote them itself)."""
    client = MlflowClient(tracking_uri=world.tracking_uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "pseudoflow"]
    runs = client.search_runs([experiment.experiment_id])
    (run_dir,) = (root / "pipelines").iterdir()
    parents = [r for r in runs if r.data.tags.get("pseudoflow.run_id") == run_dir.name]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["pseudoflow.stage"] for r in children) == sorted(STAGE_NAMES)
    assert all(r.data.metrics for r in children)
    assert all(r.info.status == "FINISHED" for r in children)
    assert parent.data.params["pseudolabel.policy"] == "wpl"
    assert parent.data.metrics["quarantined_images"] == 0
    for key in ("teacher_miou", "student_miou", "pseudolabel_coverage", "pseudolabel_precision"):
        assert 0.0 <= parent.data.metrics[key] <= 1.0, key
    stage_runs = {r.data.tags["pseudoflow.stage"]: r for r in children}
    assert stage_runs["pseudolabel"].data.metrics["teacher_prototypes"] >= 1
    assert stage_runs["train_student"].data.metrics["wpl_prototypes"] >= 1
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "config.yaml" in names, names
    report = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    figures = {"overlays.png", "quality.png", "weights.png", "iou_per_class.png", "timeline.png"}
    figures |= {"predictions.png", "training.png"}
    assert report == {"index.html", *figures}
    assert (root / "reports" / run_dir.name / "index.html").is_file()
    stored = list(world.artifacts.rglob("config.yaml"))
    assert any(parent.info.run_id in str(p) for p in stored), stored


def _check_quiet_log(log: str) -> None:
    """A job's log is not a terminal: no redrawn lines, no Ray Data or Ray Train INFO chatter
    from the driver, rank 0's plain step lines, the summary and the report's place."""
    worker = re.compile(r"^(\x1b\[\d+m)?\(")  # "(RayTrainWorker pid=...)" and the like
    driver = [line for line in log.splitlines() if not worker.match(line)]
    assert not [line for line in driver if "Starting execution of Dataset" in line]
    assert "Requesting resources" not in log  # Ray Train's own INFO stays in its files
    assert "Failed to query Ray Train Controller" not in log
    assert "\r" not in log
    # the workers' step lines stay in Ray's files (without -v); the driver's done line has the loss
    assert not re.search(r"INFO stages.segtrain: step \d+/\d+ loss_s=", log)
    assert re.search(r"stage train_student done in [\d.]+s: trained_steps=\d+, loss_s=", log)
    assert re.search(r"^train_student +ran +\d+\.\d  [0-9a-f]{12}$", log, re.MULTILINE)
    assert re.search(r"^report: .*/reports/smoke-.*/index.html$", log, re.MULTILINE)


def _check_no_secrets(world: World, job_id: str, log: str) -> None:
    """Neither the Ray token nor the S3 secret is in the job's record, its log, or MLflow."""
    info = _job_info(world, job_id)
    for text in (json.dumps(info), log):
        assert world.head.token not in text
        assert world.secret not in text
    client = MlflowClient(tracking_uri=world.tracking_uri)
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            values = json.dumps({**run.data.params, **run.data.tags})
            assert world.head.token not in values
            assert world.secret not in values


def _job_info(world: World, job_id: str) -> dict:
    import urllib.request

    request = urllib.request.Request(
        f"{world.head.address}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {world.head.token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # loopback only
        info: dict = json.load(response)
    return info


def test_s3_credentials_by_reference(world: World, s3: str, tmp_path: Path) -> None:
    """The job writes to S3 with credentials that exist only on the cluster, under other names:
    the submission carries ``${PF_S3_SECRET}``, never the value."""
    root = f"{s3}/submitted"
    refs = [f"--env-ref={r}" for r in S3_REFS]
    args = ("--config", "smoke", "--root", root, "--until", "ingest", *refs)
    job_id = _job_id(_submit(world, tmp_path, *args))
    followed = _cli(world, "logs", job_id, "--follow", home=tmp_path)
    assert followed.returncode == 0, followed.stdout[-4000:]
    env_vars = _job_info(world, job_id)["runtime_env"]["env_vars"]
    assert env_vars["AWS_SECRET_ACCESS_KEY"] == "${PF_S3_SECRET}"
    assert env_vars["AWS_ACCESS_KEY_ID"] == "${PF_S3_KEY_ID}"
    fs, path = fsspec.core.url_to_fs(root)
    entries = fs.glob(f"{path}/cache/ingest/*/_ENTRY.json")
    assert len(entries) == 1
    record = json.loads(fs.cat(entries[0]))
    assert record["outputs"]["images"]["rows"] == 26
    _check_no_secrets(world, job_id, followed.stdout)

    # a secret given as a plain value is refused before anything is sent, and not echoed
    plain = _submit(world, tmp_path, *args, f"--env=AWS_SECRET_ACCESS_KEY={world.secret}")
    assert plain.returncode == 2
    assert "secrets are passed by reference (--env-ref AWS_SECRET_ACCESS_KEY)" in plain.stderr
    assert world.secret not in plain.stdout + plain.stderr


def test_submission_without_or_with_a_wrong_token_is_refused(world: World, tmp_path: Path) -> None:
    args = ("--config", "smoke", "--root", str(tmp_path / "root"))
    listed = _cli(world, "status", home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    missing = _submit(world, tmp_path, *args, token=None)
    assert missing.returncode == 2
    assert "requires a Ray token and none was sent" in missing.stderr
    wrong = _submit(world, tmp_path, *args, token="0" * 32)
    assert wrong.returncode == 2
    assert "refused the Ray token from RAY_AUTH_TOKEN: it is not this cluster's token" in (
        wrong.stderr
    )
    assert "0" * 32 not in wrong.stderr + wrong.stdout
    # the same refusal for the read-only verbs; a token file is read like RAY_AUTH_TOKEN
    assert "none was sent" in _cli(world, "status", token=None, home=tmp_path).stderr
    token_file = tmp_path / "token"
    token_file.write_text("1" * 32 + "\n")
    by_file = _cli(world, "status", "--token-file", str(token_file), token=None, home=tmp_path)
    assert f"refused the Ray token from --token-file {token_file}" in by_file.stderr
    token_file.write_text(world.head.token + "\n")
    ok = _cli(world, "status", "--token-file", str(token_file), token=None, home=tmp_path)
    assert ok.returncode == 0, ok.stderr
    # the refused submissions left no job behind
    assert ok.stdout == listed.stdout


def test_relative_root_and_missing_tracking_uri_are_refused(world: World, tmp_path: Path) -> None:
    relative = _submit(world, tmp_path, "--config", "smoke", "--root", "runs")
    assert relative.returncode == 2
    assert "--root 'runs' is a relative path" in relative.stderr
    no_uri = _cli(world, "submit", "--config", "smoke", "--root", "/tmp/x", home=tmp_path)
    assert no_uri.returncode == 2
    assert "logs to an MLflow server: pass --tracking-uri" in no_uri.stderr
