"""The report's figures, as PNG bytes: plain matplotlib on arrays the report has already read.

Every function takes numbers, never storage or MLflow, so each can be drawn (and tested) alone.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.core.constants import IGNORE_INDEX

IGNORE_COLOUR = (255, 255, 255)
DROPPED_GREY = 96  # a pseudo-label's dropped pixels
MARGIN = 0.1  # of the data's span, around the points of the coverage/precision plot
MIN_SPAN = 0.05  # the narrowest axis that plot draws
HIST_BINS = 40


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
        rgb = np.where(keep[..., None], rgb, np.uint8(DROPPED_GREY))
    return rgb


def class_legend(names: Sequence[str], *, dropped: bool = False) -> list[tuple[str, np.ndarray]]:
    """(label, ``uint8[3]`` colour) for each class in order, then the ignored pixels' white and,
    with ``dropped``, the grey of the pixels a policy drops."""
    colours = palette()
    entries = [(name, colours[c]) for c, name in enumerate(names)]
    entries.append(("ignored", colours[IGNORE_INDEX]))
    if dropped:
        entries.append(("dropped", np.full(3, DROPPED_GREY, np.uint8)))
    return entries


def _add_legend(fig: Any, entries: Sequence[tuple[str, np.ndarray]]) -> None:
    """The class colours under a figure of label maps."""
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor="#{:02x}{:02x}{:02x}".format(*rgb.tolist()), edgecolor="0.4", label=name)
        for name, rgb in entries
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=8)


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


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (100 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay_grid(
    samples: Sequence[Sample],
    reliability_name: str,
    max_weight: float,
    class_names: Sequence[str],
) -> bytes:
    """Rows: sample images; columns: image, ground truth, pseudo-label (dropped pixels grey),
    the policy's reliability mask, the per-pixel weight; the class colours underneath."""
    plt = pyplot()
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
    _add_legend(fig, class_legend(class_names, dropped=True))
    return figure_png(fig)


@dataclass(frozen=True)
class Predicted:
    """One val image, its ground truth and each model's label map (all at the image's size)."""

    image_id: str
    image: np.ndarray  # uint8[H, W, 3]
    truth: np.ndarray  # int[H, W], IGNORE_INDEX where unknown
    labels: dict[str, np.ndarray]  # model name -> int[H, W]


def pixel_accuracy(labels: np.ndarray, truth: np.ndarray) -> float:
    """Share of the known pixels (truth != IGNORE_INDEX) labelled as in ``truth``."""
    known = truth != IGNORE_INDEX
    return float((labels[known] == truth[known]).mean()) if known.any() else float("nan")


