"""The stage graph: each stage is a plain function plus the names of what it reads and writes,
wired in one explicit list. The functions here only map config to the stages' arguments."""

from __future__ import annotations

import logging
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
from pydantic import BaseModel

from pipeline.cache.entries import output_dataset
from pipeline.config import PipelineConfig, to_yaml
from pipeline.models import store_export
from stages import detect, evaluate, segtrain, teach, train_detector
from stages.core.constants import SPLITS
from stages.core.errors import ModelError, SourceError
from stages.core.inference import InferenceConfig, resolve_gpus
from stages.core.shards import ShardPool, digest_json, file_digest
from stages.core.storage import DatasetRef, Storage
from stages.ingest import stage as ingest
from stages.ingest.folder import SourceItem
from stages.pseudolabel import stage as pseudolabel
from stages.pseudolabel.config import GROUND_TRUTH

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """What a stage function gets: config, storage, the outputs of the stages before it (as their
    cache entries recorded them), and where the running stage writes (its attempt folder)."""

    config: PipelineConfig
    storage: Storage
    run_id: str
    items: list[SourceItem]
    source_digest: str = ""
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # stage name -> its key in this run
    writing: tuple[str, ...] = ()
    attempt: str = ""
    sink: Any = None
    results: dict[str, Any] = field(default_factory=dict)

    def dataset(self, name: str) -> DatasetRef:
        """The running stage's output ``name`` (in its attempt folder), or an earlier output."""
        if name in self.writing:
            return DatasetRef(self.storage, posixpath.join(self.attempt, name), name)
        return output_dataset(self.storage, name, self.outputs[name])

    def model_path(self, name: str) -> str:
        if name in self.writing:
            return posixpath.join(self.attempt, f"{name}.pt")
        return self.storage.resolve(self.outputs[name]["path"])

    def digest(self, name: str, split: str | None = None) -> str:
        """An input's identity in cache keys: a model's sha256, the images' per-split content
        digest, or the key of the entry that produced a dataset."""
        output = self.outputs[name]
        if output["kind"] == "model":
            return str(output["sha256"])
        if split is not None:
            return str(output["digests"].get(split, "empty"))
        return str(output["key"])

    def pool(self, stage: str, family: dict[str, Any]) -> ShardPool:
        return ShardPool.of(self.storage, stage, digest_json(family))

    def train_name(self, stage: str, token: str | None = None) -> str:
        """Ray Train run name of attempt ``token`` (default: the running one) of the stage's
        key: racing attempts never share a folder, and a rerun that takes over a dead attempt
        (same token) resumes from its checkpoints. Only the stage name precedes the last "-"."""
        token = token or posixpath.basename(self.attempt)
        return f"{stage}-{self.keys[stage][:16]}_{token.replace('-', '_')}"

    def loop_extra(self) -> dict[str, Any]:
        threads = self.config.runtime.torch_threads or os.cpu_count() or 1
        return {
            "seed": self.config.seed,
            "image_size": self.config.data.image_size,
            "crop_size": self.config.data.crop,
            "torch_threads": threads,
            "sink": self.sink,
            "resolved_config": to_yaml(self.config),
        }


