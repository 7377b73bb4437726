"""Pure pseudo-label math: the formulas of ``methods.md``, nothing else.

Every function takes and returns tensors (``rasterize_boxes`` also accepts numpy arrays), works on
any device and in float32 or float64, and never does I/O. Notation follows ``methods.md``: ``P`` are
teacher softmax probabilities ``float[B, C, H, W]``, ``valid`` marks pixels that are neither padding
nor ignore (``bool[B, H, W]``).

Policies:
  * threshold (FixMatch / UniMatch): ``threshold_keep``.
  * S4MC: ``margin``, ``s4mc_refine``, ``dpa_alpha``, ``dpa_threshold``.
  * CSL: ``csl_features``, ``csl_weights``, ``tmp_block_mask``.
  * WPL: ``rasterize_boxes``, ``detector_reliability``, ``topk_index_similarity``.
Shared loss: ``weighted_unsup_loss`` (``pixel_cross_entropy`` then ``weighted_mean``).

Why one module of over 400 lines: the four policies' formulas are read side by side against
``methods.md`` §1-§4 and share its notation and helpers; each policy is a few short functions,
and a module per policy would scatter one specification.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CSL_EPS = 1e-8
# s_2 is treated as 0 when s_2 <= _CSL_RANK_TOL * s_1, with s_1, s_2 the singular values of X
# itself (a QR of X, then the 2×2 SVD of R, all in float64), never of the squared Gram matrix.
_CSL_RANK_TOL = 1e-6

_NEIGHBOUR_OFFSETS: dict[int, tuple[tuple[int, int], ...]] = {
    4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
    8: tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)),
}


# --------------------------------------------------------------------------------------- loss (§0)
def pixel_cross_entropy(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Every pixel's cross-entropy ``CE_p = -log softmax(logits)_p[target_p]``, 0 where not valid.

    Args:
        logits: float[B, C, H, W] raw scores.
        target: int64[B, H, W] in [0, C) at valid pixels; anything (``IGNORE_INDEX``) elsewhere.
        valid: bool[B, H, W].

    Returns:
        float[B, H, W] (dtype of ``logits``); invalid pixels give 0 and pass no gradient.
    """
    valid = valid.to(torch.bool)
    ce = F.cross_entropy(logits, torch.where(valid, target, 0), reduction="none")
    return torch.where(valid, ce, 0.0)


def weighted_mean(ce: Tensor, weight: Tensor, valid: Tensor) -> Tensor:
    """``Σ_p w_p·valid_p·CE_p / Σ_p valid_p`` of per-pixel losses ``ce`` float[B, H, W] (methods.md
    §0's L_u once ``ce`` is ``pixel_cross_entropy``); 0, still connected to ``ce``'s graph, when
    no pixel is valid."""
    valid = valid.to(torch.bool)
    per_pixel = torch.where(valid, weight.to(ce.dtype) * ce, 0.0)
    return per_pixel.sum() / valid.sum().clamp(min=1).to(ce.dtype)


def weighted_unsup_loss(logits: Tensor, target: Tensor, weight: Tensor, valid: Tensor) -> Tensor:
    """Unsupervised loss ``L_u = Σ_p w_p·valid_p·CE_p / Σ_p valid_p`` (methods.md §0).

    Args:
        logits: float[B, C, H, W], the student's raw scores on an augmented view.
        target: int64[B, H, W] in [0, C) at valid pixels; anything (``IGNORE_INDEX``) elsewhere.
        weight: float[B, H, W] >= 0, the policy weight already multiplied by the keep mask.
        valid: bool[B, H, W], True where the pixel is neither padding nor ignore.

    Returns:
        float[] (0-d, dtype of ``logits``) >= 0. The denominator counts valid pixels, not kept ones;
        with no valid pixel the result is a zero that is still connected to ``logits``' graph.
    """
    return weighted_mean(pixel_cross_entropy(logits, target, valid), weight, valid)


