"""``pseudoflow bench quality``: do offline pseudo-labels pay, per policy and round?

On the generated dataset, for one student architecture, budget and set of seeds, it trains:

- ``supervised``: the labeled split only (this network is also round 1's teacher);
- ``full``: labeled + unlabeled ground truth (the ceiling);
- ``oracle``: the student loop with the unlabeled ground truth as its pseudo-labels (every pixel
  kept, weight 1): what the loop makes of perfect labels, so that a policy's shortfall can be
  told apart from the loop's;
- one student per policy (threshold, s4mc, csl, wpl) on the teacher's pseudo-labels, and with
  ``rounds`` = 2 a second one (``<policy>+r2``) on the pseudo-labels of the first.

Every piece is the pipeline's own code run in this process instead of on Ray: the teacher's
stored signals (``TeacherPredictor``: per-pixel statistics, quantised), the detector and its
detections for WPL, the pseudolabel stage's rows (``label_batch``, with WPL's teacher prototypes), their decoding
into training maps (``pseudolabel_rows_to_arrays``), the student step (``segtrain.train_step``:
two strong views, CutMix with the stored maps, the policy's live weights) and the evaluate
stage's confusion counts. Seeds run in parallel processes, one torch thread each.

The gap-closing ratio of a row is g = (mIoU_row - mIoU_supervised) / (mIoU_full -
mIoU_supervised), from the means over seeds.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from stages import evaluate, segtrain
from stages.core import codec, data
from stages.core.models import segment_logits
from stages.detect import DetectorPredictor
from stages.ingest.generated import GeneratedSpec, render_image, split_indices
from stages.ingest.stage import ID_LENGTH
from stages.pseudolabel.stage import (
    SIGNAL_POLICIES,
    PseudolabelConfig,
    fill_memory,
    label_batch,
    queue_batch,
    signal_spec,
)
from stages.teach import SignalSpec, TeacherPredictor
from stages.train_detector import DetectorConfig, detector_step, new_detector_learner

logger = logging.getLogger(__name__)

INFERENCE_BATCH = 32
REFERENCE_ROWS = ("supervised", "full", "oracle")  # the rows that are not a policy's


@dataclass(frozen=True)
class QualityPlan:
    """What the benchmark trains: the dataset, one student recipe for every row, the detector
    (WPL), the policies, rounds and seeds."""

    dataset: GeneratedSpec
    student: segtrain.StudentConfig
    detector: DetectorConfig
    policies: tuple[str, ...] = SIGNAL_POLICIES
    rounds: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)

    @property
    def supervised(self) -> segtrain.SegTrainConfig:
        """The same recipe without the unlabeled part (supervised, full, and the teacher)."""
        fields = segtrain.SegTrainConfig.model_fields
        return segtrain.SegTrainConfig(
            **{k: v for k, v in self.student.model_dump().items() if k in fields}
        )


def default_plan(*, quick: bool = False, seeds: int | None = None) -> QualityPlan:
    """The benchmark's default (about 36 minutes on 2 CPU cores) or ``quick`` (a smoke test of
    every row in a few minutes; its numbers mean nothing)."""
    if quick:
        return QualityPlan(
            dataset=GeneratedSpec(
                seed=0, num_labeled=8, num_unlabeled=16, num_val=8, image_size=32, max_objects=2
            ),
            student=segtrain.StudentConfig(
                steps=6, batch_size=4, unlabeled_batch_size=4, lr=0.01, log_every=1000
            ),
            detector=DetectorConfig(steps=2, batch_size=2, min_size=64),
            seeds=tuple(range(seeds or 2)),
        )
    # colour_bias 0.7: with shapes as the only cue a network from random weights learns little in
    # a CPU budget even from every label; a partial colour cue makes the ceiling clear. Colour
    # being a cue, the strong views keep it (no hue jitter, no grayscale). AdamW 0.03: at 0.01
    # the 300 steps leave the teacher underfit (0.54 mIoU on its own 24 images), unconfident on
    # objects, and no student beats it; at 0.003 nothing is learned (seed 0). 600 steps: at 300
    # the ceiling was 0.04 above supervised, within one seed's spread (full 0.556 to 0.631); at
    # 600 it is 0.11 above (0.564 +- 0.004 against 0.673 +- 0.017, 3 seeds). 8 unlabeled images
    # a step (UniMatch's equal batches, the StudentConfig default), chosen on the oracle row: with
    # 4 the loop made 0.643 of perfect labels (g 0.73), with 8 0.660 (g 0.88, 3 seeds); 16 made
    # 0.669 (seeds 0 and 1) at 1.5 times the cost of a student step with 8.
    # Every row clips its gradients to norm 1 (``grad_clip``'s default): without it one batch order
    # of a 300-step teacher met a gradient of norm 34 and ended at 0.40 mIoU instead of 0.59.
    return QualityPlan(
        dataset=GeneratedSpec(
            seed=0,
            num_labeled=24,
            num_unlabeled=400,
            num_val=64,
            image_size=64,
            max_objects=4,
            colour_bias=0.7,
        ),
        student=segtrain.StudentConfig(
            steps=600,
            batch_size=8,
            lr=0.03,
            log_every=1000,
            strong=segtrain.StrongViewConfig(hue=0.0, grayscale=0.0),
        ),
        detector=DetectorConfig(steps=60, batch_size=4, min_size=128),
        seeds=tuple(range(seeds or 3)),
    )


@dataclass
class Split:
    """One split of the generated dataset in memory: images uint8[N, 3, S, S], masks
    uint8[N, S, S], ids, and the PNG bytes the pipeline's row functions read."""

    ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    image_png: list[bytes] = field(repr=False)
    mask_png: list[bytes] = field(repr=False)

    @classmethod
    def render(cls, spec: GeneratedSpec, split: str) -> Split:
        pairs = [render_image(spec, i) for i in split_indices(spec)[split]]
        images = np.stack([image for image, _ in pairs]).transpose(0, 3, 1, 2)
        masks = np.stack([mask for _, mask in pairs])
        return cls(
            [codec.pixel_digest(image)[:ID_LENGTH] for image, _ in pairs],  # as ingest does
            torch.from_numpy(np.ascontiguousarray(images)),
            torch.from_numpy(masks),
            [codec.encode_png(image) for image, _ in pairs],
            [codec.encode_png(mask) for _, mask in pairs],
        )

    def __len__(self) -> int:
        return len(self.ids)

    def join(self, other: Split) -> Split:
        return Split(
            self.ids + other.ids,
            torch.cat([self.images, other.images]),
            torch.cat([self.masks, other.masks]),
            self.image_png + other.image_png,
            self.mask_png + other.mask_png,
        )

    def rows(self, split: str, with_masks: bool) -> Iterator[dict[str, Any]]:
        """Decoded-image batches as the inference stages get them (``decode_for_inference``)."""
        side = self.images.shape[-1]
        for start in range(0, len(self), INFERENCE_BATCH):
            chunk = slice(start, start + INFERENCE_BATCH)
            n = len(self.ids[chunk])
            yield {
                "image_id": np.asarray(self.ids[chunk], dtype=object),
                "height": np.full(n, side),
                "width": np.full(n, side),
                "extent": np.full((n, 2), side, np.int32),
                "image": self.images[chunk].numpy(),
                "split": np.asarray([split] * n, dtype=object),
                "mask": np.asarray(
                    self.mask_png[chunk] if with_masks else [None] * n, dtype=object
                ),
            }


