"""Each policy's maps from the teacher's stored signals, on tensors on any device: what the teach
stage must store for a policy, and label, keep, weight and the policy's own maps."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.core.constants import IGNORE_INDEX
from stages.pseudolabel import ops
from stages.pseudolabel.config import (
    GROUND_TRUTH,
    PseudolabelConfig,
    S4MCOptions,
)
from stages.teach.table import SIGNAL_LEVELS, SignalSpec, decode_feature_batch, signal_maps

logger = logging.getLogger(__name__)


def signal_spec(cfg: PseudolabelConfig, also: Iterable[str] = ()) -> SignalSpec:
    """What the teach stage must store for ``cfg.policy`` and the policies ``also`` (and so its
    cache key): S4MC's margins with its refinement settings (and argmax P̃ under
    ``label_from: refined``), CSL's dispersion, WPL's decoder features. Threshold and
    ground_truth (which reads no signals) need only what is always stored."""
    served = {cfg.policy, *also}
    s4mc = "s4mc" in served
    return SignalSpec(
        margins=s4mc,
        neighborhood=cfg.s4mc.neighborhood if s4mc else 8,
        beta=cfg.s4mc.beta if s4mc else 1.0,
        refined_label=s4mc and cfg.s4mc.label_from == "refined",
        dispersion="csl" in served,
        features="wpl" in served,
    )


def missing_signals(cfg: PseudolabelConfig, signals: Mapping[str, Any]) -> str | None:
    """Why ``cfg.policy`` cannot be computed from a row's signals (None: it can)."""
    need = {"s4mc": "refined_margin", "csl": "dispersion"}.get(cfg.policy)
    if cfg.policy == "s4mc" and cfg.s4mc.label_from == "refined":
        need = "refined_label"
    if need is None or signals.get(need) is not None:
        return None
    return (
        f"the stored teacher signals hold no {need} ({cfg.policy}): run with "
        f"pseudolabel.policy={cfg.policy}, or list it in teach.policies"
    )


