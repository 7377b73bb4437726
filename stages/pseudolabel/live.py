"""The live parts of the policies, computed in the student's training loop (methods.md §5).

Pure torch (no Ray, no MLflow, no I/O): each function takes the batch's stored maps after the
joint augmentation and returns what the loss needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stages.pseudolabel import ops


def s4mc_keep(
    margins: Tensor,
    refined_margins: Tensor,
    valid: Tensor,
    step: int,
    total_steps: int,
    alpha0: float = 0.4,
) -> Tensor:
    """S4MC keep mask of one batch: ``κ̃ > γ_t`` with γ_t the DPA quantile of the batch's κ.

    margins, refined_margins: float[B, H, W] in [0, 1] (κ and κ̃); valid: bool[B, H, W].
    Returns bool[B, H, W].
    """
    gamma = ops.dpa_threshold(margins, valid, ops.dpa_alpha(step, total_steps, alpha0))
    return (refined_margins > gamma) & valid.to(torch.bool)


def tmp_view(
    images: Tensor,
    trusted: Tensor,
    block: int = 32,
    cover: float = 0.7,
    generator: torch.Generator | None = None,
) -> Tensor:
    """CSL's Trusted Mask Perturbation view: covered trusted pixels set to 0 (the mean).

    images: float[B, 3, H, W], normalised; trusted: bool[B, H, W] (w == 1). One block grid per
    image, drawn from ``generator`` (on the images' device when given). Returns float[B, 3, H, W].
    """
    b, _, h, w = images.shape
    grids = torch.stack([ops.tmp_block_mask(h, w, block, cover, generator) for _ in range(b)])
    covered = grids.to(images.device) & trusted.to(torch.bool)
    return images.masked_fill(covered[:, None], 0.0)


def wpl_weight(
    features: Tensor,
    labels: Tensor,
    keep: Tensor,
    prototypes: Tensor,
    k: int = 5,
    offset: float = 0.0,
) -> Tensor:
    """WPL's weight from refreshed prototypes: ``(offset + W) · keep``.

    features: float[B, D, H, W] (the student's, at label resolution); labels: int64[B, H, W];
    keep: bool[B, H, W] (conf >= τ, stored); prototypes: float[C, D], NaN rows = none.
    Returns float[B, H, W].
    """
    similarity = ops.topk_index_similarity(features, prototypes.to(features.dtype), labels, k=k)
    return (similarity + offset) * keep.to(similarity.dtype)
