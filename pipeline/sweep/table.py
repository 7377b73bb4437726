"""The table of a sweep: one row per grid point or reference row, from its runs' outcomes
(mIoU mean ± std over seeds, gap-closing g, pseudo-label coverage and precision, stages run and
reused), as records, CSV, text and MLflow metrics. Pure: no Ray, no MLflow, no storage.

g = (mIoU_row - mIoU_supervised) / (mIoU_full - mIoU_supervised), from the means over seeds; it
is given where both reference rows are present and full is above supervised.

The gain over supervised is paired by seed: every row of a seed shares its teacher and labeled
batches, so mean ± std of the per-seed differences tells a row's effect from the seed's draw
(two rows 0.01 apart with a seed std of 0.02 each may still differ by 0.01 on every seed).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RunOutcome:
    """What one run of the sweep gave (``error``: why it failed)."""

    row: str
    reference: bool
    seed: int
    run_id: str = ""
    mlflow_run_id: str = ""
    miou: float | None = None
    teacher_miou: float | None = None
    coverage: float | None = None
    precision: float | None = None
    stages_run: int = 0
    stages_reused: int = 0
    seconds: float = 0.0
    error: str | None = None
    weighted_precision: float | None = None
    recall_per_class: dict[str, float] = field(default_factory=dict)
    precision_per_class: dict[str, float] = field(default_factory=dict)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _class_means(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Each class's mean over the seeds that have a figure for it (class order kept)."""
    names = list(dict.fromkeys(name for figures in per_seed for name in figures))
    return {n: float(np.mean([f[n] for f in per_seed if n in f])) for n in names}


def _paired_gain(done: Sequence[RunOutcome], baseline: dict[int, float]) -> dict[str, Any]:
    """mean and sample std (0 with one) of ``miou - baseline[seed]`` over the seeds both have."""
    deltas = [
        float(o.miou) - baseline[o.seed] for o in done if o.miou is not None and o.seed in baseline
    ]
    if not deltas:
        return {"gain_mean": None, "gain_std": None, "gain_seeds": 0}
    std = float(np.std(deltas, ddof=1)) if len(deltas) > 1 else 0.0
    return {"gain_mean": float(np.mean(deltas)), "gain_std": std, "gain_seeds": len(deltas)}