# ---------------------------------------------------------------------------------- threshold (§1)
def threshold_keep(conf: Tensor, valid: Tensor, tau: float = 0.95) -> Tensor:
    """Baseline keep mask ``conf >= tau AND valid`` (methods.md §1; its weight is 1).

    Args:
        conf: float[B, H, W] in [0, 1], max-class probability of the teacher.
        valid: bool[B, H, W].
        tau: confidence threshold in [0, 1]; a pixel at exactly ``tau`` is kept.

    Returns:
        bool[B, H, W].
    """
    return (conf >= tau) & valid.to(torch.bool)


# --------------------------------------------------------------------------------------- S4MC (§2)
def margin(probs: Tensor) -> Tensor:
    """Margin confidence ``κ = p_(1) − p_(2)`` per pixel.

    Args:
        probs: float[B, C, H, W] with C >= 2; values in [0, 1] (refined S4MC probabilities, which
            may sum above 1, are fine).

    Returns:
        float[B, H, W] >= 0, dtype of ``probs``.
    """
    if probs.shape[1] < 2:
        raise ValueError(f"margin needs at least 2 classes, got C={probs.shape[1]}")
    top2 = probs.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def s4mc_refine(probs: Tensor, neighborhood: int = 8, beta: float = 1.0) -> Tensor:
    """S4MC contextual refinement ``P̃_c(x) = P_c(x) + β·(q_c(x) − P_c(x)·q_c(x))``.

    ``q_c(x)`` is the largest ``P_c`` over the neighbours of ``x`` (zero padding outside the image).
    The result is not renormalised. ``β = 1`` gives the union bound ``1 − (1 − P_c)(1 − q_c)``.

    Args:
        probs: float[B, C, H, W] in [0, 1], teacher softmax probabilities.
        neighborhood: 8 (3×3 without the centre) or 4 (up, down, left, right).
        beta: refinement strength; 0 returns ``probs`` unchanged.

    Returns:
        float[B, C, H, W], dtype of ``probs``; in [0, 1] for β in [0, 1].
    """
    if neighborhood not in _NEIGHBOUR_OFFSETS:
        raise ValueError(f"unknown neighborhood {neighborhood!r}; choose one of 4, 8")
    q = _neighbour_max(probs, _NEIGHBOUR_OFFSETS[neighborhood])
    return probs + beta * (q - probs * q)


def _neighbour_max(x: Tensor, offsets: tuple[tuple[int, int], ...]) -> Tensor:
    """Per-channel max over shifted copies of ``x``: float[B, C, H, W], zero-padded borders."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    views = [padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy, dx in offsets]
    out = views[0]
    for view in views[1:]:
        out = torch.maximum(out, view)
    return out


def dpa_alpha(step: int, total_steps: int, alpha0: float = 0.4) -> float:
    """DPA quantile level ``α_t = α_0·(1 − t/T)``.

    Args:
        step: current training step ``t``; values outside [0, T] are clipped to it.
        total_steps: ``T`` > 0.
        alpha0: level at step 0, in [0, 1].

    Returns:
        float in [0, alpha0].
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return alpha0 * (1.0 - progress)


def dpa_threshold(margins: Tensor, valid: Tensor, alpha_t: float) -> float:
    """DPA threshold ``γ_t``: the ``alpha_t`` quantile of the unrefined margins over valid pixels.

    Linear interpolation between order statistics (numpy's default ``method="linear"``), computed
    with ``kthvalue`` so there is no input-size limit (``torch.quantile`` stops at 2**24 elements).

    Args:
        margins: float[B, H, W] in [0, 1], the UNREFINED margins ``κ``.
        valid: bool[B, H, W].
        alpha_t: quantile level in [0, 1], usually ``dpa_alpha(step, total_steps)``.

    Returns:
        γ_t as a Python float; ``math.inf`` (keep nothing) when no pixel is valid.
    """
    if not 0.0 <= alpha_t <= 1.0:
        raise ValueError(f"alpha_t must be in [0, 1], got {alpha_t}")
    valid = valid.to(torch.bool)
    count = int(valid.sum())
    if count == 0:
        return math.inf
    # Invalid pixels become +inf, so the k smallest (k <= count) are valid pixels; cheaper than
    # compacting with a boolean index.
    values = torch.where(valid, margins, math.inf).flatten()
    position = alpha_t * (count - 1)
    lower = math.floor(position)
    frac = position - lower
    low = float(values.kthvalue(lower + 1).values)
    if frac == 0.0:
        return low
    high = float(values.kthvalue(lower + 2).values)
    # numpy's _lerp: interpolate from the nearer end for accuracy.
    return low + (high - low) * frac if frac < 0.5 else high - (high - low) * (1.0 - frac)


