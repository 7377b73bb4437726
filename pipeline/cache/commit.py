"""Running a stage into its own attempt folder and committing its entry (or adopting the record
of a run that committed the same key first)."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cache.entries import (
    CacheEntry,
    Heartbeat,
    dataset_output,
    drop_unused,
    entry_files,
    model_output,
    output_dataset,
)
from pipeline.graph import Context, Stage, StageResults
from stages.core.run_config import MetricSink
from stages.core.shards import new_token, pool_schemas
from stages.core.storage import DatasetRef, Storage

logger = logging.getLogger(__name__)


def execute(
    stage: Stage, ctx: Context, entry: CacheEntry, fields: dict[str, Any], sink: MetricSink
) -> dict[str, Any]:
    """Run ``stage`` into an attempt folder and commit its entry (or adopt the record of a run
    that committed the same key first).

    The attempt is fresh, or a dead attempt of the same key (its heartbeat stopped) that left a
    Ray Train folder: taking it over keeps its token, so training resumes from its checkpoints.
    Each attempt trains in its own folder (``Context.train_name``), so racing attempts never
    share one, and each removes only its own once committed."""
    storage = ctx.storage

    def resumable(token: str) -> bool:
        return bool(storage.fs.exists(storage.path("ray_train", ctx.train_name(stage.name, token))))

    token = entry.take_over(resumable) or new_token()
    running = ctx.attempt_of(stage.writes, entry.attempt_dir(token), sink)
    train_dir = storage.path("ray_train", running.train_name(stage.name))
    if storage.fs.exists(train_dir):
        logger.info("%s: taking over dead attempt %s, resuming its training", stage.name, token)
    with Heartbeat(storage, entry.heartbeat_path(token)):
        outcome = stage.run(running)
        outputs = _outputs(stage, running, outcome.results)
    check_output_schemas(storage, outputs)  # a shard of another schema is named, not committed
    written = {"outputs": outputs}
    ours = entry_files(storage, written)  # read before a lost race discards the attempt
    record, won = entry.commit(
        token,
        {
            "fields": fields,
            "outputs": outputs,
            "metrics": outcome.metrics,
            "results": dict(outcome.results),
        },
    )
    if not won:
        dropped = drop_unused(storage, ours, record)
        logger.info("%s: lost the commit race; removed %d unused files", stage.name, len(dropped))
    if storage.fs.exists(train_dir):  # the model is in the entry now
        storage.fs.rm(train_dir, recursive=True)
    return record


def _outputs(stage: Stage, ctx: Context, results: StageResults) -> dict[str, dict[str, Any]]:
    """What the stage wrote into its attempt folder, as the entry records it (with the split
    digests its results give, on the outputs it declares them for)."""
    outputs = {}
    for name in stage.writes:
        model = ctx.model_path(name)
        if ctx.storage.fs.exists(model):
            outputs[name] = model_output(ctx.storage, model)
            continue
        ref: DatasetRef = ctx.dataset(name)
        if ref.is_committed():
            extra = {"digests": results["digests"]} if name in stage.split_digests else {}
            outputs[name] = dataset_output(ref, **extra, **_footprint(ref))
    return outputs


def _footprint(ref: DatasetRef) -> dict[str, float]:
    """Stored bytes of a dataset, and per pixel where its rows carry image sizes."""
    files = ref.files()
    size = float(sum(ref.storage.fs.size(path) for path in files))
    if not files:
        return {"bytes": size}
    with ref.storage.fs.open(files[0], "rb") as handle:
        names = pq.read_schema(handle).names
    if "height" not in names or "width" not in names:
        return {"bytes": size}
    table = ref.read_table(["height", "width"])
    pixels = float(pc.sum(pc.multiply(table["height"], table["width"])).as_py() or 0)
    return {"bytes": size, "bytes_per_pixel": size / pixels if pixels else 0.0}


# ------------------------------------------------------------------------------ output checks
def check_output_schemas(storage: Storage, outputs: dict[str, dict[str, Any]]) -> None:
    """Before an entry is committed: every shard of an inference stage's dataset output must
    have the stage's Arrow schema (footers only); raises :class:`StorageError` naming the file."""
    expected = pool_schemas()
    for name, output in outputs.items():
        schema = expected.get(output.get("schema") or "")
        if output["kind"] == "dataset" and schema is not None:
            output_dataset(storage, name, output).verify(schema=schema)
