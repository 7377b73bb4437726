"""What ``bench throughput`` measures against what: the plan, the goals, the measures, and how
the things compared are timed (alternately, the median of repetitions)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

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


# ------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
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
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def cpu_goal(plan: Plan) -> Goal:
    """1.5 ms per 512² image, in proportion to the pixels elsewhere."""
    return Goal(1.5 * plan.size * plan.size / REFERENCE_PIXELS, False, "ms")
