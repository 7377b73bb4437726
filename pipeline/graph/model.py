"""What a stage is and what it gets: ``Stage`` (its function, reads, writes, key fields and how
the runner presents it), ``Context`` (config, storage, the outputs before it) and ``Round``."""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.cache.entries import output_dataset
from pipeline.config import PipelineConfig, to_yaml
from stages.core.shards import ShardPool, digest_json
from stages.core.storage import DatasetRef, Storage
from stages.ingest.folder import SourceItem

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """What a stage function gets: config, storage, the outputs of the stages before it (as their
    cache entries recorded them), and where the running stage writes (its attempt folder)."""

    config: PipelineConfig
    storage: Storage
    run_id: str
    items: list[SourceItem]
    source_digest: str = ""
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # stage name -> its key in this run
    writing: tuple[str, ...] = ()
    attempt: str = ""
    sink: Any = None
    results: dict[str, Any] = field(default_factory=dict)

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
    """A stage: its function, what it reads and writes, its output schema, and ``fields``: what
    (besides name, schema and package version) its cache key is computed from. The rest
    declares how the runner presents it (the runner knows no stage by name): its config
    ``section`` (the stage run's params), the image splits it reads (``image_inputs``: split and
    MLflow context, logged as dataset inputs) and the pseudo-label set it trains on
    (``label_input``), the figures its "done" line shows (``key_figures``), its metrics the
    pipeline run logs as its own (``summary``), and the outputs whose entry records the run's
    per-split image digests (``split_digests``)."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    run: Callable[[Context], dict[str, float]]
    fields: Callable[[Context], dict[str, Any]]
    schema: str
    enabled: Callable[[PipelineConfig], bool] = lambda config: True
    # plots from the stage's recorded results (drawn again on a cache hit)
    figures: Callable[[PipelineConfig, dict[str, Any]], dict[str, bytes]] | None = None
    section: str | None = None
    image_inputs: tuple[tuple[str, str], ...] = ()
    label_input: str | None = None
    key_figures: tuple[str, ...] = ()
    summary: tuple[str, ...] = ()
    split_digests: tuple[str, ...] = ()


@dataclass(frozen=True)
class Round:
    """Round ``number`` of teach -> pseudolabel -> train_student. Round 1 learns from the
    teacher; round r > 1 from round r - 1's student. Its stages and outputs carry ``_r<r>``."""

    number: int

    def name(self, base: str) -> str:
        return base if self.number == 1 else f"{base}_r{self.number}"

    @property
    def teacher(self) -> str:
        """The model output this round's teach stage runs."""
        return "teacher" if self.number == 1 else Round(self.number - 1).name("student")


def final_round(config: PipelineConfig) -> Round:
    return Round(config.rounds)