@dataclass(frozen=True)
class Stage:
    """A stage: its function, what it reads and writes, its output schema, and ``fields``: what
    (besides name, schema and package version) its cache key is computed from. The rest
    declares how the runner presents it (the runner knows no stage by name): its config
    ``section`` (the stage run's params), the image splits it reads (``image_inputs``: split and
    MLflow context, logged as dataset inputs) and the pseudo-label set it trains on
    (``label_input``), the figures its "done" line shows (``key_figures``), its metrics the
    pipeline run logs as its own (``summary``), and the outputs whose entry records the run's
    per-split image digests (``split_digests``)."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    run: Callable[[Context], dict[str, float]]
    fields: Callable[[Context], dict[str, Any]]
    schema: str
    enabled: Callable[[PipelineConfig], bool] = lambda config: True
    # plots from the stage's recorded results (drawn again on a cache hit)
    figures: Callable[[PipelineConfig, dict[str, Any]], dict[str, bytes]] | None = None
    section: str | None = None
    image_inputs: tuple[tuple[str, str], ...] = ()
    label_input: str | None = None
    key_figures: tuple[str, ...] = ()
    summary: tuple[str, ...] = ()
    split_digests: tuple[str, ...] = ()


@dataclass(frozen=True)
class Round:
    """Round ``number`` of teach -> pseudolabel -> train_student. Round 1 learns from the
    teacher; round r > 1 from round r - 1's student. Its stages and outputs carry ``_r<r>``."""

    number: int

    def name(self, base: str) -> str:
        return base if self.number == 1 else f"{base}_r{self.number}"

    @property
    def teacher(self) -> str:
        """The model output this round's teach stage runs."""
        return "teacher" if self.number == 1 else Round(self.number - 1).name("student")


def final_round(config: PipelineConfig) -> Round:
    return Round(config.rounds)


# Settings that change how a stage runs but never what it produces.
TRAIN_EXECUTION = {
    "log_every",
    "checkpoint_every",
    "max_failures",
    "workers",
    "resources",
    "weights",
    "init",  # its content digest is a field of its own
    "enabled",
}
INFERENCE_EXECUTION = set(InferenceConfig.model_fields)


def semantic(section: BaseModel, execution: set[str]) -> dict[str, Any]:
    return {k: v for k, v in section.model_dump(mode="json").items() if k not in execution}


def given_weights(path: str) -> str:
    """sha256 of a weights file the config names (local path or URL)."""
    fs, inner = fsspec.core.url_to_fs(path)
    if not fs.exists(inner):
        raise ModelError(f"weights file {path!r} does not exist")
    return file_digest(fs, inner)


def pseudolabel_fields(config: PipelineConfig) -> dict[str, Any]:
    """The pseudo-label settings that matter for the chosen policy (others' options excluded;
    ground_truth: the policy alone)."""
    cfg = config.pseudolabel
    fields: dict[str, Any] = {"policy": cfg.policy}
    if cfg.policy in {"threshold", "wpl"}:
        fields["tau"] = cfg.tau
    if cfg.policy in {"s4mc", "csl", "wpl"}:
        fields[cfg.policy] = getattr(cfg, cfg.policy).model_dump(mode="json")
    return fields


def pseudolabel_key_fields(
    config: PipelineConfig, signals: str, detections: str | None, unlabeled: str | None = None
) -> dict[str, Any]:
    """What the pseudolabel stage's key is computed from: its inputs' digests (the detections
    only for WPL) and the chosen policy's settings. ground_truth reads no teacher signals: its
    key is the unlabeled images' digest (``unlabeled``, masks included), the policy and the
    classes, so every teacher and seed shares one ground-truth set of the same images."""
    if _ground_truth(config):
        if unlabeled is None:
            raise ValueError("the ground_truth policy's key needs the unlabeled images' digest")
        return {
            "unlabeled": unlabeled,
            **pseudolabel_fields(config),
            "num_classes": config.data.num_classes,
        }
    return {
        "signals": signals,
        "detections": detections if _wpl(config) else None,
        **pseudolabel_fields(config),
        "num_classes": config.data.num_classes,
    }


def _train_fields(ctx: Context, section: BaseModel, weights: str | None) -> dict[str, Any]:
    base = {"num_classes": ctx.config.data.num_classes}
    if weights:
        return {**base, "arch": getattr(section, "arch", None), "weights": given_weights(weights)}
    fields = {
        **base,
        "train": semantic(section, TRAIN_EXECUTION),
        "labeled": ctx.digest("images", "labeled"),
        **_geometry(ctx),
        "crop_size": ctx.config.data.crop,
        "seed": ctx.config.seed,
    }
    init = getattr(section, "init", None)
    if init:  # the pretrained weights by content, wherever they are read from
        fields["init"] = given_weights(init)
    return fields


