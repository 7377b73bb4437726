"""What configures a run's training and inference, Ray-free: the settings every trained model
shares (``TrainingRun``), what each worker of a training loop gets (``LoopConfig``), where rank
0's metrics go (``MetricSink``), the poly learning-rate schedule, and the execution knobs of an
inference stage (``InferenceConfig``). ``stages.core.training`` and ``stages.core.inference``
run them on Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field, model_validator

from stages.core.config import StrictModel
from stages.core.pretrained import check_init_or_weights


class MetricSink(Protocol):
    """Where rank 0 sends its metrics (the pipeline passes an MLflow-backed sink)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class TrainingRun(StrictModel):
    """How a Ray Train training runs and where it starts from: the settings every trained model
    (teacher, student, detector) shares. All but ``init`` are execution only."""

    EXECUTION = frozenset(
        {
            "log_every",
            "checkpoint_every",
            "max_failures",
            "workers",
            "resources",
            "weights",
            "init",  # its content digest is a key field of its own
            "enabled",
        }
    )

    checkpoint_every: int = Field(
        100, ge=0, description="steps between resumable checkpoints (0: only at the end)"
    )
    max_failures: int = Field(
        2, ge=0, description="worker-group restarts, each resuming from the last checkpoint"
    )
    workers: int = Field(1, ge=1, description="Ray Train workers (execution only)")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each worker needs besides its CPU or GPU (execution "
        "only), e.g. {trainer_node: 1} to keep workers on the nodes that advertise it",
    )
    weights: str | None = Field(None, description="skip training and load this checkpoint file")
    init: str | None = Field(
        None,
        description="start training from these weights (local path or URL): a torchvision-shaped "
        "state dict of the whole network (heads of another class count re-initialised, tensors "
        "it lacks such as an aux head dropped) or of its backbone's classification network, "
        "e.g. ImageNet resnet50",
    )

    @model_validator(mode="after")
    def _init_or_weights(self) -> TrainingRun:
        check_init_or_weights(self.init, self.weights)
        return self


@dataclass(frozen=True)
class LoopConfig:
    """What every worker of a training loop gets (Ray Train's ``train_loop_config`` carries it as
    ``{"loop": LoopConfig}``): the model's own settings, typed as their section's class
    (``SegTrainConfig``, ``StudentConfig``, ``DetectorConfig``), and the run's."""

    train: TrainingRun
    num_classes: int
    seed: int  # rank r seeds with seed + r
    image_size: int
    crop_size: int | None = None  # the training crop (None: the whole canvas)
    torch_threads: int = 1
    resolved_config: str = ""  # the run's config as YAML, kept in the checkpoint
    policy: StrictModel | None = None  # a student's pseudo-label settings
    init: bytes | None = None  # pretrained tensors, mapped on the driver (``encode_state``)
    sink: MetricSink | None = None  # rank 0's metrics go here
    progress: Any = None  # the progress board's handle (set by ``fit``)
    log_lines: bool = True  # rank 0 logs a line every log_every steps

    def rank_sink(self, rank: int) -> MetricSink | None:
        return self.sink if rank == 0 else None


def loop_of(train_loop_config: dict[str, Any]) -> LoopConfig:
    """The typed config inside the dict Ray Train hands a worker loop."""
    loop = train_loop_config["loop"]
    if not isinstance(loop, LoopConfig):
        raise TypeError(f"a training loop takes {{'loop': LoopConfig}}, got {type(loop).__name__}")
    return loop


def poly_lr(base_lr: float, step: int, total: int, power: float = 0.9) -> float:
    """Poly schedule: base_lr * (1 - step/total)^power."""
    return base_lr * (1.0 - step / total) ** power


CPUS_PER_CPU_ACTOR = 8


class InferenceConfig(StrictModel):
    """Execution knobs of an inference stage (never part of a result's identity)."""

    EXECUTION = frozenset({"batch_size", "actors", "gpus_per_actor", "shard_rows", "resources"})

    batch_size: int = Field(16, ge=1)
    actors: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="model actors; auto: with GPUs a pool from 1 up to as many as the cluster's "
        "GPUs hold (it grows as an autoscaling cluster adds GPU nodes), on CPUs one per "
        f"{CPUS_PER_CPU_ACTOR} of the cluster's CPUs (at least 1)",
    )
    gpus_per_actor: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="GPUs each actor reserves (fractions share a GPU); auto: 1 with "
        "runtime.use_gpu, else 0",
    )
    shard_rows: int = Field(
        256, ge=1, description="rows per committed shard: what a killed run can lose"
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each actor needs, e.g. {gpu_node: 1} to keep the "
        "actors on the nodes that advertise it",
    )
