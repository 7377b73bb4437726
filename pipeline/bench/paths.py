"""Each path of the project timed against the bare network: labeling, detection, the pseudolabel
stage, the student step, and the teach actors under Ray."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.bench.adapters import (
    column_bytes,
    detections_table,
    detector_predictor,
    label_rows,
    step_views,
    student,
    student_step,
    teacher_predictor,
    training_parts,
    with_network,
    zstd_parquet,
)
from pipeline.bench.synthetic import ReplayNetwork, image_batch, peaked_logits
from pipeline.bench.timing import POLICIES, Goal, Measure, Plan, alternate, cpu_goal
from stages.core import data
from stages.core.models import build_detector, build_segmenter, segment_logits
from stages.train_detector.config import DetectorConfig, detector_args


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
    predictor, dtype = teacher_predictor(teacher, device)
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
    predictor, _ = teacher_predictor(replay, device)
    start = time.process_time()
    seconds = alternate({"replay": lambda: predictor(batch)}, plan.reps, device)["replay"]
    cpu_ms = (time.process_time() - start) * 1000 / ((plan.reps + 1) * plan.batch)
    detail = (
        f"the teach predictor around a zero-cost network replaying a peaked field: wall-clock "
        f"ms/image; process CPU {cpu_ms:.2f} ms/image over {torch.get_num_threads()} threads"
    )
    return Measure(seconds * 1000 / plan.batch, cpu_goal(plan), detail)


def bytes_per_pixel(
    table: pa.Table, plan: Plan, bound: float, what: str, note: str = ""
) -> Measure:
    """Parquet (zstd) bytes of ``table`` per pixel, with its three largest columns'."""
    parquet = zstd_parquet(table)
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
    from pipeline.bench.costs import calibrate_batchnorm, uniform_class_scores
    from stages.core.detectors import detector_backend

    device = torch.device(plan.device)
    cfg = DetectorConfig.model_validate({"min_size": 64} if plan.quick else {})
    args = detector_args(cfg, min(plan.classes, 19))
    torch.manual_seed(plan.seed)
    model = build_detector(**args)
    uniform_class_scores(model, cfg.backend)
    calibrate_batchnorm(model, cfg.backend, list(images.float() / 255.0))
    predictor, backend = detector_predictor(model, args, device), detector_backend(cfg.backend)
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
    return {"prototypes": prototypes, "detections": detections_table(rows)}


def pseudolabel_costs(
    signals: dict[str, pa.Table], wpl: dict[str, Any], plan: Plan, bare_ms: float
) -> tuple[dict[str, Measure], pa.Table]:
    """``pseudolabel_ms_per_image.<policy>`` for every policy, each on the signal rows made for
    it (``signals``: policy -> rows), and the threshold policy's rows. The stage's batch
    function runs on CPU whatever the device."""

    def call(policy: str) -> Callable[[], object]:
        extras = wpl if policy == "wpl" else {}
        return lambda: label_rows(signals[policy], policy, **extras)

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
    return results, label_rows(signals["threshold"], "threshold")


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
    learner = student(plan.arch, plan.classes, plan.size, plan.batch, device)
    model, optimizer, amp = training_parts(
        student(plan.arch, plan.classes, plan.size, plan.batch, device)
    )
    views = step_views(plan.batch)
    generator = torch.Generator().manual_seed(plan.seed + 2)
    pixels = torch.randint(0, 256, (views, 3, plan.size, plan.size), generator=generator)
    images = data.normalize(pixels).to(device, memory_format=torch.channels_last)
    labels = torch.randint(plan.classes, (views, plan.size, plan.size), generator=generator)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    steps = iter(range(1 << 30))
    seconds = alternate(
        {
            "train_step": lambda: student_step(learner, labeled, unlabeled, next(steps)),
            "bare": lambda: bare_step(model, optimizer, scaler, images, labels.to(device)),
        },
        plan.reps,
        device,
    )
    logits, _ = peaked_logits(views, plan.classes, plan.size, generator=generator)
    replay = ReplayNetwork(logits, torch.zeros(views, 1, 1, 1)).to(device)
    stand_in = with_network(learner, replay)
    replayed = alternate(
        {"replay": lambda: student_step(stand_in, labeled, unlabeled, next(steps))},
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
        "step_cpu_ms_per_image": Measure(replayed * 1000 / plan.batch, cpu_goal(plan), cpu_detail),
    }


# ------------------------------------------------------------------------------ Ray actors
class RayTeacher:
    """Callable class for ``map_batches``: the teach predictor around a fresh network (warmed
    up in the constructor); returns, per image, when its batch's call started and finished."""

    def __init__(self, plan: Plan, threads: int):
        torch.set_num_threads(threads)
        torch.manual_seed(plan.seed)
        network = build_segmenter(arch=plan.arch, num_classes=plan.classes)
        self.predict, _ = teacher_predictor(network, torch.device(plan.device))
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
