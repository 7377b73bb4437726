"""MLflow tracking: the only module that imports mlflow.

One parent run per pipeline run, one nested run per stage tagged ``pseudoflow.stage``. The
tracking URI is always explicit. :class:`MlflowSink` is a small picklable object handed to Ray
Train workers so that rank 0 logs its metrics live to the stage's run.

What :class:`Tracker` logs (params, tags, text artifacts, dataset sources) is redacted first
(:mod:`pipeline.redact`): a URL's ``user:password@`` or ``?token=...`` is stored as ``***``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.provenance import git_commit
from pipeline.redact import redact

logger = logging.getLogger(__name__)

STAGE_TAG = "pseudoflow.stage"
KEY_TAG = "pseudoflow.cache_key"
HIT_TAG = "pseudoflow.cache_hit"
RUN_TAG = "pseudoflow.run_id"
MAX_PARAMS_PER_BATCH = 100


def source_tags(command: str) -> dict[str, str]:
    """MLflow's source tags for a pipeline run (the UI shows them), and the package version."""
    from stages.core.shards import package_version

    tags = {
        "mlflow.source.type": "JOB",
        "mlflow.source.name": command,
        "pseudoflow.version": package_version(),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def local_uri(root: str) -> str:
    """The SQLite store under a local root: the default when no server is named."""
    return f"sqlite:///{root}/mlflow.db"


def artifact_location(uri: str, root: str) -> str | None:
    """Where a new experiment keeps its artifacts: a server stores (proxies) them itself; a
    database URI needs a place under the root."""
    return None if uri.startswith(("http://", "https://", "databricks")) else f"{root}/mlartifacts"


class Tracker:
    """Thin layer over :class:`MlflowClient` for the runner."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_location
            )

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        all_tags = {key: redact(value) for key, value in tags.items()}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        return str(run.info.run_id)

    def end_run(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, redact(v)[:6000]) for k, v in sorted(params.items())]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        """Each metric of a run at its last step (a training stage's last loss, for one)."""
        return {k: float(v) for k, v in self.client.get_run(run_id).data.metrics.items()}

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, redact(value))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, redact(text), artifact_file)

    def log_bytes(self, run_id: str, data: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)

    def log_model_folder(self, run_id: str, storage: Any, directory: str) -> str:
        """Log a stored MLflow model folder as ``run_id``'s ``model`` artifact; its URI."""
        from pipeline.models import MODEL_ARTIFACT, download_folder

        if storage.is_local:  # the stored folder itself, no copy
            self.client.log_artifacts(run_id, directory, MODEL_ARTIFACT)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                download_folder(storage, directory, tmp)
                self.client.log_artifacts(run_id, tmp, MODEL_ARTIFACT)
        return f"runs:/{run_id}/{MODEL_ARTIFACT}"

    def log_dataset(
        self,
        run_id: str,
        *,
        name: str,
        digest: str,
        source: str,
        profile: dict[str, Any],
        context: str = "train",
    ) -> None:
        """Record a stored dataset (e.g. the pseudo-label set) as an input of ``run_id``."""
        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type="pseudoflow-cache",
            source=json.dumps({"uri": redact(source)}),
            profile=json.dumps(profile, sort_keys=True),
        )
        tags = [InputTag("mlflow.data.context", context)]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])

    def sink(self, run_id: str) -> MlflowSink:
        return MlflowSink(self.uri, run_id)


def referenced_keys(uri: str) -> set[str]:
    """Cache keys that any active run of any experiment at ``uri`` is tagged with (deleted runs
    do not count)."""
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    keys: set[str] = set()
    token = None
    while experiments:
        page = client.search_runs(
            experiments,
            filter_string=f"tags.`{KEY_TAG}` LIKE '%'",
            max_results=1000,
            page_token=token,
        )
        keys.update(r.data.tags[KEY_TAG] for r in page if KEY_TAG in r.data.tags)
        token = page.token
        if not token:
            break
    return keys


