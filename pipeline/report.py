"""``pseudoflow report``: one pipeline run as a static HTML page and PNG figures, written under the
storage root (``reports/<run id>/``) and logged to the run's MLflow parent run (``report/``).

Everything comes from what the run stored: its ``stages.json`` (which entry each stage used, whether
it was a cache hit, when it ran), the entries' records (metrics, per-class IoU) and datasets
(images, teacher signals, pseudo-labels). Nothing is inferred again: the policies the run did not
use are applied to its stored teacher signals (threshold, S4MC, CSL need nothing else); WPL needs
the detector's boxes and the prototype memory, so it is shown only where a WPL entry for the same
signals is in the cache. A ``ground_truth`` run (reference rows) shows its own stored labels too.
"""

from __future__ import annotations

import html
import logging
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import yaml

from pipeline import figures
from pipeline.cache.entries import CacheEntry, output_dataset
from pipeline.cache.walk import look_up
from pipeline.config import PipelineConfig, validate
from pipeline.graph import Context, all_stages, final_round
from pipeline.models import model_from_bytes, predict_pictures
from pipeline.redact import redact
from stages import evaluate
from stages.core import codec
from stages.core.constants import IGNORE_INDEX
from stages.core.metrics import LabelCounts
from stages.core.storage import DatasetRef, Storage
from stages.pseudolabel import stage as pseudolabel
from stages.pseudolabel.config import POLICIES, SIGNAL_POLICIES, PseudolabelConfig
from stages.teach import MAPS, decode_signals

logger = logging.getLogger(__name__)

SAMPLES = 6  # images shown in the overlay grid and the val predictions
# Model-input pixels per model the val predictions may cost on the CPU: every sample at 64 px,
# 4 images at 512 px.
MAX_PREDICTED_PIXELS = 4 * 512 * 512
MAX_IMAGES = 200  # unlabeled images with ground truth the quality figures are computed on
MAX_WEIGHTS = 200_000  # weights per policy kept for its histogram
RELIABILITY = {
    "threshold": "reliable: conf ≥ τ",
    "s4mc": "reliable: refined margin > γ",
    "csl": "trusted: w = 1",
    "wpl": "reliable R: detector ∧ segmentation",
    "ground_truth": "kept: ground truth known (mask ≠ 255)",
}
SIGNAL_COLUMNS = ["image_id", "height", "width", "num_classes", *MAPS]
LABEL_COLUMNS = ["image_id", "height", "width", "label", "keep", "weight", "weight_offset"]


class ReportError(RuntimeError):
    """The run cannot be reported (unknown run id, missing records)."""


# --------------------------------------------------------------------------------- the run
def pipeline_runs(storage: Storage) -> list[str]:
    """Run ids under ``pipelines/``, oldest first (ids end in ``-<UTC stamp>-<hex>``)."""
    base = storage.path("pipelines")
    if not storage.fs.exists(base):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in storage.fs.ls(base, detail=False)]
    return sorted(names, key=lambda name: (name.rsplit("-", 2)[-2:], name))