def _geometry(ctx: Context) -> dict[str, Any]:
    """How images reach the models: fitted (long side, aspect kept) to an image_size canvas."""
    return {"image_size": ctx.config.data.image_size, "canvas": "fit-long-side-pad"}


def _ingest_fields(ctx: Context) -> dict[str, Any]:
    return {"source": ctx.source_digest, "num_classes": ctx.config.data.num_classes}


def _detect_family(ctx: Context) -> dict[str, Any]:
    return {
        "stage": "detect",
        "detector": ctx.digest("detector"),
        "min_score": ctx.config.detect.min_score,
        **_geometry(ctx),
    }


def _signal_spec(ctx: Context) -> teach.SignalSpec:
    return pseudolabel.signal_spec(ctx.config.pseudolabel, ctx.config.teach.policies)


def _teach_family(ctx: Context, round_: Round) -> dict[str, Any]:
    return {
        "stage": "teach",
        "teacher": ctx.digest(round_.teacher),
        # teach.policies counts through the signals it makes the stage store
        # teach.tta only where set: the keys of runs without it stay what they were
        "teach": semantic(
            ctx.config.teach,
            INFERENCE_EXECUTION
            | {"policies"}
            | (set() if ctx.config.teach.tta.enabled else {"tta"}),
        ),
        "signals": _signal_spec(ctx).model_dump(),
        **_geometry(ctx),
    }


def _student_fields(ctx: Context, round_: Round) -> dict[str, Any]:
    return {
        **_train_fields(ctx, ctx.config.student, ctx.config.student.weights),
        "unlabeled": ctx.digest("images", "unlabeled"),
        "pseudolabels": ctx.digest(round_.name("pseudolabels")),
        "pseudolabel": pseudolabel_fields(ctx.config),
    }


def _evaluate_fields(ctx: Context) -> dict[str, Any]:
    last = final_round(ctx.config)
    fields = {
        "teacher": ctx.digest("teacher"),
        "student": ctx.digest(last.name("student")),
        "val": ctx.digest("images", "val"),
        "unlabeled": ctx.digest("images", "unlabeled"),
        "pseudolabels": ctx.digest(last.name("pseudolabels")),
        "num_classes": ctx.config.data.num_classes,
        **_geometry(ctx),
        "window": ctx.config.data.crop,
    }
    if last.number > 1:  # earlier rounds are evaluated too
        fields["rounds"] = [
            [ctx.digest(Round(r).name("student")), ctx.digest(Round(r).name("pseudolabels"))]
            for r in range(1, last.number)
        ]
    return fields


def needed_splits(config: PipelineConfig) -> dict[str, str]:
    """The splits this run cannot do without, each with the stage that needs it."""
    needs = {"unlabeled": "teach", "val": "evaluate"}
    training = [
        name
        for name, weights in (
            ("teacher", config.teacher.weights),
            ("student", config.student.weights),
        )
        if weights is None
    ]
    if config.detector.enabled and config.detector.weights is None:
        training.append("detector")
    if training:
        needs["labeled"] = "training the " + " and ".join(training)
    return needs


def check_splits(config: PipelineConfig, counts: dict[str, int], where: str) -> None:
    """Refuse a run whose needed split is empty (a training loop over an empty shard would never
    yield a batch); ``where`` says whose counts these are (the source's listing, or ingest's)."""
    empty = {split: need for split, need in needed_splits(config).items() if not counts.get(split)}
    if not empty:
        return
    found = ", ".join(f"{split} {counts.get(split, 0)}" for split in SPLITS)
    hint = {
        "folder": "the folder's splits/<split>.txt lists, or its masks/ and data.val_fraction",
        "voc": "data.voc and its split lists",
        "cityscapes": "data.cityscapes and its split lists",
        "generated": "data.generated",
    }[config.data.source]
    raise SourceError(
        f"{where}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
        f"({found}); needed for {'; '.join(empty.values())}. Check {hint}"
    )


