"""Running a worker loop with Ray Train V2 (``TorchTrainer``) and collecting its checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.core.progress import training_progress
from stages.core.storage import Storage

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"


def fit(
    loop: Callable[[dict[str, Any]], None],
    *,
    loop_config: dict[str, Any],
    datasets: dict[str, Any],
    workers: int,
    use_gpu: bool,
    storage: Storage,
    name: str,
    max_failures: int = 0,
) -> bytes:
    """Train with ``workers`` Ray Train workers; return the final checkpoint file's bytes.

    ``name`` identifies the run under ``<root>/ray_train``: a rerun with the same name resumes
    from its latest checkpoint.
    """
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_config = RunConfig(
        name=name,
        storage_path=storage.path("ray_train"),
        storage_filesystem=None if storage.is_local else storage.arrow_fs(),
        failure_config=FailureConfig(max_failures=max_failures),
        # Ray Train's own INFO lines (resources, process group, each report) stay in its logs
        logging_config=LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]  # Train V2
    )
    with training_progress(name.rsplit("-", 1)[0]) as board:
        # on a terminal rank 0 feeds the line drawn here; elsewhere it logs every log_every steps
        progress = {"progress": board, "log_lines": board is None}
        trainer = TorchTrainer(
            loop,
            train_loop_config={**loop_config, **progress},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=run_config,
            datasets=datasets,
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return (Path(folder) / CHECKPOINT_FILE).read_bytes()


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