def find_run(storage: Storage, run: str | None) -> str:
    """The run id ``run`` names (exactly or as a unique prefix); the newest run if ``None``."""
    runs = pipeline_runs(storage)
    if not runs:
        raise ReportError(f"no pipeline runs under {storage.url}: run `pseudoflow run` first")
    if run is None:
        return runs[-1]
    matches = [r for r in runs if r == run] or [r for r in runs if r.startswith(run)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(runs[-5:])
    what = "matches several runs" if matches else "is not a run"
    raise ReportError(f"{run!r} {what} under {storage.url}; the newest are: {known}")


@dataclass(frozen=True)
class StageUse:
    """One stage of the run: the entry it used and how it got it."""

    stage: str
    key: str
    hit: bool
    started: float | None  # epoch seconds (None for runs recorded before timings were kept)
    seconds: float | None
    record: dict[str, Any]


@dataclass
class RunRecords:
    run_id: str
    config: PipelineConfig
    stages: dict[str, StageUse]

    def output(self, stage: str, name: str) -> dict[str, Any] | None:
        use = self.stages.get(stage)
        return None if use is None else use.record["outputs"].get(name)


def load_run(storage: Storage, run_id: str) -> RunRecords:
    """The run's resolved config and, per stage it completed, the entry it used."""
    folder = storage.path("pipelines", run_id)
    try:
        stages = storage.read_json(f"{folder}/stages.json")
        config_text = storage.read_bytes(f"{folder}/config.yaml").decode()
    except FileNotFoundError as exc:
        raise ReportError(f"run {run_id}: {exc.filename or exc} is missing") from exc
    config = validate(yaml.safe_load(config_text))
    uses = {}
    order = [s.name for s in all_stages(config)]
    for stage, used in sorted(stages.items(), key=lambda item: order.index(item[0])):
        record = CacheEntry(storage, stage, used["key"]).record()
        if record is None:  # collected since (cache gc): the run's other parts still show
            logger.warning("run %s: the %s entry %s is gone", run_id, stage, used["key"][:12])
            continue
        started, seconds = used.get("started"), used.get("seconds")
        uses[stage] = StageUse(stage, used["key"], bool(used["hit"]), started, seconds, record)
    return RunRecords(run_id, config, uses)


# ----------------------------------------------------------------------- pseudo-label quality
@dataclass
class PolicyQuality:
    """Coverage and precision of one policy on the images with ground truth, and its weights."""

    policy: str
    source: str  # where the maps came from
    counts: LabelCounts = field(default_factory=LabelCounts)
    images: int = 0
    weights: list[np.ndarray] = field(default_factory=list)

    def add(
        self, label: np.ndarray, keep: np.ndarray, weight: np.ndarray, truth: np.ndarray
    ) -> None:
        """label: int[H, W]; keep: bool[H, W]; weight: float[H, W]; truth: int[H, W] (255 unknown)."""
        self.counts += LabelCounts.of(label, keep, truth)
        self.images += 1
        if sum(w.size for w in self.weights) < MAX_WEIGHTS:
            self.weights.append(weight[keep].astype(np.float32))

    @property
    def coverage(self) -> float:
        return self.counts.coverage

    @property
    def precision(self) -> float:
        return self.counts.precision

    def weight_values(self) -> np.ndarray:
        return np.concatenate(self.weights) if self.weights else np.zeros(0, np.float32)


class ConfidenceSweep:
    """Counts of labelled pixels per teacher-confidence bin, all and correctly labelled."""

    def __init__(self, bins: int = 200):
        self.bins = bins
        self.total = np.zeros(bins, np.int64)
        self.correct = np.zeros(bins, np.int64)

    def add(self, conf: np.ndarray, label: np.ndarray, truth: np.ndarray) -> None:
        known = truth != IGNORE_INDEX
        index = np.minimum((conf[known] * self.bins).astype(np.int64), self.bins - 1)
        self.total += np.bincount(index, minlength=self.bins)
        self.correct += np.bincount(index[label[known] == truth[known]], minlength=self.bins)

    def curve(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(coverage, precision) when keeping pixels with conf >= each bin's lower edge."""
        labelled = self.total.sum()
        if labelled == 0:
            return None
        kept = np.cumsum(self.total[::-1])[::-1]
        right = np.cumsum(self.correct[::-1])[::-1]
        nonzero = kept > 0
        return kept[nonzero] / labelled, right[nonzero] / kept[nonzero]


def _truth_sample(images: DatasetRef, limit: int) -> dict[str, np.ndarray]:
    """Ground-truth masks of the first ``limit`` unlabeled images by id that have one."""
    table = images.read_table(["image_id", "split"])
    unlabeled = table.filter(pc.equal(table["split"], "unlabeled"))["image_id"].to_pylist()
    rows = images.read_rows(["image_id", "mask"], set(sorted(unlabeled)[:limit]))
    return {
        r["image_id"]: codec.decode_png(r["mask"])
        for r in rows.to_pylist()
        if r["mask"] is not None
    }


def stored_labels(
    storage: Storage, records: RunRecords, policy: str
) -> tuple[DatasetRef, str] | None:
    """The committed pseudo-labels of ``policy`` made from this run's teacher signals with this
    run's settings (the entry the run would reuse for that policy), if any."""
    if "teach" not in records.stages:
        return None
    cfg = records.config.model_copy(update={"pseudolabel": _with_policy(records.config, policy)})
    ctx = Context(cfg, storage, records.run_id, [])
    for use in records.stages.values():  # the run's outputs, as its stages read them
        ctx.outputs.update({n: {**o, "key": use.key} for n, o in use.record["outputs"].items()})
    stage = next(s for s in all_stages(cfg) if s.name == "pseudolabel")
    try:
        found = look_up(stage, ctx)
    except KeyError:  # an input this policy needs (WPL: detections) the run did not make
        return None
    if found.record is None:
        return None
    labels = found.record["outputs"]["pseudolabels"]
    return output_dataset(storage, "pseudolabels", labels), found.key


def _with_policy(config: PipelineConfig, policy: str) -> PseudolabelConfig:
    return config.pseudolabel.model_copy(update={"policy": policy})


def decode_labels(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stored ``pseudolabels`` row -> label int64[H, W], keep bool[H, W] and the training
    weight float32[H, W] (``weight_offset`` added where kept, 0 elsewhere)."""
    maps = pseudolabel.decode_pseudolabels(row, ("label", "keep", "weight"))
    return maps["label"].astype(np.int64), maps["keep"], maps["weight"]


def _stored_maps(
    labels: DatasetRef, ids: set[str]
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(image id, label, keep, weight) from stored pseudo-label rows."""
    for row in labels.read_rows(LABEL_COLUMNS, ids).to_pylist():
        yield (row["image_id"], *decode_labels(row))


def policy_quality(
    storage: Storage, records: RunRecords, limit: int = MAX_IMAGES
) -> tuple[list[PolicyQuality], ConfidenceSweep, dict[str, str]]:
    """Each policy's coverage and precision on the run's unlabeled images with ground truth (the
    first ``limit`` by id), the confidence sweep, and why a policy is missing (policy -> reason)."""
    images, signals = records.output("ingest", "images"), records.output("teach", "teacher_signals")
    sweep, missing = ConfidenceSweep(), {}
    if images is None or signals is None:
        return [], sweep, dict.fromkeys(SIGNAL_POLICIES, "the run stopped before teach")
    truth = _truth_sample(output_dataset(storage, "images", images), limit)
    if not truth:
        reason = "no unlabeled image has ground truth"
        return [], sweep, dict.fromkeys(SIGNAL_POLICIES, reason)
    results: dict[str, PolicyQuality] = {}
    computed: list[PseudolabelConfig] = []
    own, used = records.config.pseudolabel.policy, records.stages.get("pseudolabel")
    labels = records.output("pseudolabel", "pseudolabels")
    if own not in SIGNAL_POLICIES and used is not None and labels is not None:
        # ground_truth: no teacher signals to apply it to; the run's own stored rows
        results[own] = quality = PolicyQuality(own, f"stored (entry {used.key[:12]})")
        for image_id, label, keep, weight in _stored_maps(
            output_dataset(storage, "pseudolabels", labels), set(truth)
        ):
            quality.add(label, keep, weight, truth[image_id])
    for policy in SIGNAL_POLICIES:
        found = stored_labels(storage, records, policy)
        if found is not None:
            ref, key = found
            results[policy] = quality = PolicyQuality(policy, f"stored (entry {key[:12]})")
            for image_id, label, keep, weight in _stored_maps(ref, set(truth)):
                quality.add(label, keep, weight, truth[image_id])
        elif policy == "wpl":
            missing[policy] = (
                "needs the detector's boxes and prototypes: run with pseudolabel.policy=wpl"
                if "detect" in records.stages
                else "needs the detect stage (detector.enabled: true)"
            )
        else:
            results[policy] = PolicyQuality(policy, "applied here to the stored teacher signals")
            computed.append(_with_policy(records.config, policy))
    rows = output_dataset(storage, "teacher_signals", signals).read_rows(SIGNAL_COLUMNS, set(truth))
    for row in rows.to_pylist():
        signals = decode_signals(row)
        target = truth[row["image_id"]]
        sweep.add(signals["conf"].numpy(), signals["label"].numpy(), target)
        for cfg in computed:
            if why := pseudolabel.missing_signals(cfg, row):
                missing[cfg.policy] = why
                continue
            maps = pseudolabel.policy_maps(cfg, signals)
            keep = maps["keep"].numpy()
            weight = maps["weight"].float().numpy() * keep
            results[cfg.policy].add(maps["label"].numpy(), keep, weight, target)
    results = {p: q for p, q in results.items() if p not in missing}
    return [results[p] for p in POLICIES if p in results], sweep, missing


# ------------------------------------------------------------------------------- overlays
def overlay_samples(
    storage: Storage, records: RunRecords, count: int = SAMPLES
) -> list[figures.Sample]:
    """The first ``count`` unlabeled images by id, with the run's own stored pseudo-labels."""
    images, labels = (
        records.output("ingest", "images"),
        records.output("pseudolabel", "pseudolabels"),
    )
    if images is None or labels is None:
        return []
    labels_ref = output_dataset(storage, "pseudolabels", labels)
    ids = set(sorted(labels_ref.read_table(["image_id"])["image_id"].to_pylist())[:count])
    pictures = {
        r["image_id"]: r
        for r in output_dataset(storage, "images", images)
        .read_rows(["image_id", "image", "mask"], ids)
        .to_pylist()
    }
    samples = []
    for row in labels_ref.read_rows(
        [*LABEL_COLUMNS, "trusted", "reliable", "policy"], ids
    ).to_pylist():
        label, keep, weight = decode_labels(row)
        mask_column = {"csl": "trusted", "wpl": "reliable"}.get(row["policy"], "keep")
        reliable = pseudolabel.decode_pseudolabels(row, [mask_column]).get(mask_column, keep)
        picture = pictures[row["image_id"]]
        truth = codec.decode_png(picture["mask"]) if picture["mask"] is not None else None
        samples.append(
            figures.Sample(
                image_id=row["image_id"],
                image=codec.decode_png(picture["image"]),
                truth=truth,
                label=label,
                keep=keep,
                reliable=reliable,
                weight=weight,
            )
        )
    return sorted(samples, key=lambda s: s.image_id)


# ------------------------------------------------------------------------- val predictions
def val_predictions(
    storage: Storage, records: RunRecords, count: int = SAMPLES
) -> list[figures.Predicted]:
    """The first val images by id (``count``, fewer at large image sizes: see
    ``MAX_PREDICTED_PIXELS``) with the teacher's and the final student's label maps, computed
    on the CPU as ``pseudoflow predict`` computes them."""
    images = records.output("ingest", "images")
    last = final_round(records.config)
    outputs = {
        "teacher": records.output("train_teacher", "teacher"),
        "student": records.output(last.name("train_student"), last.name("student")),
    }
    models = {name: output for name, output in outputs.items() if output is not None}
    if images is None or "student" not in models:
        return []
    size = records.config.data.image_size
    count = max(1, min(count, MAX_PREDICTED_PIXELS // (size * size)))
    ref = output_dataset(storage, "images", images)
    table = ref.read_table(["image_id", "split"])
    val = sorted(table.filter(pc.equal(table["split"], "val"))["image_id"].to_pylist())[:count]
    rows = sorted(
        ref.read_rows(["image_id", "image", "mask"], set(val)).to_pylist(),
        key=lambda r: str(r["image_id"]),
    )
    if not rows:
        return []
    pictures = [codec.decode_png(r["image"]) for r in rows]
    device = torch.device("cpu")
    labels = {}
    for name, output in models.items():
        path = storage.resolve(output["path"])
        model = model_from_bytes(storage.read_bytes(path), source=path, device=device)
        labels[name] = predict_pictures(model, pictures, device=device)
    return [
        figures.Predicted(
            image_id=row["image_id"],
            image=picture,
            truth=_truth(row["mask"], picture),
            labels={name: labels[name][i] for name in labels},
        )
        for i, (row, picture) in enumerate(zip(rows, pictures, strict=True))
    ]


def _truth(mask: bytes | None, picture: np.ndarray) -> np.ndarray:
    """A stored mask, or all ignored where the image has none."""
    if mask is None:
        return np.full(picture.shape[:2], IGNORE_INDEX, np.uint8)
    return codec.decode_png(mask)


# ------------------------------------------------------------------------- training curves
def training_curves(
    records: RunRecords, uri: str | None
) -> tuple[dict[str, dict[str, list[tuple[int, float]]]], dict[str, str]]:
    """Per training stage of the run: its logged losses and learning rate by step (from the
    stage's MLflow run, or for a cache hit the run that trained the entry), and a note (where
    reused curves come from, or why there are none)."""
    from pipeline.tracking import stage_histories

    stages = {
        use.stage: (use.key, use.hit)
        for use in records.stages.values()
        if use.stage.startswith("train_")
    }
    if not stages:
        return {}, {}
    if uri is None:
        return {}, dict.fromkeys(stages, "no MLflow store for this run")
    try:
        found = stage_histories(uri, records.config.tracking.experiment, records.run_id, stages)
    except Exception as exc:  # an unreachable server: the rest of the report still shows
        logger.warning("training curves: cannot read MLflow at %s: %s", redact(uri), exc)
        return {}, dict.fromkeys(stages, f"cannot read MLflow at {redact(uri)}")
    curves, notes = {}, {}
    for stage, history in found.items():
        curves[stage] = history.metrics
        if history.reused and history.run_id:
            notes[stage] = f"reused: curves of MLflow run {history.run_id[:12]}"
        if history.note:
            notes[stage] = history.note
    return curves, notes


def _read_uri(storage: Storage, config: PipelineConfig, given: str | None) -> str | None:
    """Where the run's metrics are: ``given``, else where the run was tracked; ``None`` when
    that is a SQLite file that does not exist (reading would create it)."""
    from pipeline.runner import tracking_uri as run_tracking_uri
    from stages.core.errors import SourceError

    try:
        uri = given or run_tracking_uri(config, storage.root if storage.is_local else storage.url)
    except SourceError:
        return None
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    return uri


# ---------------------------------------------------------------------------------- report
@dataclass
class Report:
    run_id: str
    location: str  # where index.html and the PNGs were written (folder or URL)
    files: list[str]
    mlflow_run_id: str | None
    quality: list[PolicyQuality]


def timeline(records: RunRecords) -> list[figures.Span]:
    """Stages with known timings, positioned from the run's first stage start."""
    timed = [u for u in records.stages.values() if u.started is not None and u.seconds is not None]
    if not timed:
        return []
    first = min(u.started for u in timed if u.started is not None)
    return [
        figures.Span(u.stage, float(u.started or 0.0) - first, float(u.seconds or 0.0), u.hit)
        for u in timed
    ]


def build_report(
    storage: Storage,
    run_id: str,
    *,
    samples: int = SAMPLES,
    limit: int = MAX_IMAGES,
    tracking_uri: str | None = None,
) -> tuple[dict[str, bytes], list[PolicyQuality], RunRecords]:
    """The page and its figures (file name -> bytes) for ``run_id``; training curves are read
    from MLflow at ``tracking_uri`` (default: where the run was tracked)."""
    records = load_run(storage, run_id)
    config = records.config
    names = config.data.names()
    files: dict[str, bytes] = {}
    shown = overlay_samples(storage, records, samples)
    policy = config.pseudolabel.policy
    if shown:
        top = max(1.0, *(float(s.weight.max()) for s in shown))
        files["overlays.png"] = figures.overlay_grid(shown, RELIABILITY[policy], top, names)
    predicted = val_predictions(storage, records, samples)
    if predicted:
        files["predictions.png"] = figures.prediction_grid(predicted, names)
    quality, sweep, missing = policy_quality(storage, records, limit)
    if quality:
        points = {q.policy: (q.coverage, q.precision) for q in quality}
        files["quality.png"] = figures.quality_plot(sweep.curve(), points)
        files["weights.png"] = figures.weight_histograms(
            {q.policy: q.weight_values() for q in quality}
        )
    evaluated = records.stages.get("evaluate")
    per_class = evaluated.record.get("results", {}).get("per_class_iou") if evaluated else None
    if per_class:
        files["iou_per_class.png"] = evaluate.iou_plot(config.data.names(), per_class)
    curves, notes = training_curves(records, _read_uri(storage, config, tracking_uri))
    if curves or notes:
        files["training.png"] = figures.training_curves(curves, notes)
    spans = timeline(records)
    if spans:
        files["timeline.png"] = figures.timeline_plot(spans)
    page = render_html(records, quality, missing, files, len(shown), limit, len(predicted))
    return {"index.html": page.encode(), **files}, quality, records


def write_report(
    storage: Storage,
    run: str | None = None,
    *,
    out: str | None = None,
    tracking_uri: str | None = None,
    log: bool = True,
    samples: int = SAMPLES,
    limit: int = MAX_IMAGES,
) -> Report:
    """Build the report of ``run`` (newest if ``None``), write it to ``out`` (default
    ``<root>/reports/<run id>``) and, if ``log``, add it to the run's MLflow parent run at
    ``tracking_uri`` (default: where the run was tracked; skipped with a warning when no MLflow
    run there is tagged with this run id)."""
    from pipeline.runner import tracking_uri as run_tracking_uri

    run_id = find_run(storage, run)
    content, quality, records = build_report(
        storage, run_id, samples=samples, limit=limit, tracking_uri=tracking_uri
    )
    if log and tracking_uri is None:
        tracking_uri = run_tracking_uri(
            records.config, storage.root if storage.is_local else storage.url
        )
    location = out or storage.path("reports", run_id)
    target = Storage(location) if out else storage
    target_dir = target.root if out else location
    with tempfile.TemporaryDirectory() as local:
        for name, data in content.items():
            (Path(local) / name).write_bytes(data)
        target.fs.makedirs(target_dir, exist_ok=True)
        for name in content:  # the page last: a reader never sees it without its figures
            if name != "index.html":
                target.fs.put_file(f"{local}/{name}", f"{target_dir}/{name}")
        target.fs.put_file(f"{local}/index.html", f"{target_dir}/index.html")
        mlflow_run = _log_to_mlflow(tracking_uri, records, local) if log and tracking_uri else None
    return Report(run_id, target_dir, sorted(content), mlflow_run, quality)


def _log_to_mlflow(uri: str, records: RunRecords, folder: str) -> str | None:
    from pipeline.tracking import find_pipeline_run, log_folder

    parent = find_pipeline_run(uri, records.config.tracking.experiment, records.run_id)
    if parent is None:
        logger.warning("no MLflow run at %s is tagged with run %s: not logged", uri, records.run_id)
        return None
    log_folder(uri, parent, folder, "report")
    return parent


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
        [q.policy, f"{q.coverage:.4f}", f"{q.precision:.4f}", str(q.images), q.source]
        for q in quality
    ] + [[p, "-", "-", "-", why] for p, why in missing.items()]
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
            ["policy", "coverage", "precision", "images", "source"], policy_rows, policy_classes
        ),
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
