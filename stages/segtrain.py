"""Training a segmentation network with Ray Train: the teacher (labeled only) and the student
(labeled + offline pseudo-labels). One loop, top to bottom:

    L = L_s + alpha * L_u,   L_u = sum_p w_p keep_p valid_p CE_p / sum_p valid_p   (methods.md §0)

``train_step`` is the whole step (UniMatch's recipe on offline targets): the labeled batch gets a
weak view; the unlabeled batch one weak geometric draw, applied to the image and to every stored
map alike, then two strong photometric views, each CutMixed with a partner image whose maps are
mixed in the same box. The policy's live parts (methods.md §5) happen here: S4MC's keep mask from
each view's stored margins (DPA), CSL's extra TMP view of the weak view (its own photometric draw
without grayscale, no CutMix; its loss averaged with the strong views'),
WPL's prototype memory fed from the student's features and refreshed across workers every
``refresh_every`` steps. Periodic work is ``if (step + 1) % n == 0``. ``train_loop`` runs it on
Ray Train.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stages.core import augment, data, fastconv, tables
from stages.core.config import StrictModel
from stages.core.constants import IGNORE_INDEX
from stages.core.models import (
    build_segmenter,
    check_arch,
    feature_layer,
    finished_model,
    given_checkpoint,
    make_checkpoint,
    segment_logits,
    segment_with_features,
    unwrap,
    write_trained,
)
from stages.core.pretrained import (
    SEGMENTER,
    apply_state,
    decode_state,
    encode_state,
    load_init,
    param_groups,
)
from stages.core.progress import Poster
from stages.core.storage import DatasetRef, Storage
from stages.core.training import (
    CHECKPOINT_FILE,
    TrainingRun,
    endless_batches,
    fit,
    hold_point,
    inject_fault,
    restore_rng,
    rng_state,
    worker_logging,
)
from stages.pseudolabel import live
from stages.pseudolabel.memory import (
    PrototypeMemory,
    gather_states,
    restore_state,
    select_labeled,
    select_reliable,
)
from stages.pseudolabel.ops import weighted_unsup_loss
from stages.pseudolabel.stage import PseudolabelConfig, decode_pseudolabels, weight_offset

logger = logging.getLogger(__name__)


class MetricSink(Protocol):
    """Where rank 0 sends its metrics (the pipeline passes an MLflow-backed sink)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class SegTrainConfig(TrainingRun):
    """How a segmentation network is trained (teacher or student)."""

    arch: str = Field(
        "lraspp_mobilenet_v3_large",
        description="a torchvision segmentation builder: deeplabv3_resnet50/101, "
        "deeplabv3_mobilenet_v3_large, fcn_resnet50/101, lraspp_mobilenet_v3_large",
    )
    steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="labeled images a step (per worker)")
    lr: float = Field(2e-3, gt=0, description="AdamW's peak learning rate (the heads')")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW's decoupled weight decay")
    log_every: int = Field(25, ge=1, description="steps between logged metrics and lines")
    backbone_lr: float = Field(
        1.0,
        gt=0,
        description="the backbone's learning rate as a fraction of lr (fine-tuning recipes: "
        "UniMatch's heads learn at 10 times the backbone's rate, i.e. 0.1)",
    )
    schedule: Literal["poly", "cosine"] = Field("poly", description="learning-rate decay to 0")
    scale: tuple[float, float] = Field(
        (0.5, 2.0),
        strict=False,
        description="range of the random factor each training image is scaled by (aspect "
        "ratio kept) before its data.crop_size crop: UniMatch's [0.5, 2.0]",
    )
    amp: bool = Field(True, description="float16 autocast and loss scaling on CUDA (CPU: off)")
    grad_clip: float | None = Field(
        1.0,
        gt=0,
        description="clip the gradients' total L2 norm to this before each step (None: never)",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        check_arch(value)  # at config time, not after ingest
        return value


class StrongViewConfig(StrictModel):
    """The strong views' photometric draw (``augment.Photometric``); UniMatch's values by
    default. Where colour is what tells classes apart, ``hue`` and ``grayscale`` erase it."""

    jitter: float = Field(0.5, ge=0, le=1, description="brightness, contrast, saturation")
    hue: float = Field(0.25, ge=0, le=0.5)
    jitter_chance: float = Field(0.8, ge=0, le=1)
    grayscale: float = Field(0.2, ge=0, le=1, description="chance of a grayscale view")
    blur: float = Field(0.5, ge=0, le=1, description="chance of a Gaussian blur")


class StudentConfig(SegTrainConfig):
    alpha: float = Field(
        1.0, ge=0, description="weight of the unlabeled loss: L = L_s + alpha * L_u"
    )
    unlabeled_batch_size: int = Field(8, ge=1, description="unlabeled images a step (per worker)")
    cutmix: float = Field(0.5, ge=0, le=1, description="chance a strong view gets a CutMix box")
    strong: StrongViewConfig = Field(default_factory=StrongViewConfig)
    ema: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="decay of an exponential moving average of the weights (0: none); with one,"
        " the saved student (what evaluate scores and the next round's teacher) is the EMA",
    )


