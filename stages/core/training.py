"""Running a worker loop with Ray Train V2 (``TorchTrainer``) and collecting its checkpoint."""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.models import write_trained
from stages.core.pretrained import encode_state, load_init
from stages.core.progress import training_progress
from stages.core.run_config import LoopConfig
from stages.core.storage import Storage

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"


def fit(
    loop: Callable[[dict[str, Any]], None],
    *,
    loop_config: LoopConfig,
    datasets: dict[str, Any],
    workers: int,
    use_gpu: bool,
    storage: Storage,
    name: str,
    max_failures: int = 0,
    resources: dict[str, float] | None = None,
) -> bytes:
    """Train with ``workers`` Ray Train workers; return the final checkpoint file's bytes.

    ``name`` identifies the run under ``<root>/ray_train``: a rerun with the same name resumes
    from its latest checkpoint. ``resources``: custom Ray resources each worker needs besides its
    CPU (or GPU), e.g. ``{"trainer_node": 1}`` to keep workers on the nodes that advertise it.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_config = RunConfig(
        name=name,
        storage_path=storage.path("ray_train"),
        storage_filesystem=None if storage.is_local else storage.arrow_fs(),
        # a failed worker group restarts from the latest checkpoint, up to max_failures times
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        # Ray Train's own INFO lines (resources, process group, each report) stay in its logs
        logging_config=LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]  # Train V2
    )
    with training_progress(name.rsplit("-", 1)[0]) as board:
        # on a terminal rank 0 feeds the line drawn here; elsewhere it logs every log_every steps
        config = replace(loop_config, progress=board, log_lines=board is None)
        trainer = TorchTrainer(
            loop,
            train_loop_config={"loop": config},
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=use_gpu,
                resources_per_worker=worker_resources(use_gpu, resources),
            ),
            run_config=run_config,
            datasets=datasets,
            dataset_config=ordered_ingest(),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return (Path(folder) / CHECKPOINT_FILE).read_bytes()


def train_and_write(
    loop: Callable[[dict[str, Any]], None],
    loop_config: LoopConfig,
    *,
    steps: int,
    init_into: Callable[[], nn.Module],
    layout: Any,
    datasets: dict[str, Any],
    storage: Storage,
    out_path: str,
    name: str,
    use_gpu: bool,
    window: int | None = None,
) -> dict[str, float]:
    """A training stage's whole run, the same for every trained model: ``init`` (if the section
    names one) mapped once, on the driver, onto a fresh network (``init_into``, in ``layout``),
    so a file that does not fit fails before any worker starts; ``steps`` of ``loop`` with Ray
    Train (:func:`fit`); the finished model written to ``out_path``. Returns the stage's
    metrics (the steps trained, and what the init loaded)."""
    cfg = loop_config.train
    metrics = {"trained_steps": float(steps)}
    if cfg.init:
        report = load_init(init_into(), cfg.init, layout)
        logger.info("%s: init %s", name, report.summary())
        loop_config = replace(loop_config, init=encode_state(report.loaded))
        metrics.update(report.metrics())
    blob = fit(
        loop,
        loop_config=loop_config,
        datasets=datasets,
        workers=cfg.workers,
        use_gpu=use_gpu,
        storage=storage,
        name=name,
        max_failures=cfg.max_failures,
        resources=cfg.resources,
    )
    write_trained(storage, out_path, blob, image_size=loop_config.image_size, window=window)
    return metrics


def ordered_ingest() -> Any:
    """Ray Train's ingest (``DataConfig``) as its default (the driver's resource limits and
    progress setting) with ``preserve_order``: the split deals each worker the blocks that the
    row counts alone say (least rows so far first), not those stored on its node, so with several
    workers on several nodes each worker's rows do not depend on where a task ran. (Built here:
    ``DataConfig.default_ingest_options`` also passes the deprecated ``exclude_resources``.)"""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    current = DataContext.get_current().execution_options
    options = ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=True,
        verbose_progress=current.verbose_progress,
    )
    return DataConfig(execution_options=options)


def worker_resources(use_gpu: bool, resources: dict[str, float] | None) -> dict[str, float] | None:
    """Ray Train's ``resources_per_worker``: its default (one CPU, or one GPU) plus the custom
    ``resources``; ``None`` (the default alone) without any. Ray Train drops the default CPU
    once any resource is named, so it is named here."""
    if not resources:
        return None
    return {("GPU" if use_gpu else "CPU"): 1.0, **resources}


def worker_logging() -> None:
    """Inside a Ray worker: send this package's INFO records (progress lines) to stderr, which
    Ray forwards to the driver's console."""
    package = logging.getLogger("stages")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False


class EmptyShardError(RuntimeError):
    """A training worker was given no rows to train on (its loop would never yield a batch)."""


# Fault injection for tests: "<step>:<marker prefix>" makes a training worker of each kind
# (segmenter, detector) that reaches <step> die once (os._exit, as a killed node leaves it); the
# file "<marker prefix>.<kind>" records that it happened.
FAULT_ENV = "PSEUDOFLOW_FAULT_AT_STEP"


