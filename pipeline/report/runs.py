"""A pipeline run as the report reads it: its resolved config and, per stage, the cache entry
it used."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.cache.entries import CacheEntry
from pipeline.config import PipelineConfig, validate
from pipeline.graph import all_stages
from stages.core.errors import PseudoflowError
from stages.core.storage import Storage

logger = logging.getLogger(__name__)


class ReportError(PseudoflowError, RuntimeError):
    """The run cannot be reported (unknown run id, missing records)."""

    exit_code = 2


# --------------------------------------------------------------------------------- the run
def pipeline_runs(storage: Storage) -> list[str]:
    """Run ids under ``pipelines/``, oldest first (ids end in ``-<UTC stamp>-<hex>``)."""
    base = storage.path("pipelines")
    if not storage.fs.exists(base):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in storage.fs.ls(base, detail=False)]
    return sorted(names, key=lambda name: (name.rsplit("-", 2)[-2:], name))


def find_run(storage: Storage, run: str | None) -> str:
    """The run id ``run`` names (exactly or as a unique prefix); the newest run if ``None``."""
    runs = pipeline_runs(storage)
    if not runs:
        raise ReportError(f"no pipeline runs under {storage.url}: run `pseudoflow run` first")
    if run is None:
        return runs[-1]
    matches = [r for r in runs if r == run] or [r for r in runs if r.startswith(run)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(runs[-5:])
    what = "matches several runs" if matches else "is not a run"
    raise ReportError(f"{run!r} {what} under {storage.url}; the newest are: {known}")


@dataclass(frozen=True)
class StageUse:
    """One stage of the run: the entry it used and how it got it."""

    stage: str
    key: str
    hit: bool
    started: float | None  # epoch seconds (None for runs recorded before timings were kept)
    seconds: float | None
    record: dict[str, Any]


@dataclass
class RunRecords:
    run_id: str
    config: PipelineConfig
    stages: dict[str, StageUse]

    def output(self, stage: str, name: str) -> dict[str, Any] | None:
        use = self.stages.get(stage)
        return None if use is None else use.record["outputs"].get(name)


def load_run(storage: Storage, run_id: str) -> RunRecords:
    """The run's resolved config and, per stage it completed, the entry it used."""
    folder = storage.path("pipelines", run_id)
    try:
        stages = storage.read_json(f"{folder}/stages.json")
        config_text = storage.read_bytes(f"{folder}/config.yaml").decode()
    except FileNotFoundError as exc:
        raise ReportError(f"run {run_id}: {exc.filename or exc} is missing") from exc
    config = validate(yaml.safe_load(config_text))
    uses = {}
    order = [s.name for s in all_stages(config)]
    for stage, used in sorted(stages.items(), key=lambda item: order.index(item[0])):
        record = CacheEntry(storage, stage, used["key"]).record()
        if record is None:  # collected since (cache gc): the run's other parts still show
            logger.warning("run %s: the %s entry %s is gone", run_id, stage, used["key"][:12])
            continue
        started, seconds = used.get("started"), used.get("seconds")
        uses[stage] = StageUse(stage, used["key"], bool(used["hit"]), started, seconds, record)
    return RunRecords(run_id, config, uses)
