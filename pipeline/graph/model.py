"""What a stage is, what it gets and what it gives: ``Stage`` (the stage's declaration, its
function and key fields), ``Context`` (config, storage, the outputs before it), ``Outcome`` (its
metrics and the results its record keeps) and ``Round``."""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict

from pipeline.cache.entries import output_dataset
from pipeline.config import PipelineConfig, to_yaml
from stages.core.declaration import Declaration
from stages.core.run_config import MetricSink
from stages.core.shards import ShardPool, digest_json
from stages.core.storage import DatasetRef, Storage
from stages.ingest.folder import SourceItem

logger = logging.getLogger(__name__)


class StageResults(TypedDict, total=False):
    """What a stage's record keeps besides its metrics and outputs (a count such as the
    quarantined images is a metric): the ingested images' per-split digests, the MLflow models it exported (name -> folder in storage), evaluate's
    per-class IoU (drawn again on a cache hit)."""

    digests: dict[str, str]
    mlflow_models: dict[str, str]
    per_class_iou: dict[str, list[float]]


@dataclass(frozen=True)
class Outcome:
    """What a stage function returns: its metrics, and the results its record keeps."""

    metrics: dict[str, float]
    results: StageResults = field(default_factory=lambda: StageResults())


@dataclass
class Context:
    """What a stage function gets: config, storage, the outputs of the stages before it (as their
    cache entries recorded them), and, in a running stage's own copy (``attempt_of``), where it
    writes (its attempt folder) and where rank 0 of its training sends metrics."""

    config: PipelineConfig
    storage: Storage
    run_id: str
    items: list[SourceItem]
    source_digest: str = ""
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # stage name -> its key in this run
    writing: tuple[str, ...] = ()
    attempt: str = ""
    sink: MetricSink | None = None

    def attempt_of(self, writes: tuple[str, ...], attempt: str, sink: MetricSink) -> Context:
        """The running stage's context: this one, writing ``writes`` into ``attempt``."""
        return replace(self, writing=writes, attempt=attempt, sink=sink)

    def dataset(self, name: str) -> DatasetRef:
        """The running stage's output ``name`` (in its attempt folder), or an earlier output."""
        if name in self.writing:
            return DatasetRef(self.storage, posixpath.join(self.attempt, name), name)
        return output_dataset(self.storage, name, self.outputs[name])

    def model_path(self, name: str) -> str:
        if name in self.writing:
            return posixpath.join(self.attempt, f"{name}.pt")
        return self.storage.resolve(self.outputs[name]["path"])

    def digest(self, name: str, split: str | None = None) -> str:
        """An input's identity in cache keys: a model's sha256, the images' per-split content
        digest, or the key of the entry that produced a dataset."""
        output = self.outputs[name]
        if output["kind"] == "model":
            return str(output["sha256"])
        if split is not None:
            return str(output["digests"].get(split, "empty"))
        return str(output["key"])

    def pool(self, stage: str, family: dict[str, Any]) -> ShardPool:
        return ShardPool.of(self.storage, stage, digest_json(family))

    def train_name(self, stage: str, token: str | None = None) -> str:
        """Ray Train run name of attempt ``token`` (default: the running one) of the stage's
        key: racing attempts never share a folder, and a rerun that takes over a dead attempt
        (same token) resumes from its checkpoints. Only the stage name precedes the last "-"."""
        token = token or posixpath.basename(self.attempt)
        return f"{stage}-{self.keys[stage][:16]}_{token.replace('-', '_')}"

    def loop_extra(self) -> dict[str, Any]:
        threads = self.config.runtime.torch_threads or os.cpu_count() or 1
        return {
            "seed": self.config.seed,
            "image_size": self.config.data.image_size,
            "crop_size": self.config.data.crop,
            "torch_threads": threads,
            "sink": self.sink,
            "resolved_config": to_yaml(self.config),
        }


@dataclass(frozen=True)
class Stage:
    """A stage in a run: what the stage declares about itself (``declared``: name, reads,
    writes, schema, and how the runner presents it; the runner knows no stage by name), its
    function, and ``fields``: what (besides name, schema and package version) its cache key is
    computed from; a later round's stages hold ``Round.declaration``'s."""

    declared: Declaration
    run: Callable[[Context], Outcome]
    fields: Callable[[Context], dict[str, Any]]
    enabled: Callable[[PipelineConfig], bool] = lambda config: True
    # plots from the stage's recorded results (drawn again on a cache hit)
    figures: Callable[[PipelineConfig, dict[str, Any]], dict[str, bytes]] | None = None

    def declaring(self, **changes: Any) -> Stage:
        """This stage with its declaration changed (``reads=...``, ``key_figures=...``)."""
        return replace(self, declared=replace(self.declared, **changes))

    @property
    def name(self) -> str:
        return self.declared.name

    @property
    def reads(self) -> tuple[str, ...]:
        return self.declared.reads

    @property
    def writes(self) -> tuple[str, ...]:
        return self.declared.writes

    @property
    def schema(self) -> str:
        return self.declared.schema

    @property
    def section(self) -> str | None:
        return self.declared.section

    @property
    def image_inputs(self) -> tuple[tuple[str, str], ...]:
        return self.declared.image_inputs

    @property
    def label_input(self) -> str | None:
        return self.declared.label_input

    @property
    def key_figures(self) -> tuple[str, ...]:
        return self.declared.key_figures

    @property
    def summary(self) -> tuple[str, ...]:
        return self.declared.summary

    @property
    def split_digests(self) -> tuple[str, ...]:
        return self.declared.split_digests


@dataclass(frozen=True)
class Round:
    """Round ``number`` of teach -> pseudolabel -> train_student. Round 1 learns from the
    teacher; round r > 1 from round r - 1's student. Its stages and outputs carry ``_r<r>``."""

    number: int

    def name(self, base: str) -> str:
        return base if self.number == 1 else f"{base}_r{self.number}"

    def declaration(self, declared: Declaration, outputs: frozenset[str]) -> Declaration:
        """A round-1 stage's declaration with its names those of this round: its name and what
        it writes carry ``_r<r>``, and so does what it reads of the round's ``outputs`` (what
        the round's stages write); ``teacher`` is the model this round's teach runs."""

        def read(name: str) -> str:
            if name == "teacher":
                return self.teacher
            return self.name(name) if name in outputs else name

        label = declared.label_input
        return replace(
            declared,
            name=self.name(declared.name),
            reads=tuple(map(read, declared.reads)),
            writes=tuple(map(self.name, declared.writes)),
            label_input=read(label) if label is not None else None,
        )

    @property
    def teacher(self) -> str:
        """The model output this round's teach stage runs."""
        return "teacher" if self.number == 1 else Round(self.number - 1).name("student")


def final_round(config: PipelineConfig) -> Round:
    return Round(config.rounds)