def inject_fault(step: int, kind: str) -> None:
    """Kill this worker process at the step ``PSEUDOFLOW_FAULT_AT_STEP`` names, the first time
    for ``kind`` only (unset, as outside tests: nothing)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, prefix = spec.split(":", 1)
    marker = f"{prefix}.{kind}"
    if step == int(at) and not os.path.exists(marker):
        Path(marker).write_text(f"killed at step {step}\n")
        os._exit(1)


# Holding for tests: "<kind>:<n>:<marker prefix>" makes the first process of <kind> (teacher,
# student, detector: a training worker at step <n>; detect, teach: an inference actor at its
# <n>-th batch) write "<marker prefix>.<kind>" (its pid) and sleep, so that a test can kill its
# node at a known moment; a restarted process that finds the marker goes on. Workers read it from
# their own environment: set on one node (its `ray start`), it holds only what runs there.
HOLD_ENV = "PSEUDOFLOW_HOLD_AT"
HOLD_SECONDS = 600.0  # then go on: a test that never kills must not hang for ever
_held_calls: dict[str, int] = {}


def hold_point(kind: str, step: int | None = None) -> None:
    """Hold here as ``PSEUDOFLOW_HOLD_AT`` says (unset, as outside tests: nothing). ``step``:
    the training step; ``None``: count this process's calls (an actor's batches) from 1."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    which, at, prefix = spec.split(":", 2)
    if which != kind:
        return
    if step is None:
        step = _held_calls[kind] = _held_calls.get(kind, 0) + 1
    marker = Path(f"{prefix}.{kind}")
    if step != int(at) or marker.exists():
        return
    partial = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    partial.write_text(f"{os.getpid()}\n")
    partial.rename(marker)  # whole or absent for the test that watches it
    logger.info("holding %s at %d (pid %d) for a test to kill", kind, step, os.getpid())
    deadline = time.monotonic() + HOLD_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.2)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """The random state a resumed run needs to draw what a clean run draws: the loop's own
    generator (every augmentation and policy draw), and the global torch and CUDA RNGs (dropout,
    and any library code that draws from them)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator, rank: int, step: int) -> None:
    """Put back rank 0's random state (the checkpoint holds rank 0's). Other ranks re-draw from a
    seed of their rank and step: deterministic, though not the stream a clean run would draw."""
    if rank == 0:
        torch.set_rng_state(state["torch"])
        generator.set_state(state["generator"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        return
    torch.manual_seed(1_000_003 * rank + step)
    generator.manual_seed(2_000_003 * rank + step)


def report(metrics: dict[str, float], checkpoint: dict[str, Any] | None = None) -> None:
    """``ray.train.report`` of a worker's ``metrics``, with ``checkpoint`` (a state dict as
    ``make_checkpoint`` builds it) saved as ``CHECKPOINT_FILE`` when given."""
    import ray.train

    if checkpoint is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(checkpoint, Path(tmp) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def latest_checkpoint() -> dict[str, Any] | None:
    """The state of Ray Train's latest checkpoint of this run (tensors only: ``weights_only``),
    or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / CHECKPOINT_FILE
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


# A worker keeps its shard's rows in memory after the first pass when they take at most this
# many bytes: a later pass is then a permutation of them, not a new Ray Data execution. Each
# pass through a Ray Data shard starts one (a streaming split's coordinator, the executor, the
# local shuffle buffer); over a 24-image labeled split at 8 a batch that is every third step,
# and it cost 42 to 51 ms a batch against a step of 168 ms (64 px, 2 cores; docs/performance.md).
# Above it (a large unlabeled pool) every pass streams, and its start is spread over many batches.
SHARD_CACHE_BYTES = 256 * 1024 * 1024


def endless_batches(
    shard: Any,
    batch_size: int,
    seed: int,
    name: str = "labeled",
    cache_bytes: int = SHARD_CACHE_BYTES,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches from a Ray Data shard. The first pass streams the shard through Ray
    Data's local shuffle (buffer of 4 batches, seeded by ``seed``). A shard whose first pass
    took at most ``cache_bytes`` is then kept: pass ``e`` is the kept rows in the order of
    ``torch.randperm`` seeded by ``seed + e``, in batches of ``batch_size`` (the last one
    short, as Ray's ``drop_last=False``). A larger shard streams every pass, its local shuffle
    seeded by ``seed + e``. Either way the batches depend on the seed and the shard alone, so a
    resumed run that skips the batches it trained on finds the same ones. A pass that yields
    nothing (an empty split, or fewer rows than workers) raises instead of looping forever."""
    kept: list[dict[str, torch.Tensor]] | None = []
    held, empty = 0, True
    for batch in _pass(shard, batch_size, seed):
        empty = False
        size = _nbytes(batch)
        held += size or 0
        if size is None or held > cache_bytes:
            kept = None
        elif kept is not None:  # a copy: the step may write into what it is given
            kept.append({key: value.clone() for key, value in batch.items()})
        yield batch
    if empty:
        raise _empty(name)
    if kept is None:  # too large to keep: stream every pass
        yield from _streamed(shard, batch_size, seed, name, first=1)
        return
    rows = {key: torch.cat([batch[key] for batch in kept]) for key in kept[0]}
    count = len(next(iter(rows.values())))
    for epoch in itertools.count(1):
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
        for picks in order.split(batch_size):
            yield {key: value[picks] for key, value in rows.items()}


def _pass(shard: Any, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    return iter(
        shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=False,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed,
        )
    )


def _streamed(
    shard: Any, batch_size: int, seed: int, name: str, first: int
) -> Iterator[dict[str, Any]]:
    """Passes ``first``, ``first`` + 1, ... each through Ray Data; an empty one raises."""
    for epoch in itertools.count(first):
        empty = True
        for batch in _pass(shard, batch_size, seed + epoch):
            empty = False
            yield batch
        if empty:
            raise _empty(name)


def _empty(name: str) -> EmptyShardError:
    return EmptyShardError(
        f"this worker's {name} shard holds no rows: the {name} split is empty, or has "
        "fewer images than there are training workers"
    )


def _nbytes(batch: dict[str, Any]) -> int | None:
    """The batch's bytes; None where a column is not a tensor (Python objects: never kept)."""
    if not all(isinstance(value, torch.Tensor) for value in batch.values()):
        return None
    return sum(value.numel() * value.element_size() for value in batch.values())
