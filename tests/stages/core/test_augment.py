"""Batched augmentation against torchvision's per-image functions, and its joint semantics."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from stages.core import augment


def _images(count: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _whole(count: int, size: int) -> torch.Tensor:
    return torch.tensor([[size, size]] * count)


def test_whole_image_unflipped_crop_is_the_identity() -> None:
    images = _images()
    label = torch.randint(0, 5, (3, 16, 16), dtype=torch.int64)
    keep = torch.rand(3, 16, 16) > 0.5
    weak = augment.ScaleCrop(16, scale=(1.0, 1.0), flip=0.0)
    out, maps = weak(
        images, {"label": label, "keep": keep}, _whole(3, 16), torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)
    assert torch.equal(maps["label"], label)
    assert torch.equal(maps["keep"], keep)
    assert maps["label"].dtype == torch.int64
    assert maps["keep"].dtype == torch.bool


def test_flip_mirrors_the_image_and_every_map() -> None:
    images = _images()
    weight = torch.rand(3, 16, 16)
    weak = augment.ScaleCrop(16, scale=(1.0, 1.0), flip=1.0)
    out, maps = weak(images, {"weight": weight}, _whole(3, 16), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images.flip(-1), atol=1e-5, rtol=0)
    assert torch.equal(maps["weight"], weight.flip(-1))


@pytest.mark.parametrize(("top", "left", "flip"), [(0, 0, False), (3, 5, False), (8, 2, True)])
def test_crop_is_torchvision_resized_crop_bilinear_and_nearest(
    top: int, left: int, flip: bool
) -> None:
    """Factor 2: an 8 x 8 window enlarged to a 16 x 16 crop (no tie in nearest-exact's
    rounding at a scale of 2), as torchvision's resized_crop cuts and enlarges it."""
    images = _images(1)
    label = torch.randint(0, 255, (1, 16, 16), dtype=torch.uint8)
    weak = augment.ScaleCrop(16)
    boxes = torch.tensor([[top, left, 8]], dtype=torch.float64)
    grid = weak.grid(boxes, torch.tensor([flip]), 16, torch.device("cpu"))
    out, maps = augment.warp(images, {"label": label}, grid)
    want = TF.resized_crop(images[0], top, left, 8, 8, [16, 16], antialias=False)
    want_label = TF.resized_crop(
        label, top, left, 8, 8, [16, 16], interpolation=InterpolationMode.NEAREST_EXACT
    )
    if flip:
        want, want_label = want.flip(-1), want_label.flip(-1)
    # the window's outer half pixel samples past it (it is not cut out first): compare inside
    torch.testing.assert_close(out[0][..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=1e-5, rtol=0)
    assert torch.equal(maps["label"], want_label)


def test_crop_draws_follow_the_ranges() -> None:
    """Windows of 32 / factor canvas pixels, factor uniform in the range; a window inside the
    fitted part where it fits, else the fitted part inside the window."""
    weak = augment.ScaleCrop(32, scale=(0.5, 2.0))
    extents = torch.tensor([[40, 60]] * 4000)
    boxes, flips = weak.draw(extents, torch.Generator().manual_seed(1))
    top, left, side = boxes.unbind(dim=1)
    factor = 32 / side
    assert 0.5 <= factor.min() < 0.52
    assert 1.98 < factor.max() <= 2.0
    assert abs(factor.mean().item() - 1.25) < 0.03  # uniform in [0.5, 2]
    fits = side <= 40
    assert (top[fits] >= 0).all()
    assert (top[fits] + side[fits] <= 40 + 1e-9).all()
    assert (top[~fits] <= 0).all()
    assert (top[~fits] + side[~fits] >= 40 - 1e-9).all()
    wide = side <= 60
    assert (left[wide] >= 0).all()
    assert (left[wide] + side[wide] <= 60 + 1e-9).all()
    assert (left[~wide] + side[~wide] >= 60 - 1e-9).all()
    assert 0.47 < flips.double().mean() < 0.53
    again, _ = weak.draw(extents, torch.Generator().manual_seed(1))
    assert torch.equal(boxes, again)


def test_a_crop_past_the_image_is_padding_ignore_and_no_weight() -> None:
    """Factor 0.5 on a 16-px canvas whose fitted part is 8 x 16 (a 2:1 image): the 32-px window
    at corner (-8, -8) holds the image at rows 8..15 of the 16-px crop, columns 4..11; the rest
    is padding: image 0, label ignore, weight 0, keep false."""
    images = torch.ones(1, 3, 16, 16)
    label = torch.full((1, 16, 16), 255, dtype=torch.uint8)
    label[:, :8] = 3  # the canvas: a 2:1 image on top, its own padding below
    weight = torch.zeros(1, 16, 16)
    weight[:, :8] = 1.0
    images[:, :, 8:] = 0.0
    weak = augment.ScaleCrop(16)
    boxes = torch.tensor([[-8.0, -8.0, 32.0]], dtype=torch.float64)
    grid = weak.grid(boxes, torch.tensor([False]), 16, torch.device("cpu"))
    out, maps = augment.warp(images, {"label": label, "weight": weight}, grid)
    want = torch.full((16, 16), 255, dtype=torch.uint8)
    want[4:8, 4:12] = 3
    assert torch.equal(maps["label"][0], want)
    assert torch.equal(maps["weight"][0], (want == 3).float())
    assert out[0, 0, 5:7, 5:11].min() > 0.99
    assert out[0, 0, 9:, :].abs().max() == 0
    assert out[0, 0, :3, :].abs().max() == 0


def test_a_square_stays_square_in_any_crop() -> None:
    """The aspect ratio is kept: an 8 x 8 square of a class, scaled by any factor, is a square
    in the crop (within a pixel of rounding), never a rectangle."""
    label = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    label[:, :, 12:20, 12:20] = 1
    images = label.expand(-1, 3, -1, -1).float()
    weak = augment.ScaleCrop(32, scale=(0.7, 1.6), flip=0.5)
    generator = torch.Generator().manual_seed(5)
    boxes, flips = weak.draw(_whole(64, 32), generator)
    # keep the square inside every crop: centre the windows on it
    side = boxes[:, 2]
    boxes[:, 0] = boxes[:, 1] = 16 - side / 2
    grid = weak.grid(boxes, flips, 32, torch.device("cpu"))
    _, maps = augment.warp(images, {"label": label[:, 0]}, grid)
    for i in range(64):
        square = maps["label"][i] == 1
        rows, cols = square.any(dim=1).nonzero(), square.any(dim=0).nonzero()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert abs(height - width) <= 1, (i, height, width)
        assert abs(height - 8 * 32 / side[i].item()) <= 1.5


def test_maps_follow_the_image_under_random_crops() -> None:
    """The image's first channel carries the label in 4 x 4 blocks: wherever the bilinear
    image sample lies inside a block (its value a label exactly), the nearest label agrees."""
    generator = torch.Generator().manual_seed(3)
    coarse = torch.randint(0, 8, (6, 1, 4, 4), generator=generator).float()
    blocks = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="nearest")
    images = blocks.expand(-1, 3, -1, -1) / 8.0
    label = blocks[:, 0].long()
    weak = augment.ScaleCrop(16, scale=(1.0, 2.0))
    out, maps = weak(images, {"label": label}, _whole(6, 16), generator)
    value = out[:, 0] * 8.0
    inside = (value - value.round()).abs() < 1e-4
    assert inside.float().mean() > 0.6
    assert torch.equal(maps["label"][inside], value.round().long()[inside])


