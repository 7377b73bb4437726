"""Batched augmentation on the device that holds the batch.

The training step's views are made here, the whole batch at once, on the training device: the
random draws (a few numbers an image) come from a CPU ``torch.Generator``, so a run is
reproducible whatever the device, and every per-pixel operation is one batched tensor operation.

* :class:`ScaleCrop`, the weak view (UniMatch's: random scaling with the aspect ratio kept, a
  random crop padded with ignore where it passes the image's edge, a horizontal flip): one
  affine sampling grid per image, applied with ``grid_sample`` to the image (bilinear) and to
  every stored map (nearest) — the same draw for the image and all its maps, as methods.md §5
  asks.
* :class:`Photometric`, the strong view's image-only part (UniMatch's): colour jitter in a random
  order per image, random grayscale, Gaussian blur, each with its own chance and per-image
  factors, with torchvision's formulas.

Sampling follows ``align_corners=False`` (pixel centres), which is the convention of bilinear
resizing: a map's nearest sample is the one under the image's bilinear sample. A factor below 1
shrinks the image without antialiasing (bilinear sampling), as the strong views' blur does not
need it and the labels are sampled nearest either way.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from stages.core.constants import IGNORE_INDEX

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
LUMA = (0.2989, 0.587, 0.114)


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


class ScaleCrop:
    """The weak view: the image scaled by a random factor in ``scale`` (uniform; aspect ratio
    kept), a random ``size`` x ``size`` crop of it, flipped horizontally with chance ``flip``:
    UniMatch's resize, crop and flip, as one affine sampling grid per image.

    Images arrive on the canvas of :func:`stages.core.data.fit_and_pad`: the fitted part of
    image ``i`` is its top-left ``extents[i]`` = (height, width). At factor ``s`` a crop covers
    ``size / s`` canvas pixels a side; its corner is uniform over the positions that keep it
    inside the fitted image, and where the crop is larger than the image, over those that keep
    the image inside the crop. What a crop holds beyond the image is padding: image 0, label
    ``IGNORE_INDEX`` and every other map 0 (no weight, not kept), as the canvas's own padding."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 2.0), flip: float = 0.5):
        self.size, self.scale, self.flip = size, scale, flip

    def draw(
        self, extents: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop boxes ``float64[B, 3]`` (top, left, side, in canvas pixels) and flips
        ``bool[B]`` for images whose fitted parts are ``extents`` (``int[B, 2]``)."""
        count = len(extents)
        factor = _uniform(count, *self.scale, generator)
        side = self.size / factor
        height, width = extents.double().unbind(dim=1)
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        v = torch.rand(count, generator=generator, dtype=torch.float64)
        flips = torch.rand(count, generator=generator) < self.flip
        # (extent - side) is negative for a crop larger than the image: the corner then lies
        # in [extent - side, 0], the image inside the crop
        return torch.stack([u * (height - side), v * (width - side), side], dim=1), flips

    def grid(
        self, boxes: torch.Tensor, flips: torch.Tensor, canvas: int, device: torch.device
    ) -> torch.Tensor:
        """The sampling grid ``float32[B, size, size, 2]`` of the crops on a ``canvas`` x
        ``canvas`` batch, on ``device`` (``align_corners=False``: pixel centres)."""
        top, left, side = boxes.unbind(dim=1)
        theta = torch.zeros(len(boxes), 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = (1.0 - 2.0 * flips.double()) * side / canvas
        theta[:, 0, 2] = (2 * left + side) / canvas - 1
        theta[:, 1, 1] = side / canvas
        theta[:, 1, 2] = (2 * top + side) / canvas - 1
        shape = [len(boxes), 1, self.size, self.size]
        return F.affine_grid(theta.float().to(device), shape, align_corners=False)

    def __call__(
        self,
        images: torch.Tensor,
        maps: Mapping[str, torch.Tensor],
        extents: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``images`` float ``[B, 3, S, S]`` and ``maps`` ``[B, S, S]`` (any dtype) on the
        canvas, ``extents`` ``int[B, 2]`` -> the crops at ``size`` x ``size``, the maps in their
        own dtypes."""
        boxes, flips = self.draw(extents.cpu(), generator)
        grid = self.grid(boxes, flips, images.shape[-1], images.device)
        return warp(images, maps, grid)


def warp(
    images: torch.Tensor, maps: Mapping[str, torch.Tensor], grid: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sample ``images`` (bilinear) and every map (nearest) at ``grid``: one ``grid_sample``
    for the images and one for all the maps stacked. Samples off the canvas are 0, and
    ``IGNORE_INDEX`` in a ``label`` map."""
    out = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False)
    if not maps:
        return out, {}
    names = list(maps)
    inside = torch.ones_like(maps[names[0]], dtype=torch.float32)
    stacked = torch.stack([maps[name].float() for name in names] + [inside], dim=1)
    sampled = F.grid_sample(stacked, grid, mode="nearest", align_corners=False)
    off = sampled[:, -1] == 0
    result = {}
    for m, name in enumerate(names):
        value = sampled[:, m]
        if name == "label":
            value = value.masked_fill(off, IGNORE_INDEX)
        result[name] = value.to(maps[name].dtype)
    return out, result


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

    def without_grayscale(self) -> Photometric:
        """The same draw with grayscale chance 0 (CSL's TMP view: grayscale hurts with TMP)."""
        return Photometric(
            jitter=self.jitter,
            hue=self.hue,
            jitter_chance=self.jitter_chance,
            grayscale=0.0,
            blur=self.blur,
        )

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
