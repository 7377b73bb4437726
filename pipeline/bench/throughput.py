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

The modules: ``timing`` (plan, goals, measures, alternation), ``synthetic`` (trained-looking
inputs and networks), ``adapters`` (every call into a stage), ``paths`` (each path against the
bare network) and this one (the whole bench, its plot and its MLflow run).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from pipeline.bench.adapters import (
    parquet_bytes,
    teacher_predictor,
    unlabeled_arrays,
)
from pipeline.bench.paths import (
    actor_scaling,
    bytes_per_pixel,
    detect_ratio,
    labeling,
    labeling_overhead,
    pseudolabel_costs,
    step_costs,
    wpl_inputs,
)
from pipeline.bench.synthetic import (
    ReplayNetwork,
    image_batch,
    peaked_logits,
    region_labels,
    synthetic_images,
    trained_looking,
)
from pipeline.bench.timing import BENCH_NAME, POLICIES, Measure, Plan, as_json
from stages.core import codec, data
from stages.core.models import build_segmenter


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
    results |= step_costs(plan, labeled, unlabeled_arrays(rows, pngs, plan.size))
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
    tables = {p: teacher_predictor(replay, device, p)[0](batch) for p in POLICIES}
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


def plot(results: dict[str, Measure]) -> bytes:
    """A bar per measured key: value / goal bound, green where the goal is met; PNG bytes."""
    from pipeline.figures import figure_png, pyplot

    plt = pyplot()
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
    return figure_png(fig)


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