def prediction_grid(rows: Sequence[Predicted], class_names: Sequence[str]) -> bytes:
    """Rows: val images; columns: image, ground truth, then each model's prediction titled
    with its pixel accuracy on that image; the class colours underneath."""
    plt = pyplot()
    models = list(rows[0].labels) if rows else []
    cols = 2 + len(models)
    fig, axes = plt.subplots(
        max(len(rows), 1),
        cols,
        figsize=(2.2 * cols + 0.4, 2.2 * max(len(rows), 1) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row.image, interpolation="nearest")
        axes[r, 1].imshow(colour_labels(row.truth), interpolation="nearest")
        for c, name in enumerate(models, start=2):
            axes[r, c].imshow(colour_labels(row.labels[name]), interpolation="nearest")
            accuracy = pixel_accuracy(row.labels[name], row.truth)
            axes[r, c].set_title(f"{name} (acc {accuracy:.2f})", fontsize=8)
        axes[r, 0].set_ylabel(row.image_id[:10], fontsize=8)
    for c, title in enumerate(["image", "ground truth"]):
        axes[0, c].set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    _add_legend(fig, class_legend(class_names))
    return figure_png(fig)


def fit_limits(
    values: Sequence[float], *, margin: float = MARGIN, min_span: float = MIN_SPAN
) -> tuple[float, float]:
    """Axis limits around ``values`` (shares in [0, 1]): their range, widened to at least
    ``min_span`` about its middle, plus ``margin`` of that span each side, kept within
    [-0.01, 1.01] (a point at 0 or 1 stays clear of the frame)."""
    lo, hi = float(min(values)), float(max(values))
    if hi - lo < min_span:
        middle = (lo + hi) / 2
        lo, hi = middle - min_span / 2, middle + min_span / 2
    pad = margin * (hi - lo)
    return max(lo - pad, -0.01), min(hi + pad, 1.01)


def quality_limits(
    curve: tuple[np.ndarray, np.ndarray] | None,
    points: dict[str, tuple[float, float]],
    *,
    min_coverage: float = 0.01,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(x, y) limits of the coverage/precision plot: around the policies' points and the sweep
    where it keeps at least ``min_coverage`` of the pixels (below that its precision is a few
    pixels' noise, drawn but not fitted)."""
    xs = [c for c, _ in points.values()]
    ys = [p for _, p in points.values()]
    if curve is not None:
        coverage, precision = curve
        shown = coverage >= min_coverage
        xs += coverage[shown].tolist()
        ys += precision[shown].tolist()
    if not xs:
        return (0.0, 1.01), (0.0, 1.01)
    return fit_limits(xs), fit_limits(ys)


def quality_plot(
    curve: tuple[np.ndarray, np.ndarray] | None, points: dict[str, tuple[float, float]]
) -> bytes:
    """Coverage (x) against precision (y): the confidence-threshold sweep as a line (``curve``:
    coverage, precision arrays) and one marker per policy (name -> (coverage, precision))."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    if curve is not None:
        ax.plot(*curve, color="0.6", lw=1.5, label="confidence τ sweep")
    for name, (coverage, precision) in points.items():
        ax.scatter([coverage], [precision], s=50, zorder=3, label=name)
        ax.annotate(name, (coverage, precision), textcoords="offset points", xytext=(5, 4))
    xlim, ylim = quality_limits(curve, points)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("coverage (kept / labelled pixels)")
    ax.set_ylabel("precision (correct / kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return figure_png(fig)


def weight_bins(values: np.ndarray, bins: int = HIST_BINS) -> np.ndarray | None:
    """Bin edges over the weights' own range, min to max; ``None`` when there is no range to
    bin (no values, or all equal: the histogram would be one uninformative bar)."""
    if values.size == 0 or float(values.min()) == float(values.max()):
        return None
    return np.linspace(float(values.min()), float(values.max()), bins + 1)


def weight_histograms(weights: dict[str, np.ndarray]) -> bytes:
    """One histogram per policy of its per-pixel weights over kept pixels (log counts), binned
    over that policy's own range; a policy whose kept pixels all weigh the same says so."""
    plt = pyplot()
    n = max(len(weights), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    for ax, (name, values) in zip(axes[0], weights.items(), strict=False):
        edges = weight_bins(values)
        ax.set_title(f"{name} ({values.size} px)", fontsize=9)
        ax.set_xlabel("weight")
        if edges is None:
            text = (
                f"all {values.size} kept pixels\nweigh {float(values[0]):.3g}"
                if values.size
                else "no kept pixels"
            )
            ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.hist(values, bins=edges, color="tab:blue")
        ax.set_yscale("log")  # the rare weights stay visible next to the common ones
    axes[0, 0].set_ylabel("kept pixels")
    fig.tight_layout()
    return figure_png(fig)


def training_curves(
    histories: dict[str, dict[str, list[tuple[int, float]]]], notes: dict[str, str]
) -> bytes:
    """One panel per training stage: its losses (``loss*``) against step, and the learning rate
    (``lr``) on a right-hand axis; a stage's note is a second title line over its curves, or
    written in the panel when it has none. A loss that
    is 0 at every step (the teacher's ``loss_u``: no unlabeled data) is left out."""
    plt = pyplot()
    stages = list(dict.fromkeys([*histories, *notes]))
    n = max(len(stages), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=False):
        metrics = histories.get(stage, {})
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("step")
        losses = {k: v for k, v in metrics.items() if k.startswith("loss") and _nonzero(v)}
        for name, points in losses.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker=".", label=name)
        if losses:
            ax.set_ylabel("loss")
        lines = list(ax.get_lines())
        if metrics.get("lr"):
            steps, values = zip(*metrics["lr"], strict=True)
            right = ax.twinx()
            lines += right.plot(steps, values, color="0.5", ls="--", label="lr")
            right.set_ylabel("lr", color="0.4")
            right.set_ylim(bottom=0)
        if lines:  # one legend for both axes
            ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper right")
        note = notes.get(stage, "")
        if metrics and note:
            ax.set_title(f"{stage}\n{note}", fontsize=8)
        elif note:
            ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
    fig.tight_layout()
    return figure_png(fig)


def _nonzero(points: list[tuple[int, float]]) -> bool:
    return any(value != 0 for _, value in points)


@dataclass(frozen=True)
class Span:
    """One stage of a run on the timeline."""

    stage: str
    start: float  # seconds after the run's first stage started
    seconds: float
    hit: bool


def timeline_plot(spans: Sequence[Span]) -> bytes:
    """Horizontal bars per stage from its start to its end; cache hits green, runs blue."""
    plt = pyplot()
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
    return figure_png(fig)
