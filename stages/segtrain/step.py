"""One training step, top to bottom (``train_step``), and the learner it updates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stages.core import augment, data, fastconv
from stages.core.constants import IGNORE_INDEX
from stages.core.models import (
    build_segmenter,
    feature_layer,
    segment_logits,
    segment_with_features,
    unwrap,
)
from stages.core.pretrained import apply_state, param_groups
from stages.core.run_config import poly_lr
from stages.pseudolabel import live
from stages.pseudolabel.config import PseudolabelConfig, weight_offset
from stages.pseudolabel.memory import PrototypeMemory, select_labeled, select_reliable
from stages.pseudolabel.ops import pixel_cross_entropy, weighted_mean
from stages.segtrain.config import SegTrainConfig, StrongViewConfig, StudentConfig


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
    logits = logits.float()
    logits_v = logits.split(sizes)
    features_v = features.split(sizes) if features is not None else (None,) * len(views)
    # one cross-entropy over every view's pixels, split afterwards: its backward writes one
    # gradient of the whole batch instead of concatenating every view's C-channel gradient
    labels = torch.cat([maps["label"] for maps in targets])
    valid = labels != IGNORE_INDEX
    ce_v, valid_v = pixel_cross_entropy(logits, labels, valid).split(sizes), valid.split(sizes)
    loss_s = ce_v[0].sum() / valid_v[0].sum()  # the mean over labeled pixels (NaN with none)
    loss_u, stats = torch.zeros((), device=device), dict[str, float]()
    if unlabeled is not None:
        loss_u, stats = _unlabeled_loss(
            ce_v[1:], valid_v[1:], features_v[1:], targets[1:], policy, memory, (step, cfg.steps)
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
    ce: Sequence[torch.Tensor],
    valid: Sequence[torch.Tensor],
    features: Sequence[torch.Tensor | None],
    maps: Sequence[dict[str, torch.Tensor]],
    policy: PseudolabelConfig,
    memory: PrototypeMemory | None,
    progress: tuple[int, int],
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_u averaged over the unlabeled views (``ce``: each view's ``pixel_cross_entropy`` against
    its maps' labels; ``valid``: where those labels are not ``IGNORE_INDEX``), each with the
    policy's live weight from its own maps; ``kept_fraction``: the first view's share of pixels
    with a weight above 0."""
    losses, weights = [], []
    views = zip(ce, valid, features, maps, strict=True)
    for view_ce, view_valid, view_features, view_maps in views:
        weight = _live_weight(policy, view_maps, view_valid, view_features, memory, progress)
        weights.append(weight)
        losses.append(weighted_mean(view_ce, weight, view_valid))
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
