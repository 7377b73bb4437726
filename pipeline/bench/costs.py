"""Benchmarks (``pseudoflow bench ...``): ratios measured side by side in one run.

``policies``: the per-image cost of each pseudo-label policy's math, on the same synthetic teacher
signals, and of the whole stored-row path (decode signals, policy, encode) that the pseudolabel
stage runs per image.

``step``: one training step (forward, loss, backward, AdamW) of the segmentation network as
torchvision builds it against the network as ``segtrain.new_learner`` trains it
(``fastconv.training_layout``), same weights, same batch.

``detectors``: the per-image cost of the detect stage's ``DetectorPredictor`` (uint8 images in,
detections rows out) with each detector backend's network, on the same synthetic images, the
backends timed alternately.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.core.fastconv import training_layout
from stages.core.models import build_segmenter, segment_logits
from stages.pseudolabel.config import SIGNAL_POLICIES, PseudolabelConfig
from stages.pseudolabel.maps import policy_maps
from stages.pseudolabel.table import encode_row
from stages.teach.table import SignalSpec, decode_signals, quantized_maps, stored_maps


@dataclass(frozen=True)
class PolicyCost:
    policy: str
    math_ms: float  # policy maps from probabilities, per image
    row_ms: float  # decode stored signals + policy + encode the stored row, per image


def _synthetic_image(
    size: int, num_classes: int, dim: int, generator: torch.Generator
) -> dict[str, Any]:
    """Peaked teacher probabilities, features at stride 8, and a few confident boxes."""
    logits = torch.randn(num_classes, size, size, generator=generator) * 4
    probs = logits.softmax(dim=0)
    stride = max(size // 8, 1)
    features = torch.rand(dim, stride, stride, generator=generator)
    features = torch.nn.functional.interpolate(
        features[None], size=(size, size), mode="bilinear", align_corners=False
    )[0]
    box_masks = torch.zeros(num_classes, size, size, dtype=torch.bool)
    for c in range(1, num_classes):
        box_masks[c, : size // 2, (c - 1) * size // num_classes : c * size // num_classes] = True
    return {"probs": probs, "features": features, "box_masks": box_masks}


def _per_image_ms(fn: Callable[[dict[str, Any]], object], images: list[dict[str, Any]]) -> float:
    fn(images[0])  # warm-up
    start = time.perf_counter()
    for image in images:
        fn(image)
    return (time.perf_counter() - start) * 1000 / len(images)


def policy_costs(
    *, size: int, num_classes: int, images: int, dim: int = 128, seed: int = 0
) -> list[PolicyCost]:
    """Per-image milliseconds of every policy on ``images`` synthetic ``size``² images."""
    generator = torch.Generator().manual_seed(seed)
    samples = [_synthetic_image(size, num_classes, dim, generator) for _ in range(images)]
    spec = SignalSpec(margins=True, dispersion=True, features=True)  # every policy's
    for sample in samples:
        maps = quantized_maps(sample["probs"][None], spec)[:, 0].numpy()
        sample["row"] = {"height": size, "width": size}
        sample["row"] |= {
            name: m.tobytes() for name, m in zip(stored_maps(spec), maps, strict=True)
        }
    prototypes = torch.rand(num_classes, dim, generator=generator)
    prototypes[0] = float("nan")  # a class without a prototype, as with background in practice
    costs = []
    for policy in SIGNAL_POLICIES:
        cfg = PseudolabelConfig(policy=policy)

        def math(sample: dict[str, Any], cfg: PseudolabelConfig = cfg) -> object:
            return policy_maps(cfg, sample["probs"], **_wpl_inputs(cfg, sample, prototypes))

        def row(sample: dict[str, Any], cfg: PseudolabelConfig = cfg) -> object:
            maps = policy_maps(
                cfg, decode_signals(sample["row"]), **_wpl_inputs(cfg, sample, prototypes)
            )
            return encode_row(cfg, "x", maps)

        costs.append(PolicyCost(policy, _per_image_ms(math, samples), _per_image_ms(row, samples)))
    return costs


def _wpl_inputs(
    cfg: PseudolabelConfig, sample: dict[str, Any], prototypes: torch.Tensor
) -> dict[str, torch.Tensor]:
    if cfg.policy != "wpl":
        return {}
    return {
        "box_masks": sample["box_masks"],
        "features": sample["features"],
        "prototypes": prototypes,
    }


def format_costs(costs: list[PolicyCost], *, size: int, num_classes: int) -> str:
    base = next(c for c in costs if c.policy == "threshold")
    lines = [
        f"policy math per image, {size}x{size} px, {num_classes} classes, "
        f"{torch.get_num_threads()} torch threads",
        f"{'policy':<10} {'math ms':>9} {'x thresh':>9} {'row ms':>9} {'x thresh':>9}",
    ]
    for c in costs:
        lines.append(
            f"{c.policy:<10} {c.math_ms:>9.2f} {c.math_ms / base.math_ms:>9.1f} "
            f"{c.row_ms:>9.2f} {c.row_ms / base.row_ms:>9.1f}"
        )
    lines.append("row = decode stored top-K signals + policy + encode the stored row")
    return "\n".join(lines)


def rows_as_dicts(costs: list[PolicyCost]) -> list[dict[str, float | str]]:
    return [{"policy": c.policy, "math_ms": c.math_ms, "row_ms": c.row_ms} for c in costs]


@dataclass(frozen=True)
class StepCost:
    stock_ms: float  # per step, the network as torchvision builds it
    ours_ms: float  # per step, as the learner trains it
    swapped: int  # dilated depthwise layers given the faster backward
    gradient_error: float  # largest |difference| of one step's gradients / largest |gradient|


def step_cost(
    *, arch: str, size: int, batch: int, num_classes: int, steps: int, seed: int = 0
) -> StepCost:
    """Milliseconds per step of both networks, timed in alternating halves after a warm-up,
    and how far their first step's gradients differ."""
    torch.manual_seed(seed)
    stock = build_segmenter(arch=arch, num_classes=num_classes)
    ours = build_segmenter(arch=arch, num_classes=num_classes)
    ours.load_state_dict(stock.state_dict())
    ours, swapped = training_layout(ours, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, num_classes, (batch, size, size), generator=generator)
    inputs = {"stock": images, "ours": images.contiguous(memory_format=torch.channels_last)}
    models = {"stock": stock, "ours": ours}
    grads = {name: _gradients(model, inputs[name], labels) for name, model in models.items()}
    scale = max(float(g.abs().max()) for g in grads["stock"])
    error = max(
        float((a - b).abs().max()) for a, b in zip(grads["stock"], grads["ours"], strict=True)
    )
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    seconds = dict.fromkeys(models, 0.0)
    for half in (steps // 2, steps - steps // 2):
        for name, model in models.items():
            _step(model, optimizers[name], inputs[name], labels)  # warm-up
            start = time.perf_counter()
            for _ in range(half):
                _step(model, optimizers[name], inputs[name], labels)
            seconds[name] += time.perf_counter() - start
    per_step = {name: value * 1000 / steps for name, value in seconds.items()}
    return StepCost(per_step["stock"], per_step["ours"], swapped, error / scale)


def _gradients(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> list[torch.Tensor]:
    model.train()
    loss = F.cross_entropy(segment_logits(model, images), labels)
    return list(torch.autograd.grad(loss, list(model.parameters())))


def _step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    loss = F.cross_entropy(segment_logits(model, images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def format_step(cost: StepCost, *, arch: str, size: int, batch: int) -> str:
    return "\n".join(
        [
            f"one training step of {arch}, {batch} images of {size}x{size} px, "
            f"{torch.get_num_threads()} torch threads",
            f"{'network':<44} {'ms/step':>9}",
            f"{'as torchvision builds it':<44} {cost.stock_ms:>9.1f}",
            f"{'as pseudoflow trains it':<44} {cost.ours_ms:>9.1f}",
            f"speed-up x{cost.stock_ms / cost.ours_ms:.2f}; {cost.swapped} dilated depthwise "
            f"layers swapped; gradients differ by {cost.gradient_error:.1e} of the largest",
        ]
    )


@dataclass(frozen=True)
class DetectorCost:
    backend: str
    arch: str
    ms_per_image: float  # median over repetitions of one DetectorPredictor call / its images
    ratio: float  # ms_per_image / that of the first row (torchvision's)
    boxes_per_image: float  # detections kept per image (all RoIs score alike: NMS, max_detections)


def detector_costs(
    models: Sequence[tuple[str, str]],
    *,
    size: int,
    batch: int,
    min_size: int,
    num_classes: int,
    reps: int,
    device: str = "cpu",
    seed: int = 0,
) -> list[DetectorCost]:
    """Per-image milliseconds of ``DetectorPredictor`` around each ``(backend, arch)`` detector
    (random weights, built as ``train_detector`` builds it with ``min_size``), on one batch of
    ``batch`` synthetic ``size``² images. After a warm-up call each, the models are called in
    turn ``reps`` times (so that load on the machine falls on all of them alike); each one's
    cost is its median call over ``batch``. Ratios are to the first model's.

    Random weights are made to do a trained network's work: BatchNorm statistics from the bench
    images (``calibrate_batchnorm``; with the initial ones a deep random ResNet's activations
    grow until every box is degenerate and dropped), and every box classifier scoring all RoIs
    alike, above the 0.05 cut (``uniform_class_scores``; random heads keep anywhere from no box
    to all of them)."""
    from stages.core.models import build_detector
    from stages.detect.predictor import DetectorPredictor
    from stages.train_detector.config import DetectorConfig, detector_args

    rng = np.random.default_rng(seed)
    images = {
        "image_id": np.array([f"{i:04d}" for i in range(batch)]),
        "height": np.full(batch, size),
        "width": np.full(batch, size),
        "extent": np.full((batch, 2), size, np.int32),
        "image": rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8),
    }
    predictors = []
    for backend, arch in models:
        torch.manual_seed(seed)
        cfg = DetectorConfig.model_validate(
            {"backend": backend, "arch": arch, "min_size": min_size}
        )
        args = detector_args(cfg, num_classes)
        model = build_detector(**args)
        uniform_class_scores(model, backend)
        calibrate_batchnorm(model, backend, [torch.from_numpy(i) / 255.0 for i in images["image"]])
        predictors.append(DetectorPredictor.of_model(model, args, 0.05, torch.device(device)))
    boxes = [float(np.mean(p(images)["num_boxes"].to_numpy())) for p in predictors]  # warm-up
    seconds: list[list[float]] = [[] for _ in predictors]
    for _ in range(reps):
        for times, predictor in zip(seconds, predictors, strict=True):
            start = time.perf_counter()
            predictor(images)
            times.append(time.perf_counter() - start)
    per_image = [statistics.median(t) * 1000 / batch for t in seconds]
    return [
        DetectorCost(backend, arch, ms, ms / per_image[0], n)
        for (backend, arch), ms, n in zip(models, per_image, boxes, strict=True)
    ]


def uniform_class_scores(model: torch.nn.Module, backend: str) -> None:
    """Zero the RoI box classifier's weights and biases: every RoI scores each class (and
    background) 1/C, so every (RoI, class) pair passes the backends' 0.05 cut for C < 20. The
    classifier is ``roi_heads.box_predictor.cls_score`` of torchvision's FasterRCNN and of the
    GeneralizedRCNN inside the detectron2 backend's detector."""
    inner: Any = model.rcnn if backend == "detectron2" else model
    layer = inner.roi_heads.box_predictor.cls_score
    if not isinstance(layer, torch.nn.Linear):
        raise TypeError(f"{backend} box classifier is a {type(layer).__name__}, not a Linear")
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()


def calibrate_batchnorm(model: torch.nn.Module, backend: str, images: list[torch.Tensor]) -> None:
    """Set every BatchNorm layer's running statistics to those of one prediction pass over
    ``images`` (float[3, H, W] in [0, 1]); the model is left in eval mode."""
    from stages.core.detectors import detector_backend

    model.eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: exactly this pass's batch statistics
        norm.train()
    with torch.no_grad():
        detector_backend(backend).predict(model, images)
    for norm in norms:
        norm.eval()


def format_detector_costs(
    costs: list[DetectorCost],
    *,
    size: int,
    batch: int,
    min_size: int,
    reps: int,
    device: str,
    skipped: Sequence[str] = (),
) -> str:
    width = max(len(c.arch) for c in costs)
    lines = [
        f"DetectorPredictor per image: {batch} images of {size}x{size} px a call, detector size "
        f"{min_size}, median of {reps} calls, {device}, {torch.get_num_threads()} torch threads",
        f"{'backend':<12} {'arch':<{width}} {'ms/image':>9} {'ratio':>6} {'boxes/image':>11}",
    ]
    for c in costs:
        lines.append(
            f"{c.backend:<12} {c.arch:<{width}} {c.ms_per_image:>9.1f} {c.ratio:>6.2f} "
            f"{c.boxes_per_image:>11.1f}"
        )
    lines.append(
        "ratio = ms/image / torchvision's; random weights, BatchNorm statistics of these images, "
        "every RoI scoring each class 1/C"
    )
    lines.extend(skipped)
    return "\n".join(lines)