@pytest.mark.parametrize(
    ("op", "reference"),
    [
        (0, TF.adjust_brightness),
        (1, TF.adjust_contrast),
        (2, TF.adjust_saturation),
    ],
)
def test_colour_factors_are_torchvision_per_image(op: int, reference: object) -> None:
    images = _images(3)
    factors = torch.tensor([[0.5, 0.7, 1.4], [1.5, 1.2, 0.6], [1.0, 0.9, 1.1]])
    out = augment.Photometric._colour(op, images, factors, torch.zeros(3))
    for i in range(3):
        want = reference(images[i], float(factors[i, op]))  # type: ignore[operator]
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=0)


def test_hue_shift_is_torchvision_per_image() -> None:
    images = _images(3)
    shifts = torch.tensor([-0.25, 0.1, 0.5])
    out = augment.adjust_hue(images, shifts)
    for i in range(3):
        want = TF.adjust_hue(images[i], float(shifts[i]))
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=0)


def test_grayscale_and_blur_are_torchvision_per_image() -> None:
    images = _images(2)
    gray = augment.grayscale(images).expand(-1, 3, -1, -1)
    for i in range(2):
        want = TF.rgb_to_grayscale(images[i], num_output_channels=3)
        torch.testing.assert_close(gray[i], want, atol=1e-6, rtol=0)
    sigma = torch.tensor([0.3, 1.7])
    blurred = augment.gaussian_blur(images, sigma)
    for i in range(2):
        want = TF.gaussian_blur(images[i], [5, 5], [float(sigma[i])] * 2)
        torch.testing.assert_close(blurred[i], want, atol=1e-5, rtol=0)


def test_photometric_chances_and_reproducibility() -> None:
    images = _images(64, size=8)
    off = augment.Photometric(jitter_chance=0.0, grayscale=0.0, blur=0.0)
    assert torch.equal(off(images, torch.Generator().manual_seed(0)), images)
    gray = augment.Photometric(jitter_chance=0.0, grayscale=1.0, blur=0.0)(
        images, torch.Generator().manual_seed(0)
    )
    assert torch.equal(gray[:, 0], gray[:, 1])
    assert torch.equal(gray[:, 1], gray[:, 2])
    strong = augment.Photometric()
    first = strong(images, torch.Generator().manual_seed(7))
    assert torch.equal(first, strong(images, torch.Generator().manual_seed(7)))
    changed = (first - images).abs().flatten(1).amax(dim=1) > 1e-6
    # 1 - (1 - 0.8)(1 - 0.2)(1 - 0.5) = 0.92 of the images change
    assert 0.75 < changed.float().mean() < 1.0
    assert first.min() >= 0.0
    assert first.max() <= 1.0


def test_jitter_order_is_drawn_per_image() -> None:
    """Brightness then contrast differs from contrast then brightness: with two images drawn in
    the two orders (same factors), each matches torchvision applied in its own order."""
    images = _images(2)
    factors = torch.tensor([[1.4, 0.5, 1.0], [1.4, 0.5, 1.0]])
    bc = augment.Photometric._colour(
        1,
        augment.Photometric._colour(0, images, factors, 0 * factors[:, 0]),
        factors,
        0 * factors[:, 0],
    )
    cb = augment.Photometric._colour(
        0,
        augment.Photometric._colour(1, images, factors, 0 * factors[:, 0]),
        factors,
        0 * factors[:, 0],
    )
    assert not torch.allclose(bc, cb, atol=1e-3)
    want = TF.adjust_contrast(TF.adjust_brightness(images[0], 1.4), 0.5)
    torch.testing.assert_close(bc[0], want, atol=1e-5, rtol=0)
    assert math.isfinite(float(cb.sum()))