def trained_sections(
    config: PipelineConfig,
) -> dict[str, segtrain.SegTrainConfig | train_detector.DetectorConfig]:
    """The config sections of the networks a run trains or loads: teacher, student and, when
    enabled, the detector."""
    sections: dict[str, segtrain.SegTrainConfig | train_detector.DetectorConfig] = {
        "teacher": config.teacher,
        "student": config.student,
    }
    if config.detector.enabled:
        sections["detector"] = config.detector
    return sections


def check_weights(config: PipelineConfig) -> None:
    """Every weights file the config names exists (local path or fsspec URL): refuse before any
    work, not when its stage starts after ingest."""
    for section, cfg in trained_sections(config).items():
        for key, path in (("weights", cfg.weights), ("init", cfg.init)):
            if path is None:
                continue
            try:
                fs, inner = fsspec.core.url_to_fs(path)
                found = fs.isfile(inner)
            except (OSError, ValueError) as exc:
                raise ModelError(f"{section}.{key}={path!r} cannot be read: {exc}") from exc
            if not found:
                what = {
                    "weights": "a checkpoint file (local path or URL), or leave it unset to train",
                    "init": "a state dict file (local path or URL), or leave it unset to train "
                    "from random weights",
                }[key]
                raise ModelError(f"{section}.{key}={path!r} does not exist: give {what}")


def random_start_warnings(config: PipelineConfig) -> list[str]:
    """On real data (any source but ``generated``), each network that trains from random
    weights: what the SSL recipes never do, and a missing ``*.init`` is the likeliest reason."""
    if config.data.source == "generated":
        return []
    return [
        f"{name} trains {cfg.arch} from random weights: the semi-supervised recipes fine-tune "
        f"ImageNet (detector: COCO) weights; give {name}.init (README: Pretrained weights)"
        for name, cfg in trained_sections(config).items()
        if cfg.init is None and cfg.weights is None
    ]


def split_counts(items: list[SourceItem]) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    for item in items:
        counts[item.split] += 1
    return counts


def _check_bad_fraction(ctx: Context, quarantined: int, rows: int) -> None:
    """Fail the run when more than ``data.max_bad_fraction`` of the source's items were
    quarantined: a folder of mostly unreadable files is a broken source, not a dataset."""
    total = quarantined + rows
    limit = ctx.config.data.max_bad_fraction
    if total and quarantined / total > limit:
        directory = ctx.dataset("quarantine").directory
        table = directory if ctx.storage.is_local else ctx.storage.fs.unstrip_protocol(directory)
        raise SourceError(
            f"{quarantined} of {total} items ({quarantined / total:.1%}) were quarantined, more "
            f"than data.max_bad_fraction={limit}; the reasons are in the quarantine table at "
            f"{table}"
        )


def _ingest(ctx: Context) -> dict[str, float]:
    data = ctx.config.data
    result = ingest.run(
        ctx.items,
        num_classes=data.num_classes,
        out=ctx.dataset("images"),
        quarantine=ctx.dataset("quarantine"),
        num_blocks=data.blocks,
    )
    _check_bad_fraction(ctx, result.quarantined, result.rows)
    check_splits(ctx.config, result.per_split, "after ingest (quarantined items removed)")
    ctx.results["quarantined_images"] = result.quarantined
    ctx.results["digests"] = result.digests
    metrics = {f"images_{split}": float(n) for split, n in result.per_split.items()}
    metrics.update({f"images_{kind}": float(n) for kind, n in result.notes.items()})
    return {
        **metrics,
        "images": float(result.rows),
        "quarantined_images": float(result.quarantined),
    }