# ---------------------------------------------------------------------------------- policy maps
def policy_maps(
    cfg: PseudolabelConfig,
    signals: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    box_masks: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    prototypes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The stored maps of one image under ``cfg.policy`` (:func:`batch_policy_maps` of a batch
    of one).

    signals: the image's teacher signals as :func:`stages.teach.decode_signals` returns them
    (``[H, W]`` maps), or exact probabilities ``float[C, H, W]`` (their signals are computed
    here without quantisation); box_masks: bool[C, H, W] (WPL); features: float[D, H, W] teacher
    features at pixel resolution (WPL); prototypes: float[C, D], NaN rows for classes without
    one (WPL). Returns ``label`` int64[H, W], ``keep`` bool[H, W], ``weight`` float[H, W] in
    [0, 1] (before ``weight_offset``), plus the policy's extra maps.
    """
    if isinstance(signals, torch.Tensor):
        signals = signal_maps(signals[None].float(), signal_spec(cfg))
    else:
        signals = {name: value[None] for name, value in signals.items()}
    maps = batch_policy_maps(
        cfg,
        signals,
        box_masks=None if box_masks is None else box_masks[None],
        features=None if features is None else features[None],
        prototypes=prototypes,
    )
    return {name: value[0] for name, value in maps.items()}


def batch_policy_maps(
    cfg: PseudolabelConfig,
    signals: Mapping[str, torch.Tensor],
    *,
    box_masks: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    prototypes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The stored maps of a batch of images of one size, computed on the signals' device.

    signals: ``[B, H, W]`` maps as :func:`stages.teach.decode_signal_batch` returns them;
    box_masks: bool[B, C, H, W], features: float[B, D, H, W] at pixel resolution and
    prototypes: float[C, D] (WPL). Every statistic is per image (S4MC's γ is each image's own
    α_0 quantile), so a batch gives each image what a batch of one would. Returns ``[B, H, W]``
    maps: ``label`` int64, ``keep`` bool, ``weight`` float in [0, 1] (before
    ``weight_offset``), and the policy's extra maps.
    """
    if cfg.policy == GROUND_TRUTH:
        raise ValueError(
            "the ground_truth policy labels from the unlabeled images' masks, not from teacher "
            "signals: see ground_truth_maps"
        )
    if reason := missing_signals(cfg, signals):
        raise ValueError(reason)
    conf, label = signals["conf"], signals["label"]
    valid = torch.ones_like(conf, dtype=torch.bool)  # stored signals have no padding
    if cfg.policy == "threshold":
        keep = ops.threshold_keep(conf, valid, cfg.tau)
        return {"label": label, "keep": keep, "weight": torch.ones_like(conf)}
    if cfg.policy == "s4mc":
        return _s4mc_maps(cfg.s4mc, signals)
    if cfg.policy == "csl":
        weight = ops.csl_weights_of(
            torch.stack([conf, signals["dispersion"]], dim=1), valid, cfg.csl.alpha
        )
        return {"label": label, "keep": valid, "weight": weight, "trusted": weight == 1.0}
    if box_masks is None or features is None or prototypes is None:
        raise ValueError("the wpl policy needs box masks, features and prototypes")
    return {
        "label": label,
        "keep": ops.threshold_keep(conf, valid, cfg.tau),
        "weight": ops.topk_index_similarity(
            features, prototypes.to(features.device), label, k=cfg.wpl.k
        ),
        "reliable": wpl_reliable(cfg, label, conf, box_masks),
    }


def ground_truth_maps(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ground_truth policy's maps of a batch of masks ``[B, H, W]`` (uint8 or int64, 255 =
    ignore): ``label`` int64 = the mask, ``keep`` bool = mask != 255, ``weight`` float 1 (with
    ``weight_offset`` 0, stored as q = 255: decoded exactly 1.0 where kept)."""
    label = masks.long()
    return {
        "label": label,
        "keep": label != IGNORE_INDEX,
        "weight": torch.ones(label.shape, dtype=torch.float32, device=label.device),
    }


def wpl_reliable(
    cfg: PseudolabelConfig, label: torch.Tensor, conf: torch.Tensor, box_masks: torch.Tensor
) -> torch.Tensor:
    """WPL's R: label int64[B, H, W], conf float[B, H, W], box_masks bool[B, C, H, W] ->
    bool[B, H, W] (every pixel valid: stored signals have no padding)."""
    return ops.detector_reliability(label, conf, box_masks, conf_thresh=cfg.wpl.conf_thresh)


def _s4mc_maps(cfg: S4MCOptions, s: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kappa, kappa_refined = s["margin"], s["refined_margin"]
    # α_t at t = 0 is α_0, per image; stored margins are multiples of 1/255
    gamma0 = ops.dpa_thresholds(kappa, cfg.alpha0, levels=SIGNAL_LEVELS)
    return {
        "label": s["refined_label"] if cfg.label_from == "refined" else s["label"],
        "keep": kappa_refined > gamma0[:, None, None],
        "weight": torch.ones_like(kappa),
        "margin": kappa,
        "refined_margin": kappa_refined,
    }


# ------------------------------------------------------------------------------- Ray Data steps
def pixel_features(row: dict[str, Any]) -> torch.Tensor:
    """The row's teacher features upsampled (bilinear) to the image: ``float32[D, H, W]``."""
    return pixel_feature_batch([row])[0]


def pixel_feature_batch(
    rows: list[dict[str, Any]], device: torch.device | None = None
) -> torch.Tensor:
    """Rows of one size -> their teacher features upsampled (bilinear) to the image on
    ``device``: ``float32[B, D, H, W]``."""
    features = decode_feature_batch(rows, device)
    size = (int(rows[0]["height"]), int(rows[0]["width"]))
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def box_masks_of(row: dict[str, Any], cfg: PseudolabelConfig, num_classes: int) -> torch.Tensor:
    """A joined detections row -> WPL box masks ``bool[C, H, W]``."""
    return box_mask_batch([row], cfg, num_classes)[0]


def box_mask_batch(
    rows: list[dict[str, Any]],
    cfg: PseudolabelConfig,
    num_classes: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Joined detections rows of one size -> WPL box masks ``bool[B, C, H, W]`` on ``device``,
    rasterised in one pass."""
    boxes = [np.asarray(r["boxes"] or [], np.float32).reshape(-1, 4) for r in rows]
    labels = [np.asarray(r["labels"] or [], np.int64) for r in rows]
    scores = [np.asarray(r["scores"] or [], np.float32) for r in rows]
    image = np.repeat(np.arange(len(rows)), [len(b) for b in boxes])
    return ops.rasterize_box_batch(
        np.concatenate(boxes),
        image,
        np.concatenate(labels),
        np.concatenate(scores),
        cfg.class_map(num_classes),
        len(rows),
        int(rows[0]["height"]),
        int(rows[0]["width"]),
        num_classes,
        score_thresh=cfg.wpl.score_thresh,
        device=device,
    )