def labeled_rows_to_arrays(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data CPU step: stored labeled rows -> canvas arrays for ``iter_torch_batches``
    (``data.fit_and_pad``: aspect ratio kept, padded with ignore).

    Returns image ``uint8[B, 3, S, S]``, label ``uint8[B, S, S]``, weight ``float32[B, S, S]``
    (1 on the image, 0 on the padding) and extent ``int32[B, 2]`` (the fitted height, width).
    """
    out: dict[str, list[np.ndarray]] = {"image": [], "label": [], "weight": [], "extent": []}
    for png, mask, h, w in zip(
        batch["image"], batch["mask"], batch["height"], batch["width"], strict=True
    ):
        label = data.decode_mask(mask, int(h), int(w)).to(torch.uint8)
        weight = torch.ones((int(h), int(w)), dtype=torch.float32)
        image, maps, fitted = data.fit_and_pad(
            data.decode_image(png), {"label": label, "weight": weight}, image_size
        )
        out["image"].append(image.numpy())
        out["label"].append(maps["label"].numpy())
        out["weight"].append(maps["weight"].numpy())
        out["extent"].append(np.asarray(fitted, np.int32))
    return {k: np.stack(v) for k, v in out.items()}


def pseudolabel_rows_to_arrays(
    batch: dict[str, np.ndarray], image_size: int
) -> dict[str, np.ndarray]:
    """Ray Data CPU step: unlabeled images joined with their pseudo-labels -> canvas arrays.

    Returns image ``uint8[B, 3, S, S]``, label ``uint8[B, S, S]``, weight ``float32[B, S, S]``
    (already multiplied by keep, as ``weighted_unsup_loss`` expects), keep ``uint8[B, S, S]``,
    the policy's own maps where stored: margin and refined_margin ``float32`` (S4MC), trusted
    (CSL) and reliable (WPL) ``uint8``, and extent ``int32[B, 2]``; the padding is ignore,
    weight 0 and not kept.
    """
    out: dict[str, list[np.ndarray]] = {}
    for i in range(len(batch["image_id"])):
        maps = _stored_maps({k: v[i] for k, v in batch.items()})
        image, maps, fitted = data.fit_and_pad(
            data.decode_image(batch["image"][i]), maps, image_size
        )
        for name, value in (("image", image), *maps.items()):
            out.setdefault(name, []).append(value.numpy())
        out.setdefault("extent", []).append(np.asarray(fitted, np.int32))
    return {k: np.stack(v) for k, v in out.items()}


def _stored_maps(row: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A pseudo-label row's maps as the joint transforms take them (masks as uint8)."""
    maps = decode_pseudolabels(row)
    return {
        name: torch.from_numpy(value.astype(np.uint8) if value.dtype == bool else value)
        for name, value in maps.items()
    }


def _weak_view(
    batch: dict[str, torch.Tensor], learner: Learner
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's weak view on the training device, one scale-crop-and-flip draw per image
    applied to the image and every map at once (``augment.ScaleCrop``).

    Returns images ``float32[B, 3, S, S]`` in [0, 1] and the maps: label int64, keep / trusted /
    reliable bool, the rest float32.
    """
    device = learner.device
    images = batch["image"].to(device, non_blocking=True).float().div_(255.0)
    maps = {
        name: value.to(device) for name, value in batch.items() if name not in ("image", "extent")
    }
    extents = batch.get("extent")
    if extents is None:  # arrays that are the whole canvas (benchmarks' own batches)
        extents = torch.tensor([images.shape[-2:]] * len(images))
    images, maps = learner.weak(images, maps, extents, learner.generator)
    for name, value in maps.items():
        if name == "label":
            maps[name] = value.long()
        elif name in ("keep", "trusted", "reliable"):
            maps[name] = value.bool()
        else:
            maps[name] = value.float()
    return images, maps


def learning_rate(cfg: SegTrainConfig, step: int) -> float:
    """The schedule's rate at ``step`` of ``cfg.steps``: poly (power 0.9) or cosine, to 0."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))
    return poly_lr(cfg.lr, step, cfg.steps)


def poly_lr(base_lr: float, step: int, total: int, power: float = 0.9) -> float:
    """Poly schedule: base_lr * (1 - step/total)^power."""
    return base_lr * (1.0 - step / total) ** power


@dataclass
class Learner:
    """Everything one training run updates, and how: the network, its optimizer, the AMP
    scaler, the weights' EMA (``StudentConfig.ema``), WPL's prototype memory, the settings and
    the augmentations."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    memory: PrototypeMemory | None
    cfg: SegTrainConfig
    policy: PseudolabelConfig
    alpha: float
    device: torch.device
    generator: torch.Generator
    weak: augment.ScaleCrop
    photometric: augment.Photometric

    @property
    def network(self) -> nn.Module:
        """The network without its data-parallel wrapper (Ray Train's ``prepare_model``)."""
        return unwrap(self.model)

    @property
    def result(self) -> nn.Module:
        """The network to save and use: the EMA where there is one, else the trained weights."""
        return self.ema.module if self.ema is not None else self.network


def new_learner(
    cfg: SegTrainConfig,
    *,
    num_classes: int,
    crop_size: int,
    seed: int,
    device: torch.device,
    policy: PseudolabelConfig | None = None,
    init: dict[str, torch.Tensor] | None = None,
) -> Learner:
    """A fresh network (random weights, then ``init``'s tensors where given: see
    :mod:`stages.core.pretrained`) and optimizer on ``device``; a student (alpha > 0)
    under WPL also gets its prototype memory, and with ``ema`` > 0 the EMA of its weights
    (parameters and buffers, so BatchNorm's statistics too). The network is in
    ``fastconv.training_layout``: channels-last, its dilated depthwise layers with the faster CPU
    backward (same parameters and state-dict keys; ``pseudoflow bench step`` measures both)."""
    torch.manual_seed(seed)
    policy = policy or PseudolabelConfig()
    alpha = cfg.alpha if isinstance(cfg, StudentConfig) else 0.0
    network = build_segmenter(arch=cfg.arch, num_classes=num_classes)
    if init is not None:  # pretrained tensors, before the optimizer and the EMA see the network
        apply_state(network, init)
    model, _ = fastconv.training_layout(network, device)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.backbone_lr), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    ema = None
    if isinstance(cfg, StudentConfig) and cfg.ema > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    strong = cfg.strong if isinstance(cfg, StudentConfig) else StrongViewConfig()
    return Learner(
        model=model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda"),
        ema=ema,
        memory=_new_memory(policy, num_classes, model) if alpha > 0 else None,
        cfg=cfg,
        policy=policy,
        alpha=alpha,
        device=device,
        generator=torch.Generator().manual_seed(seed * 1000 + 7),
        weak=augment.ScaleCrop(crop_size, scale=cfg.scale),
        photometric=augment.Photometric(**strong.model_dump()),
    )


def train_step(
    learner: Learner,
    labeled: dict[str, torch.Tensor],
    unlabeled: dict[str, torch.Tensor] | None,
    step: int,
) -> dict[str, float]:
    """One step of L = L_s + alpha * L_u, top to bottom (UniMatch's step, offline targets):

    1. the labeled batch's weak view; the unlabeled batch's two strong views, each CutMixed
       with a partner image whose stored maps are mixed in the same box (``_strong_views``),
       plus CSL's TMP view of the weak view (``_tmp_view``);
    2. one forward of every view (float16 autocast on CUDA);
    3. L_s on the labeled view; L_u averaged over the unlabeled views, each weighted by the
       policy's live weight computed from its own (mixed) maps;
    4. backward; the gradients' total norm clipped to ``grad_clip`` (after unscaling under AMP);
       the step, then the EMA's update; WPL's memory takes this step's features and is
       refreshed every ``refresh_every`` steps.

    Returns the step's ``loss_s``, ``loss_u``, ``grad_norm`` (the total norm before clipping;
    absent when it is not finite) and the policy's statistics.
    """
    cfg, policy, memory, device = learner.cfg, learner.policy, learner.memory, learner.device
    for group in learner.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, step) * group.get("lr_scale", 1.0)
    images, lab = _weak_view(labeled, learner)
    views, targets = [data.normalize(images)], [lab]
    if unlabeled is not None:
        weak, weak_maps = _weak_view(unlabeled, learner)
        more, more_maps = _strong_views(weak, weak_maps, learner)
        if policy.policy == "csl":
            more, more_maps = [*more, _tmp_view(weak, weak_maps, learner)], [*more_maps, weak_maps]
        views, targets = views + more, targets + more_maps
    targets = [_to(device, maps) for maps in targets]
    amp = learner.scaler.is_enabled()
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        batch = torch.cat(views).to(device, memory_format=torch.channels_last)
        logits, features = _forward(learner.model, batch, with_features=memory is not None)
    sizes = [len(view) for view in views]
    logits_v = logits.float().split(sizes)
    features_v = features.split(sizes) if features is not None else (None,) * len(views)
    loss_s = F.cross_entropy(logits_v[0], targets[0]["label"], ignore_index=IGNORE_INDEX)
    loss_u, stats = torch.zeros((), device=device), dict[str, float]()
    if unlabeled is not None:
        loss_u, stats = _unlabeled_loss(
            logits_v[1:], features_v[1:], targets[1:], policy, memory, (step, cfg.steps)
        )
    loss = loss_s + learner.alpha * loss_u
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scaler.scale(loss).backward()
    learner.scaler.unscale_(learner.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(learner.model.parameters(), cfg.grad_clip or math.inf)
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    if learner.ema is not None:
        learner.ema.update_parameters(learner.network)
    if memory is not None:
        labeled_part = (features_v[0], logits_v[0], targets[0])
        _feed_memory(memory, policy, learner.generator, labeled_part, (features_v[1], targets[1]))
        if (step + 1) % policy.wpl.refresh_every == 0:
            prototypes = memory.refresh()
            stats["wpl_prototypes"] = float((~prototypes.isnan().any(dim=1)).sum())
    losses = {"loss_s": loss_s.item(), "loss_u": loss_u.item()}
    if math.isfinite(norm := grad_norm.item()):  # AMP: an overflow's step is skipped, not logged
        losses["grad_norm"] = norm
    return {**losses, **stats}


def _strong_views(
    images: torch.Tensor, maps: dict[str, torch.Tensor], learner: Learner
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The unlabeled batch's two strong views of its weak view (``_weak_view``: images
    ``float32[B, 3, S, S]`` in [0, 1] and their maps): per view a photometric draw per image and
    a CutMix box (chance ``cutmix``) inside which the pixels and every map come from the previous
    image of the batch (its own strong view). All of it batched on the training device
    (``stages.core.augment``), the draws from the learner's generator. Returns normalised
    ``float32[B, 3, S, S]`` views and their mixed maps."""
    partner = torch.roll(torch.arange(len(images), device=images.device), 1)
    chance = learner.cfg.cutmix if isinstance(learner.cfg, StudentConfig) else 0.0
    height, width = images.shape[-2:]
    views, mixed = [], []
    for _ in range(2):
        strong = data.normalize(learner.photometric(images, learner.generator))
        box = data.cutmix_boxes(len(images), height, width, chance, learner.generator)
        box = box.to(images.device)
        views.append(torch.where(box[:, None], strong[partner], strong))
        mixed.append({k: torch.where(box, v[partner], v) for k, v in maps.items()})
    return views, mixed


def _tmp_view(
    images: torch.Tensor, maps: dict[str, torch.Tensor], learner: Learner
) -> torch.Tensor:
    """CSL's TMP view of the weak view (images ``float32[B, 3, S, S]`` in [0, 1], maps with
    ``trusted``): its own photometric draw without grayscale and no CutMix (the CSL paper reports
    both hurt with TMP; jitter and blur stay), then covered trusted pixels set to the mean
    (methods.md §3). Its targets are the weak view's maps. Returns it normalised."""
    csl = learner.policy.csl
    coloured = data.normalize(learner.photometric.without_grayscale()(images, learner.generator))
    return live.tmp_view(coloured, maps["trusted"], csl.block, csl.cover, learner.generator)


def _to(device: torch.device, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.to(device) for name, value in maps.items()}


def _forward(
    model: nn.Module, images: torch.Tensor, *, with_features: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits, and (for WPL) the detached decoder features upsampled to the logits' size."""
    if not with_features:
        return segment_logits(model, images), None
    logits, features = segment_with_features(model, images)
    size = logits.shape[-2:]
    upsampled = F.interpolate(features.detach(), size=size, mode="bilinear", align_corners=False)
    return logits, upsampled.float()


def _unlabeled_loss(
    logits: Sequence[torch.Tensor],
    features: Sequence[torch.Tensor | None],
    maps: Sequence[dict[str, torch.Tensor]],
    policy: PseudolabelConfig,
    memory: PrototypeMemory | None,
    progress: tuple[int, int],
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_u averaged over the unlabeled views, each with the policy's live weight from its own
    maps; ``kept_fraction``: the first view's share of pixels with a weight above 0."""
    losses, weights = [], []
    for view_logits, view_features, view_maps in zip(logits, features, maps, strict=True):
        valid = view_maps["label"] != IGNORE_INDEX
        weights.append(_live_weight(policy, view_maps, valid, view_features, memory, progress))
        losses.append(weighted_unsup_loss(view_logits, view_maps["label"], weights[-1], valid))
    return torch.stack(losses).mean(), {"kept_fraction": float((weights[0] > 0).float().mean())}


def _live_weight(
    policy: PseudolabelConfig,
    maps: dict[str, torch.Tensor],
    valid: torch.Tensor,
    features: torch.Tensor | None,
    memory: PrototypeMemory | None,
    progress: tuple[int, int],
) -> torch.Tensor:
    """The per-pixel weight (keep folded in): S4MC's DPA keep mask from this batch's margins;
    WPL's W from the last refreshed prototypes (the stored first weight map until then); the
    stored weight otherwise (threshold, CSL, ground_truth: keep and weight are the stored ones)."""
    if policy.policy == "s4mc":
        keep = live.s4mc_keep(
            maps["margin"], maps["refined_margin"], valid, *progress, alpha0=policy.s4mc.alpha0
        )
        return keep.float()
    if memory is not None and memory.prototypes is not None and features is not None:
        prototypes = memory.prototypes.to(features.device)
        offset = weight_offset(policy)
        return live.wpl_weight(
            features, maps["label"], maps["keep"], prototypes, k=policy.wpl.k, offset=offset
        )
    return maps["weight"]


def _new_memory(
    policy: PseudolabelConfig, num_classes: int, model: nn.Module
) -> PrototypeMemory | None:
    if policy.policy != "wpl":
        return None
    layer = feature_layer(model)
    if not isinstance(layer, nn.Conv2d):
        raise TypeError(f"WPL needs a Conv2d classifier, found {type(layer).__name__}")
    dim = layer.in_channels
    return PrototypeMemory(num_classes, dim, size=policy.wpl.memory_size)


@torch.no_grad()
def _feed_memory(
    memory: PrototypeMemory,
    policy: PseudolabelConfig,
    generator: torch.Generator,
    labeled: tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]],
    unlabeled: tuple[torch.Tensor | None, dict[str, torch.Tensor]],
) -> None:
    """Push this step's features: labeled pixels predicted right with conf > conf_thresh, and
    reliable unlabeled pixels (R = 1), each in a random order (so a queue keeps a random sample)."""
    features, logits, lab = labeled
    features_u, maps = unlabeled
    if features is None or features_u is None:
        return
    picks = {
        "labeled": select_labeled(
            features, logits.softmax(dim=1), lab["label"], policy.wpl.conf_thresh
        ),
        "unlabeled": select_reliable(features_u, maps["label"], maps["reliable"]),
    }
    for queue, (vectors, classes) in picks.items():
        order = torch.randperm(len(classes), generator=generator).to(classes.device)
        memory.push(queue, vectors[order], classes[order])


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function (every rank runs it; rank 0 logs and checkpoints)."""
    import ray.train
    import ray.train.torch

    model_cls = StudentConfig if "alpha" in loop_config["train"] else SegTrainConfig
    cfg = model_cls.model_validate(loop_config["train"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(loop_config["torch_threads"])
    worker_logging()
    learner = new_learner(
        cfg,
        num_classes=loop_config["num_classes"],
        crop_size=loop_config.get("crop_size") or loop_config["image_size"],
        seed=loop_config["seed"] + rank,
        device=ray.train.torch.get_device(),
        policy=PseudolabelConfig.model_validate(loop_config.get("pseudolabel", {})),
        init=decode_state(loop_config["init"]) if loop_config.get("init") else None,
    )
    start = _restore(learner, rank)
    learner.model = ray.train.torch.prepare_model(learner.model)
    labeled = endless_batches(ray.train.get_dataset_shard("labeled"), cfg.batch_size, rank)
    unlabeled = None
    if isinstance(cfg, StudentConfig) and learner.alpha > 0:
        shard = ray.train.get_dataset_shard("unlabeled")
        unlabeled = endless_batches(shard, cfg.unlabeled_batch_size, 1000 + rank, "unlabeled")
    for _ in range(start):  # the data position: the batches the checkpoint already trained on
        next(labeled)
        if unlabeled is not None:
            next(unlabeled)
    sink: MetricSink | None = loop_config.get("sink") if rank == 0 else None
    post = Poster(loop_config.get("progress") if rank == 0 else None, cfg.steps, start)
    log_lines = rank == 0 and loop_config.get("log_lines", True)
    started, window = time.perf_counter(), []
    kind = "student" if isinstance(cfg, StudentConfig) else "teacher"
    for step in range(start, cfg.steps):
        inject_fault(step, "segmenter")
        hold_point(kind, step)
        stats = train_step(learner, next(labeled), next(unlabeled) if unlabeled else None, step)
        window.append(stats)
        post(step + 1, {k: stats[k] for k in ("loss_s", "loss_u")})
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            metrics = _window_metrics(window, step, cfg, started, start)
            window = []
            if log_lines:
                logger.info("step %d/%d %s", step + 1, cfg.steps, _fmt(metrics))
            if sink is not None:
                sink.log_metrics(metrics, step + 1)
            save = last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
            _report(metrics, learner, step + 1, loop_config, rank, bool(save))


def _window_metrics(
    window: list[dict[str, float]], step: int, cfg: SegTrainConfig, started: float, start: int
) -> dict[str, float]:
    elapsed = time.perf_counter() - started
    names = dict.fromkeys(name for entry in window for name in entry)
    metrics = {
        name: float(np.mean([entry[name] for entry in window if name in entry])) for name in names
    }
    return {
        **metrics,
        "lr": learning_rate(cfg, step),
        "steps_per_s": (step + 1 - start) / max(elapsed, 1e-9),
        "step": float(step + 1),
    }


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")


def _report(
    metrics: dict[str, float],
    learner: Learner,
    step: int,
    loop_config: dict[str, Any],
    rank: int,
    save: bool,
) -> None:
    """``ray.train.report`` on every rank alike; rank 0 attaches the checkpoint when saving, with
    every rank's prototype memory (gathered by a collective all ranks join)."""
    import ray.train

    memory = learner.memory
    memory_states = gather_states(memory) if save and memory is not None else None
    if not (save and rank == 0):
        ray.train.report(metrics, checkpoint=None)
        return
    extra: dict[str, Any] = {
        "optimizer": learner.optimizer.state_dict(),
        "step": step,
        "config": loop_config["resolved_config"],
        "rng": rng_state(learner.generator),
    }
    if learner.scaler.is_enabled():
        extra["scaler"] = learner.scaler.state_dict()
    if memory_states is not None:
        extra["memory"] = memory_states
    if learner.ema is not None:  # the checkpoint's weights are the EMA; these resume training
        trained = learner.network.state_dict()
        extra["trained_state_dict"] = {k: v.detach().cpu() for k, v in trained.items()}
        extra["ema_updates"] = int(learner.ema.n_averaged)
    checkpoint = make_checkpoint(
        learner.result,
        kind="segmenter",
        model_args={
            "arch": loop_config["train"]["arch"],
            "num_classes": loop_config["num_classes"],
        },
        extra=extra,
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(checkpoint, Path(tmp) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(learner: Learner, rank: int) -> int:
    """Resume from Ray Train's latest checkpoint (same run name): returns the step to start at.
    The prototype memory comes back too, so every rank holds the same prototypes as before."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    learner.model.load_state_dict(state.get("trained_state_dict", state["state_dict"]))
    if learner.ema is not None:
        learner.ema.module.load_state_dict(state["state_dict"])
        learner.ema.n_averaged.fill_(state["ema_updates"])
    learner.optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        learner.scaler.load_state_dict(state["scaler"])
    if learner.memory is not None and "memory" in state:
        restore_state(learner.memory, state["memory"], rank)
    if "rng" in state:
        restore_rng(state["rng"], learner.generator, rank, int(state["step"]))
    logger.info("resumed from step %d", state["step"])
    return int(state["step"])


# Rows a block of the training datasets holds: every run cuts them alike (``even_blocks``).
TRAIN_BLOCK_ROWS = 16


def labeled_dataset(
    images: DatasetRef, image_size: int, driver_bytes: int = tables.DRIVER_SPLIT_BYTES
) -> Any:
    """The labeled split as fixed-size arrays, in ``image_id`` order (materialised: it is iterated
    every epoch; ordered, so a run's batches are the same whichever task finished first), in
    blocks of about ``TRAIN_BLOCK_ROWS`` rows (``even_blocks``: the sort's blocks differ run to run,
    and the loop's local shuffle with them).

    A split of at most ``driver_bytes`` (estimated) is decoded on the driver into the same rows
    and blocks (``tables.driver_blocks``); a larger one through Ray Data."""
    columns = ["image_id", "height", "width", "image", "mask"]
    ids = tables.small_split_ids(images, "labeled", driver_bytes)
    if ids is not None:
        table = images.read_rows(columns[1:], ids).sort_by("image_id")
        return tables.driver_blocks(
            table, labeled_rows_to_arrays, TRAIN_BLOCK_ROWS, image_size=image_size
        )
    with tables.ordered():
        arrays = (
            tables.read_split(images, "labeled", columns)
            .sort("image_id")
            .map_batches(
                labeled_rows_to_arrays,
                fn_kwargs={"image_size": image_size},
                batch_size=TRAIN_BLOCK_ROWS,
            )
        )
        return tables.even_blocks(arrays, TRAIN_BLOCK_ROWS)


def unlabeled_dataset(
    images: DatasetRef,
    pseudolabels: DatasetRef,
    image_size: int,
    driver_bytes: int = tables.DRIVER_SPLIT_BYTES,
) -> Any:
    """Unlabeled images joined with their pseudo-labels, as fixed-size arrays (materialised), in
    ``image_id`` order and blocks of about ``TRAIN_BLOCK_ROWS`` rows, as ``labeled_dataset``
    (on the driver too where the split and the pseudo-labels together hold at most
    ``driver_bytes``).

    Only image columns are read from ``images``: the ground truth that generated data keeps for
    unlabeled images is never seen by training (but through the ``ground_truth`` policy's
    pseudo-labels, the reference rows made from it on purpose).
    """
    columns = ["height", "width", "label", "keep", "weight", "weight_offset"]
    columns += ["margin", "refined_margin", "trusted", "reliable"]
    ids = tables.small_split_ids(images, "unlabeled", driver_bytes, pseudolabels.size_bytes())
    if ids is not None:
        labels = pseudolabels.read_rows(columns, ids)
        pixels = images.read_rows(["image"], labels["image_id"].to_pylist())
        joined = tables.lookup_inner(pixels.sort_by("image_id"), labels, columns)
        if joined.num_rows:  # none: Ray Data's path makes the empty set the loop refuses
            return tables.driver_blocks(
                joined, pseudolabel_rows_to_arrays, TRAIN_BLOCK_ROWS, image_size=image_size
            )
    with tables.ordered():
        pixels = tables.read_split(images, "unlabeled", ["image_id", "image"])
        joined = tables.join_on_image_id(pixels, pseudolabels, columns, num_partitions=4)
        arrays = joined.sort("image_id").map_batches(
            pseudolabel_rows_to_arrays,
            fn_kwargs={"image_size": image_size},
            batch_size=TRAIN_BLOCK_ROWS,
        )
        return tables.even_blocks(arrays, TRAIN_BLOCK_ROWS)


def run_segmenter(
    cfg: SegTrainConfig,
    *,
    datasets: dict[str, Any],
    num_classes: int,
    storage: Storage,
    out_path: str,
    name: str,
    loop_extra: dict[str, Any],
    use_gpu: bool,
) -> dict[str, float]:
    """Train (or load given weights), then write the checkpoint to ``out_path`` in storage."""
    if cfg.weights:
        blob = given_checkpoint(
            cfg.weights, kind="segmenter", num_classes=num_classes, arch=cfg.arch
        )
        # as given, plus the image size it is used at (the model file's metadata)
        image_size = loop_extra["image_size"]
        storage.write_bytes(
            out_path,
            finished_model(
                blob, image_size=image_size, window=loop_extra.get("crop_size"), source=out_path
            ),
        )
        return {"trained_steps": 0.0}
    loop_config = {"train": cfg.model_dump(), "num_classes": num_classes, **loop_extra}
    metrics = {"trained_steps": float(cfg.steps)}
    if cfg.init:  # mapped here, once: a file that does not fit fails before any worker starts
        report = load_init(
            build_segmenter(arch=cfg.arch, num_classes=num_classes), cfg.init, SEGMENTER
        )
        logger.info("%s: init %s", name, report.summary())
        loop_config["init"] = encode_state(report.loaded)
        metrics.update(report.metrics())
    blob = fit(
        train_loop,
        loop_config=loop_config,
        datasets=datasets,
        workers=cfg.workers,
        use_gpu=use_gpu,
        storage=storage,
        name=name,
        max_failures=cfg.max_failures,
        resources=cfg.resources,
    )
    write_trained(
        storage,
        out_path,
        blob,
        image_size=loop_extra["image_size"],
        window=loop_extra.get("crop_size"),
    )
    return metrics