def _train_teacher(ctx: Context) -> dict[str, float]:
    cfg, data = ctx.config.teacher, ctx.config.data
    datasets = (
        {}
        if cfg.weights
        else {"labeled": segtrain.labeled_dataset(ctx.dataset("images"), data.image_size)}
    )
    metrics = segtrain.run_segmenter(
        cfg,
        datasets=datasets,
        num_classes=data.num_classes,
        storage=ctx.storage,
        out_path=ctx.model_path("teacher"),
        name=ctx.train_name("train_teacher"),
        loop_extra=ctx.loop_extra(),
        use_gpu=ctx.config.runtime.use_gpu,
    )
    _export(ctx, "teacher")
    return metrics


def _export(ctx: Context, name: str) -> None:
    """The trained segmenter ``name`` as an MLflow model in the entry (``tracking.log_models``);
    the runner logs it with every run that uses the entry."""
    if ctx.config.tracking.log_models:
        started = time.perf_counter()
        directory = posixpath.join(ctx.attempt, f"{name}_mlflow")
        store_export(ctx.storage, ctx.model_path(name), directory)
        ctx.results["mlflow_models"] = {name: ctx.storage.relative(directory)}
        logger.debug("%s exported as an MLflow model in %.1fs", name, time.perf_counter() - started)


def _train_detector(ctx: Context) -> dict[str, float]:
    cfg = ctx.config.detector
    labeled = (
        None
        if cfg.weights
        else segtrain.labeled_dataset(ctx.dataset("images"), ctx.config.data.image_size)
    )
    return train_detector.run(
        cfg,
        labeled=labeled,
        num_classes=ctx.config.data.num_classes,
        storage=ctx.storage,
        out_path=ctx.model_path("detector"),
        name=ctx.train_name("train_detector"),
        loop_extra=ctx.loop_extra(),
        use_gpu=ctx.config.runtime.use_gpu,
    )


def _detect(ctx: Context) -> dict[str, float]:
    return detect.run(
        resolve_gpus(ctx.config.detect, ctx.config.runtime.use_gpu),
        images=ctx.dataset("images"),
        checkpoint_path=ctx.model_path("detector"),
        image_size=ctx.config.data.image_size,
        out=ctx.dataset("detections"),
        pool=ctx.pool("detect", _detect_family(ctx)),
    )


def _teach(ctx: Context, round_: Round) -> dict[str, float]:
    return teach.run(
        resolve_gpus(ctx.config.teach, ctx.config.runtime.use_gpu),
        spec=_signal_spec(ctx),
        images=ctx.dataset("images"),
        checkpoint_path=ctx.model_path(round_.teacher),
        image_size=ctx.config.data.image_size,
        out=ctx.dataset(round_.name("teacher_signals")),
        pool=ctx.pool("teach", _teach_family(ctx, round_)),
    )


def _pseudolabel(ctx: Context, round_: Round) -> dict[str, float]:
    return pseudolabel.run(
        ctx.config.pseudolabel,
        signals=ctx.dataset(round_.name("teacher_signals")),
        out=ctx.dataset(round_.name("pseudolabels")),
        detections=ctx.dataset("detections") if _wpl(ctx.config) else None,
        images=ctx.dataset("images") if _ground_truth(ctx.config) else None,
    )


def _train_student(ctx: Context, round_: Round) -> dict[str, float]:
    cfg, data = ctx.config.student, ctx.config.data
    images = ctx.dataset("images")
    datasets = {
        "labeled": segtrain.labeled_dataset(images, data.image_size),
        "unlabeled": segtrain.unlabeled_dataset(
            images, ctx.dataset(round_.name("pseudolabels")), data.image_size
        ),
    }
    extra = {
        **ctx.loop_extra(),
        "policy": ctx.config.pseudolabel,
    }
    stage = round_.name("train_student")
    metrics = segtrain.run_segmenter(
        cfg,
        datasets=datasets,
        num_classes=data.num_classes,
        storage=ctx.storage,
        out_path=ctx.model_path(round_.name("student")),
        name=ctx.train_name(stage),
        loop_extra=extra,
        use_gpu=ctx.config.runtime.use_gpu,
    )
    _export(ctx, round_.name("student"))
    return metrics