def summarize(outcomes: Sequence[RunOutcome], order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per table row, in ``order`` (the plan's; then any other in first-run order):
    ``miou_mean`` and ``miou_std`` (sample std over the seeds that ran; 0 with one),
    ``miou_per_seed``, ``teacher_miou``, mean ``coverage``, ``precision`` and
    ``weighted_precision`` (None where the row learns nothing from pseudo-labels), per class
    the mean ``recall_per_class`` and ``precision_per_class`` of the pseudo-labels, ``gap_closing``,
    the stages run and reused over its seeds, seconds, and the seeds that failed; ``gain_mean``,
    ``gain_std`` and ``gain_seeds``: the gain over ``supervised`` paired by seed (None for that
    row itself and without it)."""
    present = {o.row for o in outcomes}
    names = list(dict.fromkeys([n for n in order if n in present] + [o.row for o in outcomes]))
    by_name = {name: [o for o in outcomes if o.row == name] for name in names}
    means = {
        name: _mean([o.miou for o in rows if o.error is None]) for name, rows in by_name.items()
    }
    low, high = means.get("supervised"), means.get("full")
    gap = high - low if low is not None and high is not None else math.nan
    baseline = {
        o.seed: float(o.miou)
        for o in by_name.get("supervised", [])
        if o.error is None and o.miou is not None
    }
    table = []
    for name, rows in by_name.items():
        # in seed order, whichever run ended first: miou_per_seed[i] is seeds[i]'s
        done = sorted(
            (o for o in rows if o.error is None and o.miou is not None), key=lambda o: o.seed
        )
        mious = [float(o.miou) for o in done if o.miou is not None]
        mean = means[name]
        table.append(
            {
                "row": name,
                "reference": rows[0].reference,
                "seeds": [o.seed for o in done],
                "miou_mean": mean,
                "miou_std": float(np.std(mious, ddof=1)) if len(mious) > 1 else 0.0,
                "miou_per_seed": mious,
                "gap_closing": (mean - low) / gap
                if gap > 0 and mean is not None and low is not None
                else None,
                **_paired_gain(done, {} if name == "supervised" else baseline),
                "teacher_miou": _mean([o.teacher_miou for o in done]),
                "coverage": _mean([o.coverage for o in done]),
                "precision": _mean([o.precision for o in done]),
                "weighted_precision": _mean([o.weighted_precision for o in done]),
                "recall_per_class": _class_means([o.recall_per_class for o in done]),
                "precision_per_class": _class_means([o.precision_per_class for o in done]),
                "stages_run": sum(o.stages_run for o in rows),
                "stages_reused": sum(o.stages_reused for o in rows),
                "seconds": float(sum(o.seconds for o in rows)),
                "failed": {str(o.seed): o.error for o in rows if o.error is not None},
                "runs": [o.run_id for o in done],
            }
        )
    return table


CSV_COLUMNS = (
    "row",
    "reference",
    "seeds",
    "miou_mean",
    "miou_std",
    "gap_closing",
    "gain_mean",
    "gain_std",
    "teacher_miou",
    "coverage",
    "precision",
    "weighted_precision",
    "stages_run",
    "stages_reused",
    "seconds",
    "failed",
)


PER_CLASS = ("recall", "precision")  # the pseudo-labels' figures per class, as columns


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The table's scalar columns (``seeds``: their count; ``failed``: the failed seeds), then
    ``recall.<class>`` and ``precision.<class>`` for every class any row has."""
    classes = {
        what: list(dict.fromkeys(n for row in rows for n in row[f"{what}_per_class"]))
        for what in PER_CLASS
    }
    columns = [*CSV_COLUMNS, *(f"{what}.{n}" for what in PER_CLASS for n in classes[what])]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {k: row[k] for k in CSV_COLUMNS}
        cells["seeds"] = len(row["seeds"])
        cells["failed"] = " ".join(sorted(row["failed"]))
        for what in PER_CLASS:
            figures = row[f"{what}_per_class"]
            cells |= {f"{what}.{n}": figures.get(n) for n in classes[what]}
        writer.writerow({k: "" if v is None else v for k, v in cells.items()})
    return buffer.getvalue()


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table as text: mIoU mean ± std over the seeds that ran, g, the gain over supervised
    paired by seed, the pseudo-labels' coverage, precision and weighted precision, how many
    stages ran and how many were reused."""
    width = max([14, *(len(r["row"]) for r in rows)])
    head = f"{'row':<{width}} {'val mIoU':>17} {'g':>7} {'vs supervised':>17}"
    head += f" {'coverage':>9} {'precision':>9}"
    head += f" {'weighted':>9}"
    lines = [head + f" {'stages ran/reused':>18}"]
    for row in rows:
        if row["miou_mean"] is None:
            miou = "failed"
        else:
            miou = f"{row['miou_mean']:.4f} ± {row['miou_std']:.4f}"
        seeds = f" ({len(row['seeds'])})" if row["failed"] else ""
        gain = "-"
        if row["gain_mean"] is not None:
            gain = f"{row['gain_mean']:+.4f} ± {row['gain_std']:.4f}"
        cells = [_cell(row["gap_closing"], 7), f"{gain:>17}", _cell(row["coverage"], 9)]
        cells += [_cell(row["precision"], 9), _cell(row["weighted_precision"], 9)]
        stages = f"{row['stages_run']}/{row['stages_reused']}"
        lines.append(f"{row['row']:<{width}} {miou + seeds:>17} {' '.join(cells)} {stages:>18}")
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    return f"{'-' if value is None else f'{value:.3f}':>{width}}"


def row_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics of the table: ``<row>.miou_mean``, ``.miou_std``, ``.gap_closing``, ...,
    ``<row>.recall.<class>`` and ``<row>.precision.<class>`` (a row's or class's name with what
    MLflow names refuse, such as ``=``, made ``-``)."""
    keys = ["miou_mean", "miou_std", "gap_closing", "gain_mean", "gain_std"]
    keys += ["coverage", "precision", "weighted_precision"]
    metrics = {
        f"{metric_name(row['row'])}.{key}": float(row[key])
        for row in rows
        for key in keys
        if row.get(key) is not None
    }
    for row in rows:
        for what in PER_CLASS:
            for name, value in row[f"{what}_per_class"].items():
                metrics[metric_name(f"{row['row']}.{what}.{name}")] = float(value)
    return metrics


def metric_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./" else "-" for c in text.replace(" ", "_"))
