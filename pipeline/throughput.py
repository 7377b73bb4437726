"""``pseudoflow bench throughput``: the project's own paths against the bare model, side by side.

Every number comes from one process on one device; the things compared are called in turn (after
a warm-up call each) ``reps`` times and each one's median is taken.

* ``labeling_ratio``: images/s of the teach stage's predictor (a uint8 batch in, its signal rows
  out) over images/s of the bare forward of the same network, batch and precision that brings
  label and confidence to the host (normalise, forward, softmax, max, ``.cpu()``);
  ``detect_ratio``: the same for the detect stage's predictor and its detector's forward.
* ``labeling_cpu_ms_per_image``: what the teach predictor costs besides the forward, around a
  zero-cost :class:`ReplayNetwork` that returns a trained-looking output (:func:`peaked_logits`).
* ``pseudolabel_ms_per_image.<policy>``: the pseudolabel stage's batch function per image on
  the signal rows that predictor made; ``signals_bytes_per_pixel`` and
  ``pseudolabels_bytes_per_pixel``: those rows (the threshold policy's) as the stages write them,
  zstd Parquet, over the pixels.
* ``step_ratio``: the student's training step (labeled + unlabeled batch) over a bare step
  (forward, cross-entropy, backward, AdamW) of the same network on as many views;
  ``step_cpu_ms_per_image``: the step besides the network, per unlabeled image (a
  :class:`ReplayNetwork` again).
* ``actor_scaling``: the teach predictor through Ray Data's actor pool, 2 actors over 1. Ray is
  imported only there: everything else runs where only torch is installed.

Random weights are made to do a trained network's work (:func:`trained_looking`): BatchNorm
statistics of the bench images, and logits scaled to a trained network's confidence.

Every call into the stage callables is in the adapters just below: those callables' internals
are being rewritten, and only these few functions know their signatures.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from stages.core import codec, data
from stages.core.models import build_detector, build_segmenter, segment_logits
from stages.detect import DETECTIONS_SCHEMA, DetectorPredictor
from stages.pseudolabel.config import PseudolabelConfig
from stages.pseudolabel.stage import label_batch, signal_spec
from stages.segtrain import (
    Learner,
    StudentConfig,
    new_learner,
    pseudolabel_rows_to_arrays,
    train_step,
)
from stages.teach import SignalSpec, TeachConfig, TeacherPredictor
from stages.train_detector import DetectorConfig, detector_args

Labeler = Callable[[dict[str, np.ndarray]], pa.Table]


# ----------------------------------------------------------- adapters: every call into a stage
def _signal_spec(policy: str) -> SignalSpec:
    """What the teach stage stores for ``policy`` (its default options)."""
    return signal_spec(PseudolabelConfig(policy=policy))


def _teacher_predictor(
    model: nn.Module, device: torch.device, policy: str = "threshold"
) -> tuple[Labeler, torch.dtype | None]:
    """The teach stage's predictor around ``model``, storing what ``policy`` reads, at the
    teach stage's default precision; and the autocast dtype its forward runs in (None:
    float32). Called with {image_id, height, width, image uint8[B, 3, S, S], split, mask}, it
    returns the stage's signal rows."""
    precision = TeachConfig().precision
    predictor = TeacherPredictor.of_model(model, device, _signal_spec(policy), precision)
    return predictor, predictor.dtype


def _detector_predictor(
    model: nn.Module, model_args: dict[str, Any], device: torch.device
) -> Labeler:
    """The detect stage's predictor (min_score 0.05, ``DetectConfig``'s default)."""
    return DetectorPredictor.of_model(model, model_args, 0.05, device)


def _detections_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows {image_id, boxes (x1, y1, x2, y2 flattened), labels, scores} as the detect
    stage's table."""
    full = [{**row, "num_boxes": len(row["labels"])} for row in rows]
    return pa.Table.from_pylist(full, schema=DETECTIONS_SCHEMA)


def _label_rows(
    signals: pa.Table,
    policy: str,
    *,
    prototypes: np.ndarray | None = None,
    detections: pa.Table | None = None,
) -> pa.Table:
    """The pseudolabel stage's batch function: signal rows -> pseudo-label rows of ``policy``
    (its default options); WPL with ``prototypes`` float32[C, D] and ``detections``."""
    cfg = PseudolabelConfig(policy=policy).model_dump()
    return label_batch(signals, cfg, prototypes, detections)


