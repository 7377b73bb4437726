"""The report's figures, as PNG bytes: plain matplotlib on arrays the report has already read.

Every function takes numbers, never storage or MLflow, so each can be drawn (and tested) alone.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.core.data import IGNORE_INDEX

IGNORE_COLOUR = (255, 255, 255)


def palette() -> np.ndarray:
    """``uint8[256, 3]``: the Pascal VOC colour map (class c's colour from the bits of c), with
    ``IGNORE_INDEX`` white."""
    colours = np.zeros((256, 3), np.uint8)
    for c in range(256):
        value, r, g, b = c, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[c] = (r, g, b)
    colours[IGNORE_INDEX] = IGNORE_COLOUR
    return colours


def colour_labels(labels: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """labels: int[H, W]; keep: bool[H, W] or None -> ``uint8[H, W, 3]``, dropped pixels grey."""
    rgb = palette()[np.clip(labels, 0, 255).astype(np.int64)]
    if keep is not None:
        rgb = np.where(keep[..., None], rgb, np.uint8(96))
    return rgb


@dataclass(frozen=True)
class Sample:
    """One unlabeled image with what the policy stored for it (all at the image's size)."""

    image_id: str
    image: np.ndarray  # uint8[H, W, 3]
    truth: np.ndarray | None  # int[H, W], IGNORE_INDEX where unknown; None: no ground truth
    label: np.ndarray  # int[H, W]
    keep: np.ndarray  # bool[H, W]
    reliable: np.ndarray  # bool[H, W]: the policy's reliability mask
    weight: np.ndarray  # float[H, W], the training weight where kept (0 elsewhere)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay_grid(samples: Sequence[Sample], reliability_name: str, max_weight: float) -> bytes:
    """Rows: sample images; columns: image, ground truth, pseudo-label (dropped pixels grey),
    the policy's reliability mask, the per-pixel weight."""
    plt = _pyplot()
    titles = ["image", "ground truth", "pseudo-label (kept)", reliability_name, "weight"]
    rows = max(len(samples), 1)
    fig, axes = plt.subplots(
        rows, 5, figsize=(11, 2.2 * rows + 0.4), squeeze=False, layout="constrained"
    )
    for r, sample in enumerate(samples):
        truth = sample.truth
        panels = [
            sample.image,
            colour_labels(truth) if truth is not None else np.full_like(sample.image, 230),
            colour_labels(sample.label, sample.keep),
            sample.reliable.astype(np.float32),
        ]
        for c, panel in enumerate(panels):
            cmap = "gray" if c == 3 else None
            axes[r, c].imshow(panel, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        shown = axes[r, 4].imshow(
            np.where(sample.keep, sample.weight, np.nan),
            cmap="viridis",
            vmin=0.0,
            vmax=max_weight,
            interpolation="nearest",
        )
        axes[r, 0].set_ylabel(sample.image_id[:10], fontsize=8)
        if truth is None:
            axes[r, 1].text(
                0.5, 0.5, "none", ha="center", va="center", transform=axes[r, 1].transAxes
            )
    for c, title in enumerate(titles):
        axes[0, c].set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if samples:
        fig.colorbar(shown, ax=axes[:, 4].tolist(), shrink=0.6, label="weight")
    return _png(fig)


def quality_plot(
    curve: tuple[np.ndarray, np.ndarray] | None, points: dict[str, tuple[float, float]]
) -> bytes:
    """Coverage (x) against precision (y): the confidence-threshold sweep as a line (``curve``:
    coverage, precision arrays) and one marker per policy (name -> (coverage, precision))."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    if curve is not None:
        ax.plot(*curve, color="0.6", lw=1.5, label="confidence τ sweep")
    for name, (coverage, precision) in points.items():
        ax.scatter([coverage], [precision], s=50, zorder=3, label=name)
        ax.annotate(name, (coverage, precision), textcoords="offset points", xytext=(5, 4))
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (kept / labelled pixels)")
    ax.set_ylabel("precision (correct / kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _png(fig)


def weight_histograms(weights: dict[str, np.ndarray]) -> bytes:
    """One histogram per policy of its per-pixel weights over kept pixels (log counts)."""
    plt = _pyplot()
    n = max(len(weights), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    top = max([1.0, *(float(w.max()) for w in weights.values() if w.size)])
    for ax, (name, values) in zip(axes[0], weights.items(), strict=False):
        ax.hist(values, bins=40, range=(0.0, top), color="tab:blue")
        if values.size:  # log counts: the rare weights stay visible next to the common ones
            ax.set_yscale("log")
        ax.set_title(f"{name} ({values.size} px)", fontsize=9)
        ax.set_xlabel("weight")
    axes[0, 0].set_ylabel("kept pixels")
    fig.tight_layout()
    return _png(fig)


@dataclass(frozen=True)
class Span:
    """One stage of a run on the timeline."""

    stage: str
    start: float  # seconds after the run's first stage started
    seconds: float
    hit: bool


def timeline_plot(spans: Sequence[Span]) -> bytes:
    """Horizontal bars per stage from its start to its end; cache hits green, runs blue."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(spans), 1) + 1.2))
    for row, span in enumerate(reversed(spans)):
        colour = "tab:green" if span.hit else "tab:blue"
        ax.barh(row, max(span.seconds, 0.05), left=span.start, color=colour)
        label = f"{span.seconds:.1f} s" + (" (cache hit)" if span.hit else "")
        ax.text(span.start + span.seconds, row, " " + label, va="center", fontsize=8)
    ax.set_yticks(range(len(spans)), [s.stage for s in reversed(spans)])
    end = max([s.start + s.seconds for s in spans] or [1.0])
    ax.set_xlim(0, end * 1.25 + 1)
    ax.set_xlabel("seconds since the run started")
    fig.tight_layout()
    return _png(fig)
