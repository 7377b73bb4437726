"""Benchmarks (``pseudoflow bench ...``): ratios measured side by side in one run.

``policies``: the per-image cost of each pseudo-label policy's math, on the same synthetic teacher
signals, and of the whole stored-row path (decode signals, policy, encode) that the pseudolabel
stage runs per image.

``step``: one training step (forward, loss, backward, AdamW) of the segmentation network as
torchvision builds it against the network as ``segtrain.new_learner`` trains it
(``fastconv.training_layout``), same weights, same batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from stages.core.fastconv import training_layout
from stages.core.models import build_segmenter, segment_logits
from stages.pseudolabel.stage import POLICIES, PseudolabelConfig, encode_row, policy_maps
from stages.teach import decode_signals, encode_signals, full_probs


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
    for sample in samples:
        indices, probs, k = encode_signals(sample["probs"], None)
        sample["row"] = {
            "topk": k,
            "height": size,
            "width": size,
            "topk_index": indices,
            "topk_prob": probs,
        }
    prototypes = torch.rand(num_classes, dim, generator=generator)
    prototypes[0] = float("nan")  # a class without a prototype, as with background in practice
    costs = []
    for policy in POLICIES:
        cfg = PseudolabelConfig(policy=policy)

        def math(sample: dict[str, Any], cfg: PseudolabelConfig = cfg) -> object:
            return policy_maps(cfg, sample["probs"], **_wpl_inputs(cfg, sample, prototypes))

        def row(sample: dict[str, Any], cfg: PseudolabelConfig = cfg) -> object:
            probs = full_probs(*decode_signals(sample["row"]), num_classes)
            maps = policy_maps(cfg, probs, **_wpl_inputs(cfg, sample, prototypes))
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
