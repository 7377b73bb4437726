"""Turning stored rows into tensors: decoding, fitting to the canvas, normalisation, CutMix.

Every image reaches a model on a square ``image_size`` canvas: scaled so that its long side is
``image_size``, its aspect ratio kept, then padded bottom and right (:func:`fit_and_pad`; the
image and every per-pixel map at once with torchvision.transforms.v2, maps as
``tv_tensors.Mask``, so they are resampled nearest). Nothing is squashed: a 2:1 Cityscapes frame
fills the top half of the canvas. The training step's random views are made batched on its
device (``stages.core.augment``); inference crops the predictions back to the fitted part and
resizes them to the image's own size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from stages.core import codec
from stages.core.constants import IGNORE_INDEX

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``uint8[B, 3, H, W]`` or float in [0, 1] -> normalised ``float32[B, 3, H, W]``."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def decode_image(data: bytes) -> torch.Tensor:
    """PNG bytes -> ``uint8[3, H, W]``."""
    return torch.from_numpy(codec.decode_png(data)).permute(2, 0, 1).contiguous()


def decode_mask(data: bytes | None, height: int, width: int) -> torch.Tensor:
    """PNG label map -> ``int64[H, W]``; a missing mask is all ``IGNORE_INDEX``."""
    if data is None:
        return torch.full((height, width), IGNORE_INDEX, dtype=torch.int64)
    return torch.from_numpy(codec.decode_png(data).astype(np.int64))


def fit_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The size of a ``height`` x ``width`` image scaled, aspect ratio kept, so that its long
    side is ``size``: the part of the ``size`` x ``size`` canvas it fills."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def fit_and_pad(
    image: torch.Tensor, maps: Mapping[str, torch.Tensor], size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[int, int]]:
    """Scale ``image: uint8[3, H, W]`` and its ``maps`` (``[H, W]``, resampled nearest) so the
    long side is ``size``, aspect ratio kept (antialiased bilinear, torchvision.transforms.v2),
    then pad bottom and right to ``size`` x ``size``: the image with 0, a ``label`` map with
    ``IGNORE_INDEX``, every other map with 0 (no weight, not kept). Returns the canvas, its maps
    and the fitted ``(height, width)`` (the top-left part that is the image)."""
    height, width = image.shape[-2:]
    fitted = fit_size(int(height), int(width), size)
    if fitted != (height, width):
        image, maps = apply_joint(v2.Resize(fitted, antialias=True), image, maps)
    pad = [0, size - fitted[1], 0, size - fitted[0]]  # left, right, top, bottom
    if pad[1] or pad[3]:
        image = torch.nn.functional.pad(image, pad, value=0)
        maps = {
            name: torch.nn.functional.pad(value, pad, value=IGNORE_INDEX if name == "label" else 0)
            for name, value in maps.items()
        }
    return image, dict(maps), fitted


def cutmix_boxes(
    count: int,
    height: int,
    width: int,
    chance: float,
    generator: torch.Generator,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """CutMix boxes as ``bool[count, height, width]``, UniMatch's draw: with probability
    ``chance`` an image gets one box whose area is a uniform fraction in ``area`` of the image and
    whose height/width ratio is uniform in ``ratio``, at a uniform position where it fits (its
    sides clipped to the image); otherwise no box."""
    boxes = torch.zeros((count, height, width), dtype=torch.bool)
    draws = torch.rand((count, 5), generator=generator)
    for i, (take, a, r, u, v) in enumerate(draws.tolist()):
        if take >= chance:
            continue
        size = (area[0] + a * (area[1] - area[0])) * height * width
        aspect = ratio[0] + r * (ratio[1] - ratio[0])
        h = min(height, max(1, round(math.sqrt(size * aspect))))
        w = min(width, max(1, round(math.sqrt(size / aspect))))
        top, left = int(u * (height - h + 1)), int(v * (width - w + 1))
        boxes[i, top : top + h, left : left + w] = True
    return boxes


def apply_joint(
    transform: v2.Transform, image: torch.Tensor, maps: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply one random draw of ``transform`` to ``image: uint8[3, H, W]`` and every ``maps`` entry
    (``[H, W]`` tensors of any dtype). Returns the transformed image and maps."""
    sample = {"image": tv_tensors.Image(image), **{k: tv_tensors.Mask(v) for k, v in maps.items()}}
    out = transform(sample)
    image_out = out.pop("image").as_subclass(torch.Tensor)
    return image_out, {k: v.as_subclass(torch.Tensor) for k, v in out.items()}