@dataclass
class World:
    """The three splits, rendered once per process."""

    labeled: Split
    unlabeled: Split
    val: Split
    num_classes: int
    image_size: int


def make_world(spec: GeneratedSpec) -> World:
    return World(
        Split.render(spec, "labeled"),
        Split.render(spec, "unlabeled"),
        Split.render(spec, "val"),
        spec.num_classes,
        spec.image_size,
    )


def _endless(arrays: dict[str, torch.Tensor], batch_size: int, seed: int) -> Iterator[dict]:
    """Batches drawn without replacement, reshuffled every pass."""
    generator = torch.Generator().manual_seed(seed)
    count = len(next(iter(arrays.values())))
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, max(count - batch_size, 0) + 1, batch_size):
            index = order[start : start + batch_size]
            yield {name: value[index] for name, value in arrays.items()}


def _labeled_arrays(split: Split) -> dict[str, torch.Tensor]:
    return {
        "image": split.images,
        "label": split.masks,
        "weight": torch.ones(split.masks.shape, dtype=torch.float32),
    }


def train_segmenter(
    cfg: segtrain.SegTrainConfig,
    world: World,
    labeled: Split,
    *,
    seed: int,
    unlabeled: dict[str, torch.Tensor] | None = None,
    policy: PseudolabelConfig | None = None,
) -> torch.nn.Module:
    """``cfg.steps`` steps of ``segtrain.train_step`` (the Ray Train loop's step) on CPU."""
    learner = segtrain.new_learner(
        cfg,
        num_classes=world.num_classes,
        crop_size=world.image_size,
        seed=seed,
        device=torch.device("cpu"),
        policy=policy,
    )
    labeled_batches = _endless(_labeled_arrays(labeled), cfg.batch_size, seed)
    unlabeled_batches = None
    if unlabeled is not None and learner.alpha > 0:
        batch = getattr(cfg, "unlabeled_batch_size", cfg.batch_size)
        unlabeled_batches = _endless(unlabeled, batch, seed + 1000)
    for step in range(cfg.steps):
        extra = next(unlabeled_batches) if unlabeled_batches is not None else None
        segtrain.train_step(learner, next(labeled_batches), extra, step)
    return learner.result.eval()