def _student(arch: str, num_classes: int, size: int, batch: int, device: torch.device) -> Learner:
    """A student learner (threshold policy, the config's defaults otherwise) taking ``batch``
    labeled and ``batch`` unlabeled images a step."""
    cfg = StudentConfig(arch=arch, batch_size=batch, unlabeled_batch_size=batch, steps=1_000_000)
    return new_learner(cfg, num_classes=num_classes, crop_size=size, seed=0, device=device)


def _student_step(
    learner: Learner,
    labeled: dict[str, torch.Tensor],
    unlabeled: dict[str, torch.Tensor],
    step: int,
) -> None:
    train_step(learner, labeled, unlabeled, step)


def _step_views(batch: int) -> int:
    """Images ``train_step`` forwards (threshold policy): the labeled weak view and two strong
    views of the unlabeled batch."""
    return 3 * batch


def _training_parts(learner: Learner) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    """The learner's network, its optimizer, and whether it trains under float16 autocast."""
    return learner.model, learner.optimizer, learner.scaler.is_enabled()


def _with_network(learner: Learner, network: nn.Module) -> Learner:
    """The same learner training ``network`` instead (a fresh AdamW over its parameters)."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=learner.cfg.lr)
    return dataclasses.replace(learner, model=network, optimizer=optimizer)


def _unlabeled_arrays(rows: pa.Table, pngs: list[bytes], size: int) -> dict[str, torch.Tensor]:
    """Pseudo-label rows joined with their images' PNGs, as the student's Ray Data step
    makes them (what ``iter_torch_batches`` then yields)."""
    batch = {name: np.asarray(rows[name].to_pylist(), dtype=object) for name in rows.column_names}
    batch["image"] = np.asarray(pngs, dtype=object)
    arrays = pseudolabel_rows_to_arrays(batch, size)
    return {name: torch.from_numpy(value) for name, value in arrays.items()}


def parquet_bytes(table: pa.Table) -> int:
    """Size of ``table`` written as the stages write their shards (zstd Parquet)."""
    return len(_parquet(table))


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def column_bytes(parquet: bytes) -> dict[str, int]:
    """Compressed bytes of each column of a Parquet file (its row groups' metadata)."""
    meta = pq.ParquetFile(io.BytesIO(parquet)).metadata
    sizes: dict[str, int] = {}
    for group in range(meta.num_row_groups):
        for index in range(meta.num_columns):
            column = meta.row_group(group).column(index)
            name = column.path_in_schema
            sizes[name] = sizes.get(name, 0) + column.total_compressed_size
    return sizes


# ------------------------------------------------------------------------------ plan, results
POLICIES = ("threshold", "s4mc", "csl", "wpl")
REFERENCE_PIXELS = 512 * 512  # where the per-image CPU goals are set (1.5 ms)
BENCH_NAME = "throughput"


@dataclass(frozen=True)
class Plan:
    device: str
    arch: str
    size: int
    classes: int
    batch: int
    reps: int
    quick: bool
    seed: int = 0

    @property
    def pixels(self) -> int:
        return self.batch * self.size * self.size


def make_plan(
    *,
    quick: bool,
    device: str,
    arch: str = "lraspp_mobilenet_v3_large",
    size: int | None = None,
    classes: int = 21,
    batch: int | None = None,
    reps: int | None = None,
) -> Plan:
    """Defaults: 512² images, 8 a batch, 5 repetitions; quick: 64², 2 a batch, 2 repetitions."""
    return Plan(
        device=device,
        arch=arch,
        size=size or (64 if quick else 512),
        classes=classes,
        batch=batch or (2 if quick else 8),
        reps=reps or (2 if quick else 5),
        quick=quick,
    )


@dataclass(frozen=True)
class Goal:
    bound: float
    at_least: bool  # the value must be >= bound (else <= bound)
    unit: str = ""

    def __str__(self) -> str:
        sign = ">=" if self.at_least else "<="
        return f"{sign} {self.bound:.4g}{' ' + self.unit if self.unit else ''}"

    def met(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.bound if self.at_least else value <= self.bound


@dataclass(frozen=True)
class Measure:
    value: float | None  # None: not measured (the detail says why)
    goal: Goal
    detail: str


def as_json(results: dict[str, Measure]) -> dict[str, dict[str, Any]]:
    return {
        key: {"value": m.value, "goal": str(m.goal), "detail": m.detail}
        for key, m in results.items()
    }


def format_table(results: dict[str, Measure], plan: Plan) -> str:
    width = max(len(key) for key in results)
    lines = [
        f"throughput: {plan.arch}, {plan.batch} images of {plan.size}x{plan.size} px a batch, "
        f"{plan.classes} classes, median of {plan.reps}, {plan.device}, "
        f"{torch.get_num_threads()} torch threads",
        f"{'key':<{width}} {'value':>10} {'goal':>14} {'met':>4}  detail",
    ]
    for key, m in results.items():
        value = "null" if m.value is None else f"{m.value:.4g}"
        met = "yes" if m.goal.met(m.value) else "no"
        lines.append(f"{key:<{width}} {value:>10} {m.goal!s:>14} {met:>4}  {m.detail}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ synthetic data
def peaked_logits(
    count: int,
    num_classes: int,
    size: int,
    *,
    generator: torch.Generator,
    cells: int = 8,
    margin: float = 12.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained-looking teacher output: logits ``float32[count, C, size, size]`` and the class
    of each region, ``int64[count, cells, cells]``.

    Each image is ``cells`` x ``cells`` regions of random classes; their one-hot logits times
    ``margin``, made at 32 x 32 and upsampled bilinearly, are peaked inside a region (conf
    1 / (1 + (C - 1) e^-margin)) and soft across its border (a band of size/32 pixels where two
    classes' logits cross): from 256² up, about 89 % of the pixels have conf > 0.95 (at 64², where
    the band is 2 pixels, 99 %).
    """
    grid = torch.randint(num_classes, (count, cells, cells), generator=generator)
    side = min(32, size)
    coarse = F.interpolate(grid[:, None].float(), size=(side, side), mode="nearest")
    onehot = F.one_hot(coarse[:, 0].long(), num_classes).permute(0, 3, 1, 2).float()
    logits = F.interpolate(onehot * margin, size=(size, size), mode="bilinear", align_corners=False)
    return logits.contiguous(), grid


def region_labels(grid: torch.Tensor, size: int) -> torch.Tensor:
    """The region classes of :func:`peaked_logits` at pixel resolution: ``int64[B, size, size]``."""
    return F.interpolate(grid[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def synthetic_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``uint8[B, 3, S, S]``: a random colour per class over ``labels`` (int64[B, S, S]), plus
    noise."""
    colours = torch.randint(0, 256, (int(labels.max()) + 1, 3), generator=generator)
    noise = torch.randint(-24, 25, (*labels.shape, 3), generator=generator)
    images = (colours[labels] + noise).clamp(0, 255).to(torch.uint8)
    return images.permute(0, 3, 1, 2).contiguous()


def image_batch(images: torch.Tensor, first: int = 0) -> dict[str, np.ndarray]:
    """The batch the inference stages' CPU step hands their predictors (unlabeled images)."""
    count, _, height, width = images.shape
    return {
        "image_id": np.array([f"{first + i:016x}" for i in range(count)]),
        "height": np.full(count, height),
        "width": np.full(count, width),
        "extent": np.tile(np.array([height, width], np.int32), (count, 1)),
        "image": images.numpy(),
        "split": np.full(count, "unlabeled"),
        "mask": np.full(count, None, dtype=object),
    }


# ------------------------------------------------------------------------------ networks
class _Replay(torch.autograd.Function):
    """Stored logits as the output of a scalar parameter, free both ways (its gradient is 0)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.new_zeros(()), None


class _ReplayHead(nn.Conv2d):
    """Where ``feature_layer`` looks (LRASPP's ``high_classifier``): its input is the
    classifier's features, its output the first len(input) stored logits, whatever the input."""

    logits: torch.Tensor

    def __init__(self, logits: torch.Tensor, dim: int):
        super().__init__(dim, logits.shape[1], 1)
        self.register_buffer("logits", logits)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Replay.apply(self.anchor, self.logits[: len(features)])
        return out


class _ReplayClassifier(nn.Module):
    def __init__(self, head: _ReplayHead):
        super().__init__()
        self.high_classifier = head


class ReplayNetwork(nn.Module):
    """A zero-cost stand-in for a segmentation network with the real output shapes: for a batch
    of B images it returns ``{"out": logits[:B]}`` (float32[B, C, S, S], differentiable at no
    cost) and its classifier head sees ``features[:B]`` (float[B, D, h, w]), as the teacher's
    classifier does."""

    features: torch.Tensor

    def __init__(self, logits: torch.Tensor, features: torch.Tensor):
        super().__init__()
        self.classifier = _ReplayClassifier(_ReplayHead(logits, features.shape[1]))
        self.register_buffer("features", features)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.classifier.high_classifier(self.features[: len(images)])}


@torch.no_grad()
def trained_looking(model: nn.Module, images: torch.Tensor, margin: float = 8.0) -> float:
    """Make a random segmenter's activations and confidence those of a trained one: BatchNorm
    statistics of one pass over ``images`` (normalised float[B, 3, S, S]; with the initial
    ones a deep random network's activations fade to ~1e-9), then the head's classifier
    convolutions (those with C outputs) scaled so that the median top-1 - top-2 logit margin is
    ``margin``. Returns the fraction of pixels with conf > 0.95 after; ``model`` is in eval
    mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: exactly this pass's batch statistics
        norm.train()
    logits = segment_logits(model, images)
    model.eval()
    top2 = segment_logits(model, images).topk(2, dim=1).values
    scale = margin / float((top2[:, 0] - top2[:, 1]).median().clamp(min=1e-6))
    head: nn.Module = getattr(model, "classifier", model)
    for conv in head.modules():
        if isinstance(conv, nn.Conv2d) and conv.out_channels == logits.shape[1]:
            conv.weight.mul_(scale)
            if conv.bias is not None:
                conv.bias.mul_(scale)
    conf = segment_logits(model, images).softmax(dim=1).amax(dim=1)
    return float((conf > 0.95).float().mean())


# ------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    calls: dict[str, Callable[[], object]], reps: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each call: a warm-up call each, then all of them in turn ``reps``
    times (so that load on the machine falls on all alike); CUDA work is waited for."""
    for call in calls.values():
        call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def _cpu_goal(plan: Plan) -> Goal:
    """1.5 ms per 512² image, in proportion to the pixels elsewhere."""
    return Goal(1.5 * plan.size * plan.size / REFERENCE_PIXELS, False, "ms")


# ------------------------------------------------------------------------------ labeling
@torch.inference_mode()
def bare_labels(
    model: nn.Module, images: np.ndarray, device: torch.device, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bare forward: ``images`` uint8[B, 3, S, S] -> label int64[B, S, S] and conf
    float[B, S, S] on the host (normalise, forward under ``dtype`` autocast, softmax, max,
    ``.cpu()``)."""
    x = data.normalize(torch.from_numpy(images).to(device))
    if dtype is not None:  # as the predictor runs under autocast: channels-last
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = segment_logits(model, x)
    conf, label = logits.float().softmax(dim=1).max(dim=1)
    return label.cpu(), conf.cpu()


def labeling(
    teacher: nn.Module, batch: dict[str, np.ndarray], plan: Plan, confident: float
) -> tuple[Measure, float]:
    """``labeling_ratio``, and the bare forward's milliseconds per image."""
    device = torch.device(plan.device)
    predictor, dtype = _teacher_predictor(teacher, device)
    seconds = alternate(
        {
            "predictor": lambda: predictor(batch),
            "bare": lambda: bare_labels(teacher, batch["image"], device, dtype),
        },
        plan.reps,
        device,
    )
    per_image = {name: s * 1000 / plan.batch for name, s in seconds.items()}
    detail = (
        f"teach predictor {per_image['predictor']:.2f} ms/image (rows out), bare forward "
        f"{per_image['bare']:.2f} ms/image (label and conf to host), {dtype or torch.float32}; "
        f"{confident:.0%} of the network's pixels at conf > 0.95"
    )
    goal = Goal(0.8 if device.type == "cuda" else 0.9, True)
    return Measure(seconds["bare"] / seconds["predictor"], goal, detail), per_image["bare"]


def labeling_overhead(replay: ReplayNetwork, batch: dict[str, np.ndarray], plan: Plan) -> Measure:
    """``labeling_cpu_ms_per_image``."""
    device = torch.device(plan.device)
    predictor, _ = _teacher_predictor(replay, device)
    start = time.process_time()
    seconds = alternate({"replay": lambda: predictor(batch)}, plan.reps, device)["replay"]
    cpu_ms = (time.process_time() - start) * 1000 / ((plan.reps + 1) * plan.batch)
    detail = (
        f"the teach predictor around a zero-cost network replaying a peaked field: wall-clock "
        f"ms/image; process CPU {cpu_ms:.2f} ms/image over {torch.get_num_threads()} threads"
    )
    return Measure(seconds * 1000 / plan.batch, _cpu_goal(plan), detail)


def bytes_per_pixel(
    table: pa.Table, plan: Plan, bound: float, what: str, note: str = ""
) -> Measure:
    """Parquet (zstd) bytes of ``table`` per pixel, with its three largest columns'."""
    parquet = _parquet(table)
    columns = column_bytes(parquet)
    largest = sorted(columns, key=lambda name: -columns[name])[:3]
    shares = ", ".join(f"{name} {columns[name] / plan.pixels:.3f}" for name in largest)
    detail = f"{len(parquet)} bytes of {plan.batch} {what} (zstd Parquet); {shares}{note}"
    return Measure(len(parquet) / plan.pixels, Goal(bound, False, "B/px"), detail)


# ------------------------------------------------------------------------------ detect
@torch.inference_mode()
def bare_detections(
    model: nn.Module, backend: Any, images: np.ndarray, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """The detector's forward: uint8[B, 3, S, S] -> its outputs (boxes, labels, scores) on the
    host."""
    inputs = [torch.from_numpy(image).to(device).float() / 255.0 for image in images]
    return [{k: v.cpu() for k, v in out.items()} for out in backend.predict(model, inputs)]


def detect_ratio(images: torch.Tensor, plan: Plan) -> Measure:
    """``detect_ratio``: the detect predictor against its detector's forward. The detector is
    the stage's default (torchvision) at its default size (quick: 64), random weights made to
    keep boxes as ``pseudoflow bench detectors`` makes them (every RoI scoring each class 1/C,
    so at most 19 classes pass the 0.05 cut)."""
    from pipeline.bench import calibrate_batchnorm, uniform_class_scores
    from stages.core.detectors import detector_backend

    device = torch.device(plan.device)
    cfg = DetectorConfig.model_validate({"min_size": 64} if plan.quick else {})
    args = detector_args(cfg, min(plan.classes, 19))
    torch.manual_seed(plan.seed)
    model = build_detector(**args)
    uniform_class_scores(model, cfg.backend)
    calibrate_batchnorm(model, cfg.backend, list(images.float() / 255.0))
    predictor, backend = _detector_predictor(model, args, device), detector_backend(cfg.backend)
    batch = image_batch(images)
    seconds = alternate(
        {
            "predictor": lambda: predictor(batch),
            "bare": lambda: bare_detections(model, backend, batch["image"], device),
        },
        plan.reps,
        device,
    )
    ms = {name: s * 1000 / plan.batch for name, s in seconds.items()}
    detail = (
        f"detect predictor {ms['predictor']:.2f} ms/image, bare detector forward "
        f"{ms['bare']:.2f} ms/image ({cfg.backend} {cfg.arch}, min_size {cfg.min_size})"
    )
    return Measure(seconds["bare"] / seconds["predictor"], Goal(0.9, True), detail)


# ------------------------------------------------------------------------------ pseudolabel
def wpl_inputs(
    batch: dict[str, np.ndarray], grid: torch.Tensor, dim: int, plan: Plan
) -> dict[str, Any]:
    """WPL's prototypes (float32[C, D], random; class 0 without one) and a detections table:
    per image a box of score 0.99 round each of up to 4 object regions of the field."""
    generator = torch.Generator().manual_seed(plan.seed + 1)
    prototypes = torch.randn(plan.classes, dim, generator=generator).numpy()
    prototypes[0] = np.nan
    cells = grid.shape[-1]
    step = plan.size / cells
    rows = []
    for image_id, classes in zip(batch["image_id"], grid.tolist(), strict=True):
        found = [(r, c, k) for r, row in enumerate(classes) for c, k in enumerate(row) if k > 0]
        boxes = [[c * step, r * step, (c + 1) * step, (r + 1) * step] for r, c, _ in found[:4]]
        rows.append(
            {
                "image_id": str(image_id),
                "boxes": [v for box in boxes for v in box],
                "labels": [k for _, _, k in found[:4]],
                "scores": [0.99] * len(boxes),
            }
        )
    return {"prototypes": prototypes, "detections": _detections_table(rows)}


def pseudolabel_costs(
    signals: dict[str, pa.Table], wpl: dict[str, Any], plan: Plan, bare_ms: float
) -> tuple[dict[str, Measure], pa.Table]:
    """``pseudolabel_ms_per_image.<policy>`` for every policy, each on the signal rows made for
    it (``signals``: policy -> rows), and the threshold policy's rows. The stage's batch
    function runs on CPU whatever the device."""

    def call(policy: str) -> Callable[[], object]:
        extras = wpl if policy == "wpl" else {}
        return lambda: _label_rows(signals[policy], policy, **extras)

    calls = {policy: call(policy) for policy in POLICIES}
    seconds = alternate(calls, plan.reps, torch.device("cpu"))
    goal = Goal(0.05 * bare_ms, False, "ms")
    detail = (
        f"label_batch on {plan.batch} signal rows, per image; goal: 5% of the teacher's bare "
        f"forward ({bare_ms:.2f} ms/image on {plan.device})"
    )
    results = {
        f"pseudolabel_ms_per_image.{policy}": Measure(s * 1000 / plan.batch, goal, detail)
        for policy, s in seconds.items()
    }
    return results, _label_rows(signals["threshold"], "threshold")


# ------------------------------------------------------------------------------ student step
def bare_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    """Forward (float16 autocast where ``scaler`` is enabled), cross-entropy, backward, step."""
    with torch.autocast(images.device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
        logits = segment_logits(model, images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def step_costs(
    plan: Plan, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor]
) -> dict[str, Measure]:
    """``step_ratio`` and ``step_cpu_ms_per_image``."""
    device = torch.device(plan.device)
    learner = _student(plan.arch, plan.classes, plan.size, plan.batch, device)
    model, optimizer, amp = _training_parts(
        _student(plan.arch, plan.classes, plan.size, plan.batch, device)
    )
    views = _step_views(plan.batch)
    generator = torch.Generator().manual_seed(plan.seed + 2)
    pixels = torch.randint(0, 256, (views, 3, plan.size, plan.size), generator=generator)
    images = data.normalize(pixels).to(device, memory_format=torch.channels_last)
    labels = torch.randint(plan.classes, (views, plan.size, plan.size), generator=generator)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    steps = iter(range(1 << 30))
    seconds = alternate(
        {
            "train_step": lambda: _student_step(learner, labeled, unlabeled, next(steps)),
            "bare": lambda: bare_step(model, optimizer, scaler, images, labels.to(device)),
        },
        plan.reps,
        device,
    )
    logits, _ = peaked_logits(views, plan.classes, plan.size, generator=generator)
    replay = ReplayNetwork(logits, torch.zeros(views, 1, 1, 1)).to(device)
    stand_in = _with_network(learner, replay)
    replayed = alternate(
        {"replay": lambda: _student_step(stand_in, labeled, unlabeled, next(steps))},
        plan.reps,
        device,
    )["replay"]
    ms = {name: s * 1000 for name, s in seconds.items()}
    ratio_detail = (
        f"train_step {ms['train_step']:.1f} ms ({plan.batch} labeled + {plan.batch} unlabeled, "
        f"threshold), bare step {ms['bare']:.1f} ms ({views} views), amp {amp}"
    )
    cpu_detail = (
        f"train_step around a zero-cost network, wall-clock ms per unlabeled image "
        f"({replayed * 1000:.1f} ms a step of {plan.batch} + {plan.batch})"
    )
    return {
        "step_ratio": Measure(
            seconds["bare"] / seconds["train_step"],
            Goal(0.8 if device.type == "cuda" else 0.9, True),
            ratio_detail,
        ),
        "step_cpu_ms_per_image": Measure(replayed * 1000 / plan.batch, _cpu_goal(plan), cpu_detail),
    }


# ------------------------------------------------------------------------------ Ray actors
class RayTeacher:
    """Callable class for ``map_batches``: the teach predictor around a fresh network (warmed
    up in the constructor); returns, per image, when its batch's call started and finished."""

    def __init__(self, plan: Plan, threads: int):
        torch.set_num_threads(threads)
        torch.manual_seed(plan.seed)
        network = build_segmenter(arch=plan.arch, num_classes=plan.classes)
        self.predict, _ = _teacher_predictor(network, torch.device(plan.device))
        self.predict(image_batch(torch.zeros((1, 3, plan.size, plan.size), dtype=torch.uint8)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["image_id"])
        started = time.time()
        self.predict(
            {**batch, "split": np.full(count, "unlabeled"), "mask": np.full(count, None, object)}
        )
        finished = time.time()
        return {
            "image_id": batch["image_id"],
            "started": np.full(count, started),
            "finished": np.full(count, finished),
        }


def _ray_rate(images: torch.Tensor, plan: Plan, actors: int, threads: int) -> float:
    """Images/s of :class:`RayTeacher` on ``actors`` actors over 8 batches a actor: images over
    the span from the first call's start to the last call's end (actor start-up excluded)."""
    import ray

    count = 8 * plan.batch * actors
    items = [
        {
            "image_id": f"{i:016x}",
            "height": plan.size,
            "width": plan.size,
            "extent": np.array([plan.size, plan.size], np.int32),
            "image": image,
        }
        for i, image in enumerate(images[i % len(images)].numpy() for i in range(count))
    ]
    dataset = ray.data.from_items(items).materialize()
    rows = dataset.map_batches(
        RayTeacher,
        fn_constructor_kwargs={"plan": plan, "threads": threads},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=plan.batch,
        batch_format="numpy",
        num_cpus=threads,
        num_gpus=0.5 if plan.device == "cuda" else 0,  # both actors share one GPU
    ).take_all()
    span = max(r["finished"] for r in rows) - min(r["started"] for r in rows)
    return len(rows) / span


def actor_scaling(images: torch.Tensor, plan: Plan) -> Measure:
    """``actor_scaling``: teach images/s with 2 actors over 1 (each actor with half the CPUs'
    torch threads). Needs Ray; skipped with ``--quick``."""
    goal = Goal(1.7, True)
    if plan.quick:
        return Measure(None, goal, "skipped: --quick")
    try:
        import ray
    except ImportError as exc:
        return Measure(None, goal, f"skipped: ray cannot be imported ({exc})")
    threads = max(1, (os.cpu_count() or 2) // 2)
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=max(4, 2 * threads), include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        rates = {actors: _ray_rate(images, plan, actors, threads) for actors in (1, 2)}
    finally:
        if started:
            ray.shutdown()
    detail = (
        f"teach images/s through map_batches on an actor pool: 1 actor {rates[1]:.1f}, "
        f"2 actors {rates[2]:.1f}; {threads} torch threads an actor"
    )
    return Measure(rates[2] / rates[1], goal, detail)


# ------------------------------------------------------------------------------ the whole bench
def measure_throughput(plan: Plan) -> dict[str, Measure]:
    """Every key of the module docstring, in that order."""
    generator = torch.Generator().manual_seed(plan.seed)
    logits, grid = peaked_logits(plan.batch, plan.classes, plan.size, generator=generator)
    labels = region_labels(grid, plan.size)
    images = synthetic_images(labels, generator)
    batch = image_batch(images)
    results, replay, bare_ms = teach_measures(plan, logits, batch)
    stored, rows = stored_measures(plan, replay, batch, grid, bare_ms)
    results |= stored
    pngs = [codec.encode_png(image) for image in images.permute(0, 2, 3, 1).numpy()]
    labeled = {"image": images, "label": labels.to(torch.uint8), "weight": torch.ones(labels.shape)}
    results |= step_costs(plan, labeled, _unlabeled_arrays(rows, pngs, plan.size))
    results["actor_scaling"] = actor_scaling(images, plan)
    return results


def teach_measures(
    plan: Plan, logits: torch.Tensor, batch: dict[str, np.ndarray]
) -> tuple[dict[str, Measure], ReplayNetwork, float]:
    """``labeling_ratio``, ``detect_ratio`` and ``labeling_cpu_ms_per_image``; the stand-in
    teacher (``logits`` and the real teacher's features) and the bare forward's ms/image."""
    images = torch.from_numpy(batch["image"])
    torch.manual_seed(plan.seed)
    teacher = build_segmenter(arch=plan.arch, num_classes=plan.classes)
    confident = trained_looking(teacher, data.normalize(images))
    replay = ReplayNetwork(logits, teacher_features(teacher, images))
    results: dict[str, Measure] = {}
    results["labeling_ratio"], bare_ms = labeling(teacher, batch, plan, confident)
    results["detect_ratio"] = detect_ratio(images, plan)
    results["labeling_cpu_ms_per_image"] = labeling_overhead(replay, batch, plan)
    return results, replay, bare_ms


def stored_measures(
    plan: Plan,
    replay: ReplayNetwork,
    batch: dict[str, np.ndarray],
    grid: torch.Tensor,
    bare_ms: float,
) -> tuple[dict[str, Measure], pa.Table]:
    """The signal rows made for each policy by the teach predictor around ``replay``; their
    bytes, the pseudolabel stage's cost on them and its rows' bytes (threshold's, returned)."""
    device = torch.device(plan.device)
    tables = {p: _teacher_predictor(replay, device, p)[0](batch) for p in POLICIES}
    wpl_bytes = parquet_bytes(tables["wpl"]) / plan.pixels
    results = {
        "signals_bytes_per_pixel": bytes_per_pixel(
            tables["threshold"], plan, 0.5, "signal rows", f"; made for wpl: {wpl_bytes:.3f}"
        )
    }
    wpl = wpl_inputs(batch, grid, replay.features.shape[1], plan)
    costs, rows = pseudolabel_costs(tables, wpl, plan, bare_ms)
    results |= costs
    results["pseudolabels_bytes_per_pixel"] = bytes_per_pixel(
        rows, plan, 0.3, "threshold pseudo-label rows"
    )
    return results, rows


@torch.inference_mode()
def teacher_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classifier's input features of ``model`` (float[B, D, h, w]) for uint8 images."""
    from stages.core.models import segment_with_features

    return segment_with_features(model, data.normalize(images))[1].clone()


# ------------------------------------------------------------------------------ MLflow
def plot(results: dict[str, Measure]) -> bytes:
    """A bar per measured key: value / goal bound, green where the goal is met; PNG bytes."""
    from pipeline.figures import _png, _pyplot

    plt = _pyplot()
    shown = {key: m for key, m in results.items() if m.value is not None and m.goal.bound > 0}
    ratios = [max(m.value or 0.0, 1e-6) / m.goal.bound for m in shown.values()]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(shown) + 1.4))
    names = [f"{key} ({'>=' if m.goal.at_least else '<='})" for key, m in shown.items()]
    colours = ["tab:green" if m.goal.met(m.value) else "tab:red" for m in shown.values()]
    ax.barh(names, ratios, color=colours)
    ax.axvline(1.0, color="0.3", lw=1, ls="--")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("value / goal (>= goals met right of 1, <= goals left of it)")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return _png(fig)


def plan_params(plan: Plan) -> dict[str, str]:
    params = {key: str(value) for key, value in dataclasses.asdict(plan).items()}
    return params | {"torch_threads": str(torch.get_num_threads()), "torch": torch.__version__}


def log_results(uri: str, plan: Plan, results: dict[str, Measure], table: str) -> str:
    """One run of the ``pseudoflow-bench`` experiment: every measured value as a metric, the
    JSON, the table and :func:`plot` as artifacts. Returns the run's id."""
    import json

    from pipeline.tracking import artifact_location, log_benchmark

    metrics = {k: m.value for k, m in results.items() if m.value is not None}
    return log_benchmark(
        uri,
        name=f"{BENCH_NAME}-quick" if plan.quick else BENCH_NAME,
        params=plan_params(plan),
        metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
        files={
            "throughput.json": json.dumps(as_json(results), indent=2).encode(),
            "throughput.txt": table.encode(),
            "throughput.png": plot(results),
        },
        artifact_location=artifact_location(uri, _artifact_root(uri)),
    )


def _artifact_root(uri: str) -> str:
    """A SQLite store keeps its artifacts next to its database file; others under the cwd."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return os.path.dirname(os.path.abspath(uri[len(prefix) :]))
    return os.getcwd()