def dpa_thresholds(margins: Tensor, alpha_t: float, levels: int | None = None) -> Tensor:
    """:func:`dpa_threshold` of each image over all its pixels, batched: float[B, H, W] ->
    float[B] (the margins' dtype), equal to ``dpa_threshold(margins[i:i+1], all valid, alpha_t)``
    as the comparison ``κ̃ > γ`` uses it (the interpolation in float64, then rounded to the
    margins' dtype, as a Python float compared with a tensor is).

    ``levels``: where every margin is ``q / levels`` for an integer q (stored, quantised
    margins), the order statistics come from per-image counts of each level (one pass) instead
    of a selection over the pixels, with the same result; other margins take the selection.
    """
    if not 0.0 <= alpha_t <= 1.0:
        raise ValueError(f"alpha_t must be in [0, 1], got {alpha_t}")
    values = margins.flatten(1)
    position = alpha_t * (values.shape[1] - 1)
    lower = math.floor(position)
    frac = position - lower

    q, q_levels = None, levels or 1
    if levels is not None:
        q = (values * levels).round().long().clamp_(0, levels)
        if not torch.equal(q.to(values.dtype) / levels, values):
            q = None  # not on the grid

    def order_statistic(k: int) -> Tensor:  # the k-th smallest of each image, k >= 1
        if q is None:
            return values.kthvalue(k, dim=1).values
        return _counted_order_statistic(q, k, q_levels).to(values.dtype) / q_levels

    low = order_statistic(lower + 1)
    if frac == 0.0:
        return low
    high = order_statistic(lower + 2).double()
    low64 = low.double()
    # numpy's _lerp, as dpa_threshold: from the nearer end
    near_low = low64 + (high - low64) * frac
    near_high = high - (high - low64) * (1.0 - frac)
    return (near_low if frac < 0.5 else near_high).to(margins.dtype)


def _counted_order_statistic(q: Tensor, k: int, levels: int) -> Tensor:
    """k-th smallest (1-based) of each row of ``q`` int64[B, N] in [0, levels], by counting the
    rows' levels: int64[B]."""
    batch = q.shape[0]
    offsets = torch.arange(batch, device=q.device)[:, None] * (levels + 1)
    counts = torch.bincount((q + offsets).flatten(), minlength=batch * (levels + 1))
    below = counts.view(batch, levels + 1).cumsum(dim=1)  # pixels at or below each level
    return (below < k).sum(dim=1)  # the first level whose count reaches k


# ---------------------------------------------------------------------------------------- CSL (§3)
def csl_features(probs: Tensor) -> Tensor:
    """CSL features per pixel: ``m = max_c P`` and residual dispersion ``r``.

    ``r = (1/(C−1))·Σ_{c≠ŷ}(P_c − m̄)²`` with ``m̄ = (1 − m)/(C − 1)`` and ``ŷ = argmax_c P`` (the
    first maximum on ties; a tied second maximum stays in the sum).

    Args:
        probs: float[B, C, H, W] in [0, 1], summing to 1 over C, with C >= 2.

    Returns:
        float[B, 2, H, W], dtype of ``probs``: channel 0 is m in [1/C, 1], channel 1 is r >= 0.
    """
    num_classes = probs.shape[1]
    if num_classes < 2:
        raise ValueError(f"csl_features needs at least 2 classes, got C={num_classes}")
    m, argmax = probs.max(dim=1, keepdim=True)
    m_bar = (1.0 - m) / (num_classes - 1)
    is_max = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, argmax, True)
    sq_dev = torch.where(is_max, torch.zeros_like(probs), (probs - m_bar) ** 2)
    r = sq_dev.sum(dim=1, keepdim=True) / (num_classes - 1)
    return torch.cat([m, r], dim=1)


