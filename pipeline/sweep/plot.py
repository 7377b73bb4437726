"""The sweep's figure: each grid row's val mIoU against the reference rows and, where
``supervised`` ran, each row's gain over it paired by seed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.figures import figure_png, pyplot


def sweep_plot(rows: Sequence[dict[str, Any]]) -> bytes:
    """A sweep's table: val mIoU (mean ± std over seeds) per grid row as points, each reference
    row (supervised, full, ...) as a horizontal line; beside it, where a supervised row is in
    the sweep, each grid row's gain over it paired by seed (mean ± std of the per-seed
    differences) against a line at 0. The axes span the values, not 0..1, so that differences
    of a few hundredths show."""
    plt = pyplot()
    grid = [r for r in rows if not r["reference"] and r["miou_mean"] is not None]
    references = [r for r in rows if r["reference"] and r["miou_mean"] is not None]
    paired = [r for r in grid if r.get("gain_mean") is not None]
    width = max(4.5, 0.9 * len(grid) + 2.5)
    if paired:
        fig, (ax, gain_ax) = plt.subplots(1, 2, figsize=(2 * width, 4.2))
    else:
        fig, ax = plt.subplots(figsize=(width, 4.2))
    x = np.arange(len(grid))
    if grid:
        means = [r["miou_mean"] for r in grid]
        stds = [r["miou_std"] for r in grid]
        ax.errorbar(x, means, yerr=stds, fmt="o", capsize=3, color="C0", label="grid rows")
    styles = ("--", ":", "-.", (0, (5, 1)))
    for index, row in enumerate(references):
        ax.axhline(
            row["miou_mean"],
            color=f"C{index + 1}",
            linestyle=styles[index % len(styles)],
            label=f"{row['row']} {row['miou_mean']:.3f}",
        )
    _grid_axis(ax, [r["row"] for r in grid])
    ax.set_ylabel("val mIoU (mean ± std over seeds)")
    if grid or references:
        ax.legend(fontsize=8, loc="best")
    if paired:
        where = np.arange(len(paired))
        gains = [r["gain_mean"] for r in paired]
        spread = [r["gain_std"] for r in paired]
        gain_ax.errorbar(where, gains, yerr=spread, fmt="o", capsize=3, color="C0")
        gain_ax.axhline(0.0, color="C1", linestyle="--", label="supervised")
        _grid_axis(gain_ax, [r["row"] for r in paired])
        gain_ax.set_ylabel("gain over supervised, paired by seed (mean ± std)")
        gain_ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return figure_png(fig)


def _grid_axis(ax: Any, names: Sequence[str]) -> None:
    """One tick per grid row (names turned when there are many), a light horizontal grid."""
    turned = len(names) > 4
    ax.set_xticks(
        np.arange(len(names)),
        list(names),
        rotation=30 if turned else 0,
        ha="right" if turned else "center",
    )
    ax.set_xlim(-0.6, max(len(names), 1) - 0.4)
    ax.grid(axis="y", alpha=0.3)
