"""Batched augmentation on the device that holds the batch.

The training step's views are made here, the whole batch at once, on the training device: the
random draws (a few numbers an image) come from a CPU ``torch.Generator``, so a run is
reproducible whatever the device, and every per-pixel operation is one batched tensor operation.

* :class:`CropFlip`, the weak view (torchvision's ``RandomResizedCrop`` draw, then a horizontal
  flip): one affine sampling grid per image, applied with ``grid_sample`` to the image
  (bilinear) and to every stored map (nearest) — the same draw for the image and all its maps,
  as methods.md §5 asks.
* :class:`Photometric`, the strong view's image-only part (UniMatch's): colour jitter in a random
  order per image, random grayscale, Gaussian blur, each with its own chance and per-image
  factors, with torchvision's formulas.

Sampling follows ``align_corners=False`` (pixel centres), which is the convention of bilinear
resizing: a map's nearest sample is the one under the image's bilinear sample. The crops the step
draws are never larger than the output, so resizing only enlarges and needs no antialiasing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
LUMA = (0.2989, 0.587, 0.114)


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


class CropFlip:
    """The weak view: a random crop of ``scale`` of the image's area and aspect ratio in
    ``ratio`` (log-uniform), resized to ``size`` x ``size``, flipped horizontally with chance
    ``flip``. Crops are drawn as torchvision's ``RandomResizedCrop.get_params`` draws them (ten
    tries, then the whole image clipped to the ratio range), for all images at once."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (0.75, 4 / 3),
        flip: float = 0.5,
    ):
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip

    def draw(
        self, count: int, height: int, width: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop boxes ``int64[count, 4]`` (top, left, height, width) and flips ``bool[count]``."""
        area = height * width
        tries = 10
        target = area * _uniform(count * tries, *self.scale, generator)
        log_ratio = _uniform(
            count * tries, math.log(self.ratio[0]), math.log(self.ratio[1]), generator
        )
        aspect = torch.exp(log_ratio)
        w = torch.round(torch.sqrt(target * aspect)).long().view(count, tries)
        h = torch.round(torch.sqrt(target / aspect)).long().view(count, tries)
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), torch.full((count,), -1))
        # the fallback: the central crop of the whole image clipped to the ratio range
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fw, fh = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            fh, fw = height, round(height * max(self.ratio))
        else:
            fw, fh = width, height
        pick = first.clamp(min=0)
        rows = torch.arange(count)
        ch = torch.where(first >= 0, h[rows, pick], fh)
        cw = torch.where(first >= 0, w[rows, pick], fw)
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        v = torch.rand(count, generator=generator, dtype=torch.float64)
        top = torch.where(first >= 0, (u * (height - ch + 1)).long(), (height - fh) // 2)
        left = torch.where(first >= 0, (v * (width - cw + 1)).long(), (width - fw) // 2)
        flips = torch.rand(count, generator=generator) < self.flip
        return torch.stack([top, left, ch, cw], dim=1), flips

    def grid(
        self,
        boxes: torch.Tensor,
        flips: torch.Tensor,
        height: int,
        width: int,
        device: torch.device,
    ) -> torch.Tensor:
        """The sampling grid ``float32[B, size, size, 2]`` of the crops (``boxes`` int64[B, 4]
        top, left, height, width; ``flips`` bool[B]), on ``device``."""
        top, left, h, w = boxes.double().unbind(dim=1)
        theta = torch.zeros(len(boxes), 2, 3, dtype=torch.float64)
        sign = 1.0 - 2.0 * flips.double()
        theta[:, 0, 0] = sign * w / width
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * top + h) / height - 1
        shape = (len(boxes), 1, self.size, self.size)
        grid = F.affine_grid(theta.float().to(device), list(shape), align_corners=False)
        # samples past the crop's outer pixel centres take the edge pixel, as when the crop is
        # cut out first and then resized (torchvision's resized_crop)
        bounds = [
            ((2 * start + 1) / extent - 1, (2 * (start + length) - 1) / extent - 1)
            for start, length, extent in ((left, w, width), (top, h, height))
        ]
        return torch.stack(
            [
                grid[..., axis].clamp(
                    min=low.float().to(device).view(-1, 1, 1),
                    max=high.float().to(device).view(-1, 1, 1),
                )
                for axis, (low, high) in enumerate(bounds)
            ],
            dim=-1,
        )

    def __call__(
        self,
        images: torch.Tensor,
        maps: Mapping[str, torch.Tensor],
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``images`` float ``[B, 3, H, W]`` and ``maps`` ``[B, H, W]`` (any dtype) -> the same
        at ``size`` x ``size``, the maps in their own dtypes."""
        count, _, height, width = images.shape
        boxes, flips = self.draw(count, height, width, generator)
        return warp(images, maps, self.grid(boxes, flips, height, width, images.device))


def warp(
    images: torch.Tensor, maps: Mapping[str, torch.Tensor], grid: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sample ``images`` (bilinear) and every map (nearest) at ``grid``: one ``grid_sample``
    for the images and one for all the maps stacked."""
    out = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False)
    if not maps:
        return out, {}
    names = list(maps)
    stacked = torch.stack([maps[name].float() for name in names], dim=1)
    sampled = F.grid_sample(stacked, grid, mode="nearest", align_corners=False)
    return out, {name: sampled[:, m].to(maps[name].dtype) for m, name in enumerate(names)}


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """``float[B, 3, H, W]`` -> its luma ``[B, 1, H, W]``."""
    r, g, b = images.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * images + (1.0 - factor) * other).clamp_(0.0, 1.0)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """``float[B, 3, H, W]`` RGB in [0, 1] -> HSV, each in [0, 1] (torchvision's formulas)."""
    r, g, b = images.unbind(dim=1)
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    equal = maxc == minc
    span = maxc - minc
    ones = torch.ones_like(maxc)
    s = span / torch.where(equal, ones, maxc)
    safe = torch.where(equal, ones, span)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_hsv`."""
    h, s, v = images.unbind(dim=1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    sector = i.unsqueeze(1) == torch.arange(6, device=i.device).view(1, -1, 1, 1)
    table = (
        torch.stack((v, q, p, p, t, v), dim=1),
        torch.stack((t, v, v, q, p, p), dim=1),
        torch.stack((p, p, t, v, v, q), dim=1),
    )
    return torch.stack([(sector * channel).sum(dim=1) for channel in table], dim=1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (``[B]``, in [-0.5, 0.5]) turns."""
    hsv = rgb_to_hsv(images)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel: int = 5) -> torch.Tensor:
    """Blur each image with its own ``sigma`` (``[B]``): a separable ``kernel``-tap Gaussian,
    reflect padding (torchvision's ``gaussian_blur``), as two grouped convolutions."""
    count, channels, height, width = images.shape
    half = (kernel - 1) * 0.5
    x = torch.linspace(-half, half, kernel, device=images.device)
    weights = torch.exp(-0.5 * (x.view(1, -1) / sigma.view(-1, 1).to(images.device)).square())
    weights = weights / weights.sum(dim=1, keepdim=True)  # [B, kernel]
    taps = weights.repeat_interleave(channels, dim=0)  # [B * C, kernel]
    pad = kernel // 2
    flat = images.reshape(1, count * channels, height, width)
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, taps.view(-1, 1, 1, kernel), groups=count * channels)
    flat = F.conv2d(flat, taps.view(-1, 1, kernel, 1), groups=count * channels)
    return flat.view(count, channels, height, width)


class Photometric:
    """The strong view's photometric draw, per image (UniMatch's by default): with chance
    ``jitter_chance`` a colour jitter (brightness, contrast and saturation factors uniform in
    [1 − ``jitter``, 1 + ``jitter``], a hue shift uniform in ±``hue``, applied in a random order
    of the four), grayscale with chance ``grayscale``, a Gaussian blur (5 taps, σ uniform in
    [0.1, 2]) with chance ``blur``. Images are float in [0, 1]."""

    def __init__(
        self,
        *,
        jitter: float = 0.5,
        hue: float = 0.25,
        jitter_chance: float = 0.8,
        grayscale: float = 0.2,
        blur: float = 0.5,
    ):
        self.jitter, self.hue, self.jitter_chance = jitter, hue, jitter_chance
        self.grayscale, self.blur = grayscale, blur

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count = len(images)
        device = images.device
        low = max(0.0, 1.0 - self.jitter)
        factors = low + (1.0 + self.jitter - low) * torch.rand(count, 3, generator=generator)
        shifts = self.hue * (2.0 * torch.rand(count, generator=generator) - 1.0)
        jitter = torch.rand(count, generator=generator) < self.jitter_chance
        order = torch.rand(count, 4, generator=generator).argsort(dim=1)
        gray = torch.rand(count, generator=generator) < self.grayscale
        blur = torch.rand(count, generator=generator) < self.blur
        sigma = 0.1 + 1.9 * torch.rand(count, generator=generator)
        out = images.float().clone()  # written per image below, never the caller's tensor
        if self.jitter > 0 or self.hue > 0:
            for step in range(4):  # each image applies its step-th operation
                for op in range(4):
                    chosen = jitter & (order[:, step] == op)
                    if (op == 3 and self.hue == 0) or (op < 3 and self.jitter == 0):
                        continue
                    if chosen.any():
                        index = chosen.nonzero()[:, 0].to(device)
                        part = out[index]
                        out[index] = self._colour(op, part, factors[chosen], shifts[chosen])
        if gray.any():
            index = gray.nonzero()[:, 0].to(device)
            out[index] = grayscale(out[index]).expand(-1, 3, -1, -1)
        if blur.any():
            index = blur.nonzero()[:, 0].to(device)
            out[index] = gaussian_blur(out[index], sigma[blur])
        return out

    @staticmethod
    def _colour(
        op: int, images: torch.Tensor, factors: torch.Tensor, shifts: torch.Tensor
    ) -> torch.Tensor:
        if op == 3:
            return adjust_hue(images, shifts.to(images.device))
        factor = factors[:, op].to(images.device).view(-1, 1, 1, 1)
        if op == 0:  # brightness
            return _blend(images, torch.zeros_like(images), factor)
        if op == 1:  # contrast: towards the image's mean luma
            mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
            return _blend(images, mean, factor)
        return _blend(images, grayscale(images), factor)  # saturation