def csl_weights(probs: Tensor, valid: Tensor, alpha: float = 8.0) -> Tensor:
    """CSL per-pixel weights from a per-image two-cluster split of the (m, r) features.

    Per image over its valid pixels: X = rows (m_p, r_p); pixel p joins cluster
    ``argmax_k |x_p·v_k| / s_k`` (right singular vectors v_k, singular values s_1 >= s_2; all
    pixels in cluster 1 when s_2 = 0); the reliable cluster is the one with the larger mean m;
    ``w_p = 1`` if the pixel beats that cluster's mean in m or in r, else
    ``exp(−z_m²/alpha)·exp(−z_r²/alpha)``.

    The split is one QR of X per image (``X = QR``, R 2×2) and the closed-form SVD of R, in
    float64: X and R share their singular values and right singular vectors, and neither is
    squared, so s_2 is resolved down to round-off of s_1 (the Gram matrix ``X^T X`` loses half the
    digits). s_2 <= 1e-6·s_1 counts as s_2 = 0 (rank one). Statistics and weights use the input
    dtype.

    Args:
        probs: float[B, C, H, W] in [0, 1], teacher softmax probabilities, C >= 2.
        valid: bool[B, H, W].
        alpha: the temperature ``a`` > 0 of the Gaussian fall-off.

    Returns:
        float[B, H, W] in [0, 1], dtype of ``probs``; 0 on invalid pixels (so all 0 for an image
        without valid pixels).
    """
    return csl_weights_of(csl_features(probs), valid, alpha)


def csl_weights_of(features: Tensor, valid: Tensor, alpha: float = 8.0) -> Tensor:
    """:func:`csl_weights` from the features ``float[B, 2, H, W]`` (m, r) that
    :func:`csl_features` gives (stored teacher signals hold them, not the probabilities)."""
    mask = valid.to(torch.bool).flatten(1)  # [B, N]
    feats = torch.where(mask[:, None], features.flatten(2), 0.0)  # [B, 2, N]
    in_second = _csl_second_cluster(feats, mask)
    clusters = torch.stack([mask & ~in_second, mask & in_second], dim=1).to(features.dtype)
    mean, var = _masked_mean_var(feats, clusters)  # [B, 2 features, 2 clusters]
    best = mean[:, 0].argmax(dim=1)  # ties -> cluster 1
    mu = mean.gather(2, best[:, None, None].expand(-1, 2, 1))  # [B, 2, 1]
    sd = torch.sqrt(var.gather(2, best[:, None, None].expand(-1, 2, 1)) + CSL_EPS)
    z_m = (feats[:, 0] - mu[:, 0]) / sd[:, 0]
    z_r = (mu[:, 1] - feats[:, 1]) / sd[:, 1]
    soft = torch.exp(-(z_m**2) / alpha) * torch.exp(-(z_r**2) / alpha)
    weight = torch.where((z_m > 0) | (z_r > 0), torch.ones_like(soft), soft)
    return torch.where(mask, weight, torch.zeros_like(weight)).reshape(valid.shape)