def _evaluate(ctx: Context) -> dict[str, float]:
    data, images = ctx.config.data, ctx.dataset("images")
    last = final_round(ctx.config)
    rounds = [Round(r) for r in range(1, last.number + 1)]
    # the final student is "student"; an earlier round's is "student_r<r>" in the metrics
    names = {"teacher": "teacher", "student": last.name("student")}
    names |= {f"student_r{r.number}": r.name("student") for r in rounds[:-1]}
    metrics: dict[str, float] = {}
    per_class: dict[str, list[float]] = {}
    results = evaluate.evaluate_models(
        resolve_gpus(ctx.config.evaluate, ctx.config.runtime.use_gpu),
        images=images,
        checkpoints={label: ctx.model_path(name) for label, name in names.items()},
        num_classes=data.num_classes,
        image_size=data.image_size,
    )
    for model, result in results.items():
        metrics[f"{model}_miou"] = result["miou"]
        per_class[model] = result["iou"]
        for name, iou in zip(data.names(), result["iou"], strict=True):
            if iou == iou:  # not NaN
                metrics[f"{model}_iou.{name}"] = iou
    for r in rounds:  # round 1's keep their names: pseudolabel_coverage, ...
        quality = evaluate.pseudolabel_quality(images, ctx.dataset(r.name("pseudolabels")))
        prefix = "pseudolabel" if r.number == 1 else f"pseudolabel_r{r.number}"
        metrics |= {key.replace("pseudolabel", prefix, 1): v for key, v in quality.items()}
    ctx.results["per_class_iou"] = per_class
    return metrics


def _evaluate_figures(config: PipelineConfig, results: dict[str, Any]) -> dict[str, bytes]:
    per_class = results.get("per_class_iou")
    if not per_class:
        return {}
    return {"iou_per_class.png": evaluate.iou_plot(config.data.names(), per_class)}


def _wpl(config: PipelineConfig) -> bool:
    return config.pseudolabel.policy == "wpl"


def _ground_truth(config: PipelineConfig) -> bool:
    return config.pseudolabel.policy == GROUND_TRUTH


def _round_stages(round_: Round) -> tuple[Stage, Stage, Stage]:
    """teach -> pseudolabel -> train_student of one round, reading the round's teacher."""
    signals, labels = round_.name("teacher_signals"), round_.name("pseudolabels")
    return (
        Stage(
            round_.name("teach"),
            ("images", round_.teacher),
            (signals,),
            lambda ctx: _teach(ctx, round_),
            lambda ctx: {
                **_teach_family(ctx, round_),
                "labeled": ctx.digest("images", "labeled"),
                "unlabeled": ctx.digest("images", "unlabeled"),
            },
            teach.SCHEMA,
            section="teach",
            image_inputs=(("labeled", "inference"), ("unlabeled", "inference")),
            key_figures=("images_inferred", "shards_reused"),
        ),
        Stage(
            round_.name("pseudolabel"),
            (signals, "detections", "images"),  # images: ground_truth's masks
            (labels,),
            lambda ctx: _pseudolabel(ctx, round_),
            lambda ctx: pseudolabel_key_fields(
                ctx.config,
                ctx.digest(signals),
                ctx.digest("detections") if _wpl(ctx.config) else None,
                ctx.digest("images", "unlabeled") if _ground_truth(ctx.config) else None,
            ),
            pseudolabel.SCHEMA,
            section="pseudolabel",
            key_figures=("images", "mean_image_coverage"),
        ),
        Stage(
            round_.name("train_student"),
            ("images", labels),
            (round_.name("student"),),
            lambda ctx: _train_student(ctx, round_),
            lambda ctx: _student_fields(ctx, round_),
            "segmenter/1",
            section="student",
            image_inputs=(("labeled", "train"), ("unlabeled", "train")),
            label_input=labels,
            key_figures=("trained_steps", "loss_s", "loss_u", "steps_per_s"),
        ),
    )