@torch.inference_mode()
def val_miou(model: torch.nn.Module, split: Split, num_classes: int) -> float:
    """The evaluate stage's mIoU of ``model`` on ``split``."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for start in range(0, len(split), INFERENCE_BATCH):
        images = data.normalize(split.images[start : start + INFERENCE_BATCH])
        pred = segment_logits(model, images).argmax(dim=1).numpy()
        truth = split.masks[start : start + INFERENCE_BATCH].numpy()
        for p, t in zip(pred, truth, strict=True):
            matrix += evaluate.confusion(p, t, num_classes)
    return evaluate.iou_from_confusion(matrix)[1]


def teacher_signals(model: torch.nn.Module, world: World, spec: SignalSpec) -> pa.Table:
    """The teach stage's rows for the labeled (with masks) and unlabeled images."""
    predictor = TeacherPredictor.of_model(model, torch.device("cpu"), spec)
    tables = [
        predictor(batch)
        for split, part in (("labeled", world.labeled), ("unlabeled", world.unlabeled))
        for batch in part.rows(split, with_masks=split == "labeled")
    ]
    return pa.concat_tables(tables)


def _spec(plan: QualityPlan) -> SignalSpec:
    """Signals every policy of the plan can be computed from."""
    return signal_spec(PseudolabelConfig(), plan.policies)


def train_detector(cfg: DetectorConfig, world: World, seed: int) -> DetectorPredictor:
    """The detector trained on the labeled images (``detector_step``), as a predictor."""
    learner = new_detector_learner(
        cfg, num_classes=world.num_classes, seed=seed, device=torch.device("cpu")
    )
    batches = _endless(
        {"image": world.labeled.images, "label": world.labeled.masks}, cfg.batch_size, seed
    )
    learner.model.train()
    for step in range(cfg.steps):
        detector_step(learner, next(batches), step)
    return DetectorPredictor.of_model(
        learner.model, learner.model_args, min_score=0.05, device=torch.device("cpu")
    )


def detections(predictor: DetectorPredictor, world: World) -> pa.Table:
    return pa.concat_tables(
        [predictor(batch) for batch in world.unlabeled.rows("unlabeled", with_masks=False)]
    )


def pseudolabel_rows(
    policy: PseudolabelConfig, signals: pa.Table, found: pa.Table | None, world: World
) -> pa.Table:
    """The pseudolabel stage's rows for the unlabeled images (WPL: with the teacher's
    prototypes, built the way ``teacher_prototypes`` builds them)."""
    unlabeled = signals.filter(pc.equal(signals["split"], "unlabeled"))
    prototypes = None
    if policy.policy == "wpl":
        labeled = signals.filter(pc.equal(signals["split"], "labeled"))
        contributions = pa.concat_tables(
            [
                queue_batch(labeled, policy.model_dump()),
                queue_batch(unlabeled, policy.model_dump(), detections=found),
            ]
        ).to_pylist()
        newest_first = sorted(contributions, key=lambda row: row["image_id"], reverse=True)
        dim = int(signals["feature_dim"][0].as_py())
        prototypes = fill_memory(newest_first, policy.wpl.memory_size, world.num_classes, dim)
    return label_batch(
        unlabeled, policy.model_dump(), prototypes, found if policy.policy == "wpl" else None
    )