def _csl_second_cluster(feats: Tensor, mask: Tensor) -> Tensor:
    """True where a valid pixel joins cluster 2 of its image's SVD split.

    Rank rule: s_2 <= 1e-6·s_1 means s_2 = 0 (every pixel in cluster 1), with s_1 >= s_2 the
    singular values of X itself, from a float64 QR of X (methods.md §3), not of ``X^T X``.

    Args:
        feats: float[B, 2, N], rows (m, r) per pixel.
        mask: bool[B, N], valid pixels.

    Returns:
        bool[B, N]; always False on invalid pixels and in images whose s_2 is 0 (relative to s_1).
    """
    x = torch.where(mask[:, None], feats.to(torch.float64), 0.0)  # [B, 2, N], zero if invalid
    if x.shape[-1] < 2:  # QR needs N >= 2 rows; zero rows leave the singular values unchanged
        x = F.pad(x, (0, 2 - x.shape[-1]))
    r = torch.linalg.qr(x.transpose(1, 2), mode="r").R  # [B, 2, 2] upper triangular, X = QR
    s1, s2, v = _svd_upper_2x2(r)
    proj = v.transpose(1, 2) @ x[..., : mask.shape[-1]]  # [B, 2, N]: row k is x_p·v_k
    # |x·v_2| / s_2 > |x·v_1| / s_1, written without divisions.
    second = proj[:, 1].abs() * s1[:, None] > proj[:, 0].abs() * s2[:, None]
    rank_two = s2 > _CSL_RANK_TOL * s1
    return second & rank_two[:, None] & mask