# evaluate's figures that the pipeline run logs as its own (``teacher_miou``, ...)
EVALUATE_SUMMARY = ("teacher_miou", "student_miou", "pseudolabel_coverage", "pseudolabel_precision")

STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        ("source",),
        ("images", "quarantine"),
        _ingest,
        _ingest_fields,
        ingest.SCHEMA,
        key_figures=("images", "quarantined_images"),
        split_digests=("images",),
    ),
    Stage(
        "train_teacher",
        ("images",),
        ("teacher",),
        _train_teacher,
        lambda ctx: _train_fields(ctx, ctx.config.teacher, ctx.config.teacher.weights),
        "segmenter/1",
        section="teacher",
        image_inputs=(("labeled", "train"),),
        key_figures=("trained_steps", "loss_s", "steps_per_s"),
    ),
    Stage(
        "train_detector",
        ("images",),
        ("detector",),
        _train_detector,
        lambda ctx: _train_fields(ctx, ctx.config.detector, ctx.config.detector.weights),
        "detector/1",
        lambda c: c.detector.enabled,
        section="detector",
        image_inputs=(("labeled", "train"),),
        key_figures=("trained_steps", "loss", "steps_per_s"),
    ),
    Stage(
        "detect",
        ("images", "detector"),
        ("detections",),
        _detect,
        lambda ctx: {**_detect_family(ctx), "unlabeled": ctx.digest("images", "unlabeled")},
        detect.SCHEMA,
        lambda c: c.detector.enabled,
        section="detect",
        image_inputs=(("unlabeled", "inference"),),
        key_figures=("images_inferred", "shards_reused", "boxes_per_image"),
    ),
    *_round_stages(Round(1)),
    Stage(
        "evaluate",
        ("images", "teacher", "student", "pseudolabels"),
        ("metrics",),
        _evaluate,
        _evaluate_fields,
        "metrics/1",
        figures=_evaluate_figures,
        section="evaluate",
        image_inputs=(("val", "eval"), ("unlabeled", "eval")),
        key_figures=EVALUATE_SUMMARY,
        summary=EVALUATE_SUMMARY,
    ),
)


def all_stages(config: PipelineConfig) -> tuple[Stage, ...]:
    """Every stage of a run in order: round 1 as in ``STAGES``, then rounds 2..N, evaluate last."""
    later = [s for r in range(2, config.rounds + 1) for s in _round_stages(Round(r))]
    if not later:
        return check_graph(STAGES)
    last = final_round(config)  # evaluate reads every round's student and pseudo-labels
    students = tuple(
        Round(r).name(n) for r in range(1, last.number + 1) for n in ("student", "pseudolabels")
    )
    evaluate_stage = replace(STAGES[-1], reads=("images", "teacher", *students))
    return check_graph((*STAGES[:-1], *later, evaluate_stage))


def check_graph(stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """``stages`` as they are, after checking their declarations: unique names, each output
    written once, and every read written by an earlier stage (``source``: the data source). A
    read may come from a stage a config disables (``detections`` without a detector): the stage
    then runs without it, as its key fields say."""
    written, names = {"source"}, set()
    for stage in stages:
        if stage.name in names:
            raise ValueError(f"two stages are named {stage.name!r}")
        names.add(stage.name)
        unknown = [name for name in stage.reads if name not in written]
        if unknown:
            raise ValueError(
                f"stage {stage.name!r} reads {', '.join(unknown)}, which no earlier stage writes"
            )
        twice = written.intersection(stage.writes)
        if twice:
            raise ValueError(f"stage {stage.name!r} writes {', '.join(sorted(twice))} again")
        written.update(stage.writes)
    return stages


def planned(config: PipelineConfig) -> list[Stage]:
    return [s for s in all_stages(config) if s.enabled(config)]