def find_pipeline_run(uri: str, experiment: str, run_id: str) -> str | None:
    """The MLflow parent run of pipeline run ``run_id`` (tagged ``pseudoflow.run_id``)."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'", max_results=1
    )
    return str(runs[0].info.run_id) if runs else None


@dataclass(frozen=True)
class StageHistory:
    """A training stage's per-step metrics, from the MLflow run that trained it."""

    run_id: str | None  # that run (None: not found)
    reused: bool  # the pipeline run reused the stage's entry: the curves are ``run_id``'s
    metrics: dict[str, list[tuple[int, float]]]  # name -> (step, value), by step
    note: str = ""  # why there are no curves


def is_step_metric(name: str) -> bool:
    """The per-step training metrics the report draws: the losses and the learning rate."""
    return name.startswith("loss") or name == "lr"


def stage_histories(
    uri: str, experiment: str, run_id: str, stages: dict[str, tuple[str, bool]]
) -> dict[str, StageHistory]:
    """For each stage (name -> (cache key, cache hit)) of pipeline run ``run_id``: the losses
    and learning rate its training logged per step. A stage that ran has them in its own stage
    run; a cache hit has them in the stage run that produced the entry (tagged with the same
    key, not a hit; the newest finished one)."""
    client = MlflowClient(tracking_uri=uri)
    parent = find_pipeline_run(uri, experiment, run_id)
    if parent is None:
        note = f"no MLflow run at {redact(uri)} is tagged with run {run_id}"
        return {stage: StageHistory(None, hit, {}, note) for stage, (_, hit) in stages.items()}
    experiments = [e.experiment_id for e in client.search_experiments()]
    children = client.search_runs(
        experiments, filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000
    )
    ours = {r.data.tags.get(STAGE_TAG): r for r in children}
    out = {}
    for stage, (key, hit) in stages.items():
        run = _producer(client, experiments, key) if hit else ours.get(stage)
        if run is None:
            why = "the run that trained it is not" if hit else "its stage run is not"
            out[stage] = StageHistory(None, hit, {}, f"{why} in MLflow at {redact(uri)}")
            continue
        names = sorted(name for name in run.data.metrics if is_step_metric(name))
        metrics = {name: _history(client, run.info.run_id, name) for name in names}
        note = "" if metrics else "no per-step metrics were logged (nothing trained here)"
        out[stage] = StageHistory(run.info.run_id, hit, metrics, note)
    return out


def _producer(client: MlflowClient, experiments: list[str], key: str) -> Any:
    """The newest stage run that computed the entry ``key`` (finished ones first)."""
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{HIT_TAG}` = 'false'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or list(runs))[0] if runs else None


def _history(client: MlflowClient, run_id: str, name: str) -> list[tuple[int, float]]:
    """``name``'s values by step; a step logged twice (a resumed training) keeps its last."""
    points = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
    return sorted({m.step: m.value for m in points}.items())


def log_folder(uri: str, run_id: str, folder: str, artifact_path: str) -> None:
    """Log every file of a local ``folder`` as artifacts of ``run_id`` under ``artifact_path``."""
    MlflowClient(tracking_uri=uri).log_artifacts(run_id, folder, artifact_path)


class MlflowSink:
    """Picklable metric sink for Ray workers: logs to one run of one tracking server."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        MlflowClient(tracking_uri=self.uri).log_batch(self.run_id, metrics=batch)


BENCH_EXPERIMENT = "pseudoflow-bench"


def log_benchmark(
    uri: str,
    *,
    name: str,
    params: dict[str, str],
    metrics: dict[str, float],
    files: dict[str, bytes],
    artifact_location: str | None,
) -> str:
    """One run in the ``pseudoflow-bench`` experiment: params, metrics and files; its id."""
    tracker = Tracker(uri, BENCH_EXPERIMENT, artifact_location)
    run_id = tracker.start_run(name, {"pseudoflow.bench": name})
    tracker.log_params(run_id, params)
    tracker.log_metrics(run_id, metrics)
    for file_name, data in files.items():
        tracker.log_bytes(run_id, data, file_name)
    tracker.end_run(run_id, True)
    return run_id