def _svd_upper_2x2(r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Singular values and right singular vectors of upper-triangular 2×2 matrices, closed form.

    For ``R = [[a, b], [0, d]]``: ``s_1 = (√((a+d)² + b²) + √((a−d)² + b²)) / 2`` and
    ``s_2 = |a·d| / s_1`` (the determinant, so no cancellation); v_1 is the leading eigenvector
    of ``RᵀR`` at angle ``θ = atan2(2ab, a² − b² − d²) / 2``, v_2 is v_1 turned by 90°.

    Args:
        r: float[B, 2, 2], upper triangular.

    Returns:
        s1, s2: float[B] with s1 >= s2 >= 0 (both 0 for R = 0); v: float[B, 2, 2] whose columns
        are v_1, v_2.
    """
    a, b, d = r[:, 0, 0], r[:, 0, 1], r[:, 1, 1]
    s1 = (torch.hypot(a + d, b) + torch.hypot(a - d, b)) / 2
    s2 = torch.where(s1 > 0, (a * d).abs() / s1.clamp(min=torch.finfo(r.dtype).tiny), 0.0)
    theta = torch.atan2(2 * a * b, a * a - b * b - d * d) / 2
    cos, sin = torch.cos(theta), torch.sin(theta)
    v = torch.stack([torch.stack([cos, -sin], dim=-1), torch.stack([sin, cos], dim=-1)], dim=-2)
    return s1, s2, v


def _masked_mean_var(x: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and unbiased variance inside each mask (two-pass, no cancellation).

    Args:
        x: float[B, F, N].
        masks: float[B, K, N] in {0, 1}.

    Returns:
        mean, var: float[B, F, K]. An empty mask gives mean 0 and var 0; a mask of one element
        gives var 0.
    """
    count = masks.sum(dim=-1)[:, None]  # [B, 1, K]
    xs = x[:, :, None]  # [B, F, 1, N]
    ms = masks[:, None]  # [B, 1, K, N]
    mean = (xs * ms).sum(dim=-1) / count.clamp(min=1)
    sq = (((xs - mean[..., None]) ** 2) * ms).sum(dim=-1)
    return mean, sq / (count - 1).clamp(min=1)


def tmp_block_mask(
    height: int,
    width: int,
    block: int = 32,
    cover: float = 0.7,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Trusted Mask Perturbation block grid: ⌈H/block⌉×⌈W/block⌉ cells, each True w.p. ``cover``.

    The grid is upsampled (nearest) by ``block`` and cropped to ``height``×``width``. The TMP cover
    is this grid AND (w == 1), which the training loop forms.

    Args:
        height, width: output size in pixels, >= 1.
        block: cell side in pixels, >= 1.
        cover: probability in [0, 1] that a cell is True.
        generator: random source; the mask lives on its device (CPU when None).

    Returns:
        bool[height, width].
    """
    if height < 1 or width < 1 or block < 1:
        raise ValueError(f"height, width, block must be >= 1, got {height}, {width}, {block}")
    if not 0.0 <= cover <= 1.0:
        raise ValueError(f"cover must be in [0, 1], got {cover}")
    device = generator.device if generator is not None else torch.device("cpu")
    cells = (-(-height // block), -(-width // block))
    grid = torch.rand(cells, generator=generator, device=device) < cover
    full = grid.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return full[:height, :width]


# ---------------------------------------------------------------------------------------- WPL (§4)
def rasterize_boxes(
    boxes: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    scores: Tensor | np.ndarray,
    class_map: Mapping[int, int],
    height: int,
    width: int,
    num_classes: int,
    score_thresh: float = 0.95,
) -> Tensor:
    """Union of confident detection rectangles per segmentation class.

    A box (x1, y1, x2, y2) covers columns ``floor(x1) <= x < ceil(x2)`` and rows
    ``floor(y1) <= y < ceil(y2)``, clipped to the image. Detections with ``score < score_thresh``
    or a detector class absent from ``class_map`` are ignored. Vectorised through a 2-D difference
    array, so memory is O(C·H·W) whatever the number of boxes.

    Args:
        boxes: float[N, 4] (x1, y1, x2, y2) in pixels, numpy or torch.
        labels: int[N] detector classes.
        scores: float[N] in [0, 1].
        class_map: detector class -> segmentation class in [0, num_classes).
        height, width: image size in pixels.
        num_classes: C, the number of segmentation classes.
        score_thresh: minimum score; a detection at exactly the threshold is used.

    Returns:
        bool[num_classes, height, width] on the device of ``boxes`` (CPU for numpy input).
    """
    count = len(torch.as_tensor(boxes).reshape(-1, 4))
    image = torch.zeros(count, dtype=torch.long)
    return rasterize_box_batch(
        boxes, image, labels, scores, class_map, 1, height, width, num_classes, score_thresh
    )[0]


def rasterize_box_batch(
    boxes: Tensor | np.ndarray,
    image: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    scores: Tensor | np.ndarray,
    class_map: Mapping[int, int],
    batch: int,
    height: int,
    width: int,
    num_classes: int,
    score_thresh: float = 0.95,
    device: torch.device | str | None = None,
) -> Tensor:
    """:func:`rasterize_boxes` of a batch of images of one size in one pass: the detections of
    every image concatenated, ``image`` int[N] naming each one's image in [0, batch). Returns
    bool[batch, num_classes, height, width] on ``device`` (default: the device of ``boxes``)."""
    box_t = torch.as_tensor(boxes).to(device=device, dtype=torch.float64).reshape(-1, 4)
    device = box_t.device
    image_t = torch.as_tensor(image, device=device).reshape(-1).long()
    label_t = torch.as_tensor(labels, device=device).reshape(-1).long()
    score_t = torch.as_tensor(scores, device=device).reshape(-1)
    seg, mapped = _map_classes(label_t, class_map, num_classes)
    x0, x1 = _pixel_span(box_t[:, 0], box_t[:, 2], width)
    y0, y1 = _pixel_span(box_t[:, 1], box_t[:, 3], height)
    use = mapped & (score_t >= score_thresh) & (x1 > x0) & (y1 > y0)
    img, seg, x0, x1, y0, y1 = image_t[use], seg[use], x0[use], x1[use], y0[use], y1[use]
    diff = torch.zeros(batch, num_classes, height + 1, width + 1, dtype=torch.int32, device=device)
    ones = torch.ones_like(seg, dtype=torch.int32)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        diff.index_put_((img, seg, ys, xs), sign * ones, accumulate=True)
    counts = diff.cumsum(dim=2, dtype=torch.int32).cumsum(dim=3, dtype=torch.int32)
    return counts[:, :, :height, :width] > 0


def _map_classes(
    labels: Tensor, class_map: Mapping[int, int], num_classes: int
) -> tuple[Tensor, Tensor]:
    """Map detector classes int64[N] to segmentation classes: (int64[N], bool[N] mapped)."""
    bad = {k: v for k, v in class_map.items() if not 0 <= v < num_classes}
    if bad:
        raise ValueError(f"class_map targets outside [0, {num_classes}): {bad}")
    if not class_map:
        return torch.zeros_like(labels), torch.zeros_like(labels, dtype=torch.bool)
    keys = torch.tensor(list(class_map.keys()), dtype=torch.long, device=labels.device)
    values = torch.tensor(list(class_map.values()), dtype=torch.long, device=labels.device)
    match = labels[:, None] == keys[None, :]  # [N, K]
    return values[match.int().argmax(dim=1)], match.any(dim=1)


def _pixel_span(start: Tensor, stop: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Half-open pixel range [floor(start), ceil(stop)) clipped to [0, size]; int64[N] each."""
    return start.floor().clamp(0, size).long(), stop.ceil().clamp(0, size).long()


def detector_reliability(
    labels: Tensor,
    conf: Tensor,
    box_masks: Tensor,
    valid: Tensor | None = None,
    conf_thresh: float = 0.95,
) -> Tensor:
    """WPL reliable pixels ``R_p = M[ŷ_p, p] ∧ conf_p >= conf_thresh ∧ valid_p``.

    Args:
        labels: int[B, H, W], pseudo-labels ŷ; values outside [0, C) are never reliable.
        conf: float[B, H, W] in [0, 1].
        box_masks: bool[B, C, H, W], rasterised detections (``rasterize_boxes`` per image).
        valid: bool[B, H, W]; None means every pixel is valid.
        conf_thresh: confidence threshold; a pixel at exactly the threshold passes.

    Returns:
        bool[B, H, W].
    """
    num_classes = box_masks.shape[1]
    labels = labels.long()
    in_range = (labels >= 0) & (labels < num_classes)
    safe = torch.where(in_range, labels, torch.zeros_like(labels))
    in_box = box_masks.to(torch.bool).gather(1, safe[:, None]).squeeze(1)
    reliable = in_box & in_range & (conf >= conf_thresh)
    return reliable if valid is None else reliable & valid.to(torch.bool)


def topk_index_similarity(
    features: Tensor, prototypes: Tensor, labels: Tensor, k: int = 5
) -> Tensor:
    """WPL rank-statistics weight ``W_p = |T_k(f_p) ∩ T_k(μ_{ŷ_p})| / k``.

    ``T_k(v)`` is the index set of the k largest entries of v (ties broken as ``torch.topk`` does).
    Implemented as one-hot index sets of the prototypes gathered at each pixel's top-k indices, so
    memory is O(B·k·H·W + C·D).

    Args:
        features: float[B, D, H, W], decoder features.
        prototypes: float[C, D]; a row containing NaN means the class has no prototype.
        labels: int[B, H, W], pseudo-labels ŷ; ``IGNORE_INDEX`` or any value outside [0, C) gives 0.
        k: size of the index sets, 1 <= k <= D.

    Returns:
        float[B, H, W] in {0, 1/k, ..., 1}, dtype of ``features``; 0 where ŷ has no prototype.
    """
    num_classes, dim = prototypes.shape
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, {dim}], got {k}")
    has_proto = ~prototypes.isnan().any(dim=1)  # [C]
    proto_idx = prototypes.nan_to_num(0.0).topk(k, dim=1).indices  # [C, k]
    proto_sets = torch.zeros(num_classes, dim, dtype=torch.bool, device=prototypes.device)
    proto_sets.scatter_(1, proto_idx, True)
    labels = labels.long()
    usable = (labels >= 0) & (labels < num_classes)
    safe = torch.where(usable, labels, torch.zeros_like(labels))
    usable = usable & has_proto[safe]
    feat_idx = features.topk(k, dim=1).indices  # [B, k, H, W]
    hits = proto_sets.flatten()[safe[:, None] * dim + feat_idx].sum(dim=1)  # [B, H, W]
    weight = hits.to(features.dtype) / k
    return torch.where(usable, weight, torch.zeros_like(weight))
