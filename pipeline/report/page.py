"""The report as HTML: one static page around the figures."""

from __future__ import annotations

import html
import logging

from pipeline import figures
from pipeline.report.quality import PolicyQuality
from pipeline.report.runs import RunRecords

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ HTML
CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.hit td { background: #eefbea; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.note { color: #666; font-size: 0.85rem; }
ul.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 0.4rem 1.2rem; }
ul.legend span { display: inline-block; width: 1em; height: 1em; border: 1px solid #999;
  vertical-align: -0.15em; margin-right: 0.35rem; }
code { background: #f4f4f4; padding: 0 0.2rem; }
"""


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for n, row in enumerate(rows):
        cells = "".join(
            f'<td class="num">{html.escape(c)}</td>'
            if _numeric(c)
            else f"<td>{html.escape(c)}</td>"
            for c in row
        )
        css = f' class="{classes[n]}"' if classes and classes[n] else ""
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _figure(files: dict[str, bytes], name: str, alt: str) -> str:
    if name not in files:
        return f'<p class="note">{html.escape(alt)}: not available for this run.</p>'
    width, height = _png_size(files[name])
    return f'<p><img src="{name}" alt="{html.escape(alt)}" width="{width}" height="{height}"></p>'


def _legend_html(names: list[str]) -> str:
    """The class colours of every label map on the page (``figures.palette``)."""
    items = "".join(
        f'<li><span style="background: rgb({r}, {g}, {b})"></span>{html.escape(name)}</li>'
        for name, (r, g, b) in figures.class_legend(names, dropped=True)
    )
    return f'<ul class="legend">{items}</ul>'


def _figure_cell(value: float | None, digits: int = 3) -> str:
    """A figure to ``digits`` decimals; '-' for none (None, or NaN: a class absent from the
    ground truth)."""
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def render_html(
    records: RunRecords,
    quality: list[PolicyQuality],
    missing: dict[str, str],
    files: dict[str, bytes],
    shown: int,
    limit: int,
    predicted: int = 0,
) -> str:
    config = records.config
    metrics = records.stages["evaluate"].record["metrics"] if "evaluate" in records.stages else {}
    headline = [
        [name, f"{metrics[key]:.4f}"]
        for name, key in [
            ("teacher mIoU (val)", "teacher_miou"),
            ("student mIoU (val)", "student_miou"),
            ("pseudo-label coverage", "pseudolabel_coverage"),
            ("pseudo-label precision", "pseudolabel_precision"),
        ]
        if key in metrics
    ]
    policy_rows = [
        [
            q.policy,
            f"{q.coverage:.4f}",
            f"{q.precision:.4f}",
            _figure_cell(q.weighted_precision, 4),
            str(q.images),
            q.source,
        ]
        for q in quality
    ] + [[p, "-", "-", "-", "-", why] for p, why in missing.items()]
    class_rows = [
        [q.policy, *(_figure_cell(v) for v in values.tolist())]
        for q in quality
        if (values := q.counts.class_recall()) is not None
    ]
    policy_classes = ["hit" if q.policy == config.pseudolabel.policy else "" for q in quality] + [
        "" for _ in missing
    ]
    stage_rows, stage_classes = [], []
    for use in records.stages.values():
        seconds = f"{use.seconds:.1f}" if use.seconds is not None else "?"
        stage_rows.append([use.stage, "cache hit" if use.hit else "ran", seconds, use.key[:12]])
        stage_classes.append("hit" if use.hit else "")
    hits = sum(u.hit for u in records.stages.values())
    title = f"pseudoflow report: {records.run_id}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>data <code>{html.escape(config.data.source)}</code>, {config.data.num_classes} "
        f"classes, policy <code>{html.escape(config.pseudolabel.policy)}</code>, "
        f"{hits} of {len(records.stages)} stages from the cache.</p>",
        _table(["metric", "value"], headline) if headline else "",
        "<h2>Class colours</h2>",
        _legend_html(config.data.names()),
        "<h2>Pseudo-labels on a sample</h2>",
        f'<p class="note">The first {shown} unlabeled images by id. Grey: pixels the policy '
        "drops; white in the ground truth: ignored pixels.</p>",
        _figure(files, "overlays.png", "image, truth, pseudo-label, reliability and weight"),
        "<h2>Predictions on val</h2>",
        f'<p class="note">The first {predicted} val images by id: the teacher and the final '
        "student, run here on the CPU as <code>pseudoflow predict</code> runs them; acc: the "
        "share of the image's known pixels labelled right.</p>",
        _figure(files, "predictions.png", "val images, truth, teacher and student predictions"),
        "<h2>Coverage and precision per policy</h2>",
        f'<p class="note">On the first {limit} unlabeled images (by id) that have ground truth; '
        "the highlighted row is this run's policy.</p>",
        _table(
            ["policy", "coverage", "precision", "weighted", "images", "source"],
            policy_rows,
            policy_classes,
        ),
        '<p class="note">weighted: the share of the training weight that is on right labels '
        "(CSL and WPL weigh pixels; the others keep them at 1). Per class: the share of each "
        "class's pixels in the ground truth kept with the right label.</p>",
        _table(["policy", *config.data.names()], class_rows) if class_rows else "",
        _figure(files, "quality.png", "coverage against precision"),
        "<h2>Per-pixel weights (kept pixels)</h2>",
        _figure(files, "weights.png", "weight histograms"),
        "<h2>Per-class IoU (val)</h2>",
        _figure(files, "iou_per_class.png", "per-class IoU of teacher and student"),
        "<h2>Training curves</h2>",
        '<p class="note">Losses (mean over each logging window) and learning rate against '
        "step, as each training stage logged them to MLflow (every <code>log_every</code> "
        "steps).</p>",
        _figure(files, "training.png", "training losses and learning rate per stage"),
        "<h2>Stages</h2>",
        _table(["stage", "how", "seconds", "cache key"], stage_rows, stage_classes),
        _figure(files, "timeline.png", "stage timeline"),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)
