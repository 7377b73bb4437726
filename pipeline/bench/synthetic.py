"""Synthetic inputs that look trained: peaked logits, region labels and images, and networks
that replay a trained output at zero cost (``ReplayNetwork``) or are made to look trained
(``trained_looking``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.core.models import segment_logits


# ------------------------------------------------------------------------------ synthetic data
def peaked_logits(
    count: int,
    num_classes: int,
    size: int,
    *,
    generator: torch.Generator,
    cells: int = 8,
    margin: float = 12.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained-looking teacher output: logits ``float32[count, C, size, size]`` and the class
    of each region, ``int64[count, cells, cells]``.

    Each image is ``cells`` x ``cells`` regions of random classes; their one-hot logits times
    ``margin``, made at 32 x 32 and upsampled bilinearly, are peaked inside a region (conf
    1 / (1 + (C - 1) e^-margin)) and soft across its border (a band of size/32 pixels where two
    classes' logits cross): from 256² up, about 89 % of the pixels have conf > 0.95 (at 64², where
    the band is 2 pixels, 99 %).
    """
    grid = torch.randint(num_classes, (count, cells, cells), generator=generator)
    side = min(32, size)
    coarse = F.interpolate(grid[:, None].float(), size=(side, side), mode="nearest")
    onehot = F.one_hot(coarse[:, 0].long(), num_classes).permute(0, 3, 1, 2).float()
    logits = F.interpolate(onehot * margin, size=(size, size), mode="bilinear", align_corners=False)
    return logits.contiguous(), grid


def region_labels(grid: torch.Tensor, size: int) -> torch.Tensor:
    """The region classes of :func:`peaked_logits` at pixel resolution: ``int64[B, size, size]``."""
    return F.interpolate(grid[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def synthetic_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``uint8[B, 3, S, S]``: a random colour per class over ``labels`` (int64[B, S, S]), plus
    noise."""
    colours = torch.randint(0, 256, (int(labels.max()) + 1, 3), generator=generator)
    noise = torch.randint(-24, 25, (*labels.shape, 3), generator=generator)
    images = (colours[labels] + noise).clamp(0, 255).to(torch.uint8)
    return images.permute(0, 3, 1, 2).contiguous()


def image_batch(images: torch.Tensor, first: int = 0) -> dict[str, np.ndarray]:
    """The batch the inference stages' CPU step hands their predictors (unlabeled images)."""
    count, _, height, width = images.shape
    return {
        "image_id": np.array([f"{first + i:016x}" for i in range(count)]),
        "height": np.full(count, height),
        "width": np.full(count, width),
        "extent": np.tile(np.array([height, width], np.int32), (count, 1)),
        "image": images.numpy(),
        "split": np.full(count, "unlabeled"),
        "mask": np.full(count, None, dtype=object),
    }


# ------------------------------------------------------------------------------ networks
class _Replay(torch.autograd.Function):
    """Stored logits as the output of a scalar parameter, free both ways (its gradient is 0)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.new_zeros(()), None


class _ReplayHead(nn.Conv2d):
    """Where ``feature_layer`` looks (LRASPP's ``high_classifier``): its input is the
    classifier's features, its output the first len(input) stored logits, whatever the input."""

    logits: torch.Tensor

    def __init__(self, logits: torch.Tensor, dim: int):
        super().__init__(dim, logits.shape[1], 1)
        self.register_buffer("logits", logits)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Replay.apply(self.anchor, self.logits[: len(features)])
        return out


class _ReplayClassifier(nn.Module):
    def __init__(self, head: _ReplayHead):
        super().__init__()
        self.high_classifier = head


class ReplayNetwork(nn.Module):
    """A zero-cost stand-in for a segmentation network with the real output shapes: for a batch
    of B images it returns ``{"out": logits[:B]}`` (float32[B, C, S, S], differentiable at no
    cost) and its classifier head sees ``features[:B]`` (float[B, D, h, w]), as the teacher's
    classifier does."""

    features: torch.Tensor

    def __init__(self, logits: torch.Tensor, features: torch.Tensor):
        super().__init__()
        self.classifier = _ReplayClassifier(_ReplayHead(logits, features.shape[1]))
        self.register_buffer("features", features)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.classifier.high_classifier(self.features[: len(images)])}


@torch.no_grad()
def trained_looking(model: nn.Module, images: torch.Tensor, margin: float = 8.0) -> float:
    """Make a random segmenter's activations and confidence those of a trained one: BatchNorm
    statistics of one pass over ``images`` (normalised float[B, 3, S, S]; with the initial
    ones a deep random network's activations fade to ~1e-9), then the head's classifier
    convolutions (those with C outputs) scaled so that the median top-1 - top-2 logit margin is
    ``margin``. Returns the fraction of pixels with conf > 0.95 after; ``model`` is in eval
    mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: exactly this pass's batch statistics
        norm.train()
    logits = segment_logits(model, images)
    model.eval()
    top2 = segment_logits(model, images).topk(2, dim=1).values
    scale = margin / float((top2[:, 0] - top2[:, 1]).median().clamp(min=1e-6))
    head: nn.Module = getattr(model, "classifier", model)
    for conv in head.modules():
        if isinstance(conv, nn.Conv2d) and conv.out_channels == logits.shape[1]:
            conv.weight.mul_(scale)
            if conv.bias is not None:
                conv.bias.mul_(scale)
    conf = segment_logits(model, images).softmax(dim=1).amax(dim=1)
    return float((conf > 0.95).float().mean())