@dataclass(frozen=True)
class LabelQuality:
    """Pseudo-labels against the unlabeled ground truth: overall coverage (kept / valid pixels)
    and precision (right / kept), and per class ``c`` (index order) ``recall[c]``, the share of
    the pixels of true class ``c`` kept with label ``c``, and ``precision_of[c]``, the share of
    the kept pixels labeled ``c`` that are ``c`` (NaN where none is kept)."""

    coverage: float
    precision: float
    recall: list[float]
    precision_of: list[float]


def label_quality(rows: pa.Table, world: World) -> LabelQuality:
    """Every number from one pass over the images, decoded as the evaluate stage decodes them
    (``decode_pseudolabel``): the confusion of the kept pixels against the masks, whose total is
    the kept valid pixels and whose diagonal the right ones, and the valid pixels per class."""
    masks = dict(zip(world.unlabeled.ids, world.unlabeled.mask_png, strict=True))
    classes = world.num_classes
    matrix = np.zeros((classes, classes), np.int64)  # kept pixels; rows truth, columns label
    truth_pixels = np.zeros(classes, np.int64)
    for row in rows.select(["image_id", "height", "width", "label", "keep"]).to_pylist():
        truth, label, keep = evaluate.decode_pseudolabel(masks[row["image_id"]], row)
        truth_pixels += np.bincount(truth[truth != data.IGNORE_INDEX], minlength=classes)[:classes]
        matrix += evaluate.confusion(label[keep], truth[keep], classes)
    valid, kept, correct = truth_pixels.sum(), matrix.sum(), np.trace(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(matrix) / truth_pixels
        precision_of = np.diag(matrix) / matrix.sum(axis=0)
    return LabelQuality(
        float(kept / valid),
        float(correct / kept) if kept else 0.0,
        recall.tolist(),
        precision_of.tolist(),
    )


def unlabeled_arrays(rows: pa.Table, world: World) -> dict[str, torch.Tensor]:
    """Pseudo-label rows joined with their images, decoded as the student's Ray Data step
    decodes them (``pseudolabel_rows_to_arrays``)."""
    pngs = dict(zip(world.unlabeled.ids, world.unlabeled.image_png, strict=True))
    table = rows.append_column(
        "image", pa.array([pngs[i] for i in rows["image_id"].to_pylist()], pa.binary())
    )
    batch = {name: np.asarray(table[name].to_pylist(), dtype=object) for name in table.column_names}
    arrays = segtrain.pseudolabel_rows_to_arrays(batch, world.image_size)
    return {name: torch.from_numpy(value) for name, value in arrays.items()}


def oracle_arrays(split: Split) -> dict[str, torch.Tensor]:
    """The student's unlabeled arrays with the ground truth as pseudo-labels: the labeled arrays
    (weight 1 everywhere) with every pixel kept, the threshold policy's maps (its live weight is
    the stored one)."""
    arrays = _labeled_arrays(split)
    return arrays | {"keep": torch.ones(split.masks.shape, dtype=torch.uint8)}


@dataclass
class SeedResult:
    """One row's outcome for one seed."""

    name: str
    seed: int
    miou: float
    labels: LabelQuality | None = None
    seconds: float = 0.0


@contextmanager
def _timed(results: list[SeedResult], name: str, seed: int) -> Iterator[SeedResult]:
    """Yield the row's result to fill in; its seconds are set and it is appended on exit."""
    result, started = SeedResult(name, seed, math.nan), time.perf_counter()
    yield result
    result.seconds = time.perf_counter() - started
    results.append(result)
    logger.info("seed %d: %-12s mIoU %.4f  (%.0f s)", seed, name, result.miou, result.seconds)


def run_seed(plan: QualityPlan, seed: int) -> list[SeedResult]:
    """Every row of the benchmark for one seed."""
    world = make_world(plan.dataset)
    results: list[SeedResult] = []
    classes = world.num_classes
    with _timed(results, "supervised", seed) as row:
        teacher = train_segmenter(plan.supervised, world, world.labeled, seed=seed)
        row.miou = val_miou(teacher, world.val, classes)
    with _timed(results, "full", seed) as row:
        everything = world.labeled.join(world.unlabeled)
        full = train_segmenter(plan.supervised, world, everything, seed=seed)
        row.miou = val_miou(full, world.val, classes)
    with _timed(results, "oracle", seed) as row:
        oracle = train_segmenter(
            plan.student, world, world.labeled, seed=seed, unlabeled=oracle_arrays(world.unlabeled)
        )
        row.miou = val_miou(oracle, world.val, classes)
    found = None
    if "wpl" in plan.policies:
        found = detections(train_detector(plan.detector, world, seed), world)
    signals = teacher_signals(teacher, world, _spec(plan))
    for policy in plan.policies:
        cfg = PseudolabelConfig(policy=policy)
        round_signals = signals
        for round_number in range(1, plan.rounds + 1):
            name = policy if round_number == 1 else f"{policy}+r{round_number}"
            with _timed(results, name, seed) as row:
                rows = pseudolabel_rows(cfg, round_signals, found, world)
                row.labels = label_quality(rows, world)
                arrays = unlabeled_arrays(rows, world)
                student = train_segmenter(
                    plan.student, world, world.labeled, seed=seed, unlabeled=arrays, policy=cfg
                )
                row.miou = val_miou(student, world.val, classes)
            if round_number < plan.rounds:
                round_signals = teacher_signals(student, world, _spec(plan))
    return results


def _seed_job(plan: QualityPlan, seed: int) -> list[SeedResult]:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return run_seed(plan, seed)


def run_benchmark(plan: QualityPlan, jobs: int | None = None) -> list[SeedResult]:
    """Every seed, ``jobs`` at a time in separate processes of one torch thread each (default:
    all seeds at once; small convolutions use one core better than two threads do)."""
    jobs = max(1, min(jobs or len(plan.seeds), len(plan.seeds)))
    if jobs == 1:
        return [result for seed in plan.seeds for result in run_seed(plan, seed)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        outcomes = pool.map(_seed_job, [plan] * len(plan.seeds), plan.seeds)
        return [result for outcome in outcomes for result in outcome]


def summarize(results: list[SeedResult]) -> list[dict[str, Any]]:
    """One object per row: ``name``, ``miou_mean``, ``miou_std`` (sample std over seeds),
    ``seeds``, ``gap_closing`` (None unless full is above supervised), and for pseudo-label rows
    mean ``coverage`` and ``precision`` and, per class, ``recall_per_class`` and
    ``precision_per_class`` (means over the seeds that have a value; None where none has)."""
    names = list(dict.fromkeys(r.name for r in results))
    by_name = {name: [r for r in results if r.name == name] for name in names}
    means = {name: float(np.mean([r.miou for r in rows])) for name, rows in by_name.items()}
    gap = means.get("full", math.nan) - means.get("supervised", math.nan)  # NaN: no such rows
    summary = []
    for name, rows in by_name.items():
        mious = [r.miou for r in rows]
        row: dict[str, Any] = {
            "name": name,
            "miou_mean": means[name],
            "miou_std": float(np.std(mious, ddof=1)) if len(mious) > 1 else 0.0,
            "seeds": [r.seed for r in rows],
            "miou_per_seed": mious,
            "gap_closing": (means[name] - means["supervised"]) / gap if gap > 0 else None,
            "seconds": float(np.sum([r.seconds for r in rows])),
        }
        labels = [r.labels for r in rows if r.labels is not None]
        if labels:
            row["coverage"] = float(np.mean([q.coverage for q in labels]))
            row["precision"] = float(np.mean([q.precision for q in labels]))
            row["recall_per_class"] = _class_means([q.recall for q in labels])
            row["precision_per_class"] = _class_means([q.precision_of for q in labels])
        summary.append(row)
    return summary


def _class_means(per_seed: list[list[float]]) -> list[float | None]:
    """Per class, the mean over the seeds where it is defined (None where it never is)."""
    values = np.asarray(per_seed, np.float64)
    defined = ~np.isnan(values)
    totals, counts = np.where(defined, values, 0.0).sum(axis=0), defined.sum(axis=0)
    return [float(t / n) if n else None for t, n in zip(totals, counts, strict=True)]


def row_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics of the rows: ``<row>.miou_mean``, ``.miou_std``, ``.gap_closing``, ...
    (``csl+r2`` is logged as ``csl_r2``: MLflow names take no ``+``)."""
    keys = ("miou_mean", "miou_std", "gap_closing", "coverage", "precision")
    return {
        f"{row['name'].replace('+', '_')}.{key}": float(row[key])
        for row in rows
        for key in keys
        if row.get(key) is not None
    }


def format_table(rows: list[dict[str, Any]], class_names: Sequence[str] = ()) -> str:
    """The rows as text; then, per pseudo-label row and class, the share of the class's pixels
    kept with the right label and the precision of the pixels kept with that label."""
    lines = [f"{'row':<14} {'mIoU':>15} {'g':>7} {'coverage':>9} {'precision':>9}"]
    for row in rows:
        miou = f"{row['miou_mean']:.4f} ± {row['miou_std']:.4f}"
        cover = f"{row['coverage']:.3f}" if "coverage" in row else "-"
        prec = f"{row['precision']:.3f}" if "precision" in row else "-"
        g = "-" if row["gap_closing"] is None else f"{row['gap_closing']:.3f}"
        lines.append(f"{row['name']:<14} {miou:>15} {g:>7} {cover:>9} {prec:>9}")
    labeled = [row for row in rows if "recall_per_class" in row]
    if labeled:
        count = len(labeled[0]["recall_per_class"])
        names = list(class_names)[:count] + [f"class {c}" for c in range(len(class_names), count)]
        lines += ["", "kept per class: recall / precision"]
        lines.append(f"{'row':<14} " + " ".join(f"{name[:11]:>11}" for name in names))
        for row in labeled:
            pairs = zip(row["recall_per_class"], row["precision_per_class"], strict=True)
            cells = [f"{_fraction(r)}/{_fraction(p)}" for r, p in pairs]
            lines.append(f"{row['name']:<14} " + " ".join(f"{cell:>11}" for cell in cells))
    return "\n".join(lines)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(rows: list[dict[str, Any]]) -> bytes:
    """mIoU (mean ± std over seeds) per row, round 1 and 2 side by side, with the supervised,
    full and oracle lines: PNG bytes. Points, not bars: the axis spans the values, not 0..1, so that
    differences of a few hundredths show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {row["name"]: row for row in rows}
    policies = [r["name"] for r in rows if r["name"] not in REFERENCE_ROWS and "+" not in r["name"]]
    fig, ax = plt.subplots(figsize=(1.6 * len(policies) + 2.5, 3.8))
    x = np.arange(len(policies))
    for offset, suffix, label in ((-0.2, "", "round 1"), (0.2, "+r2", "round 2")):
        present = [i for i, p in enumerate(policies) if p + suffix in by_name]
        if not present:
            continue
        means = [by_name[policies[i] + suffix]["miou_mean"] for i in present]
        stds = [by_name[policies[i] + suffix]["miou_std"] for i in present]
        ax.errorbar(x[present] + offset, means, yerr=stds, fmt="o", capsize=3, label=label)
    for name, style in zip(REFERENCE_ROWS, ("--", ":", "-."), strict=True):
        if name in by_name:
            ax.axhline(by_name[name]["miou_mean"], color="k", linestyle=style, label=name)
    ax.set_xticks(x, policies)
    ax.set_xlim(-0.6, len(policies) - 0.4)
    ax.set_ylabel("val mIoU (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def plan_params(plan: QualityPlan) -> dict[str, str]:
    """The plan, flattened, for MLflow params."""
    flat = {f"dataset.{k}": v for k, v in asdict(plan.dataset).items()}
    flat |= {f"student.{k}": v for k, v in plan.student.model_dump().items()}
    flat |= {f"detector.{k}": v for k, v in plan.detector.model_dump().items()}
    flat |= {"policies": ",".join(plan.policies), "rounds": plan.rounds, "seeds": plan.seeds}
    return {k: str(v) for k, v in flat.items()}
