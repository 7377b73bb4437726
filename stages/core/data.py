"""Turning stored rows into tensors: decoding, resizing, normalisation, CutMix boxes.

The Ray Data steps resize with torchvision.transforms.v2, the image and every per-pixel map at
once (maps are ``tv_tensors.Mask``, so they are resampled with nearest interpolation); the
training step's random views are made batched on its device (``stages.core.augment``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from stages.core import codec

IGNORE_INDEX = 255
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


def resize_transform(size: int) -> v2.Transform:
    """Resize everything to ``size`` x ``size`` (bilinear for images, nearest for maps)."""
    return v2.Resize((size, size), antialias=True)


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
