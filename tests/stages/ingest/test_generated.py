"""Tests for the generated default dataset (stages/ingest/generated.py)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.ingest.generated import (
    CLASS_COLOURS,
    CLASS_NAMES,
    SHAPES,
    GeneratedSpec,
    generate_dataset,
    render_image,
    split_indices,
    stem,
)

SMALL = GeneratedSpec(num_labeled=3, num_unlabeled=5, num_val=2, image_size=24)


def _render_many(spec: GeneratedSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8[n, H, W, 3] and masks uint8[n, H, W] for indices 0..n-1."""
    pairs = [render_image(spec, i) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _read_dir(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes for every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- rendering ------------------------------------------------------------------------------


def test_render_shapes_and_dtypes() -> None:
    image, mask = render_image(GeneratedSpec(image_size=40), 3)
    assert image.shape == (40, 40, 3)
    assert image.dtype == np.uint8
    assert mask.shape == (40, 40)
    assert mask.dtype == np.uint8


def test_render_is_deterministic_by_seed() -> None:
    a_img, a_mask = render_image(GeneratedSpec(seed=7), 11)
    b_img, b_mask = render_image(GeneratedSpec(seed=7), 11)
    c_img, c_mask = render_image(GeneratedSpec(seed=8), 11)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_mask, c_mask)


def test_different_indices_differ() -> None:
    spec = GeneratedSpec()
    assert not np.array_equal(render_image(spec, 0)[1], render_image(spec, 1)[1])


def test_image_does_not_depend_on_split_counts() -> None:
    small, large = GeneratedSpec(num_unlabeled=10), GeneratedSpec(num_unlabeled=20, num_val=3)
    for got, want in zip(render_image(small, 5), render_image(large, 5), strict=True):
        np.testing.assert_array_equal(got, want)


def test_noise_is_last_and_has_the_requested_std() -> None:
    """Noise only adds N(0, noise_std): masks match, the image difference has that std."""
    clean_img, clean_mask = _render_many(GeneratedSpec(noise_std=0.0), 20)
    noisy_img, noisy_mask = _render_many(GeneratedSpec(noise_std=8.0), 20)
    np.testing.assert_array_equal(clean_mask, noisy_mask)
    unclipped = (clean_img > 40) & (clean_img < 215)  # 21 std from 0 and 255: no clipping
    diff = noisy_img.astype(np.float64)[unclipped] - clean_img[unclipped]
    assert abs(diff.mean()) < 0.2
    assert diff.std() == pytest.approx(8.0, rel=0.03)


def test_mask_values_are_class_indices() -> None:
    _, masks = _render_many(GeneratedSpec(num_classes=4), 60)
    assert set(np.unique(masks).tolist()) == {0, 1, 2, 3}


def test_every_class_appears_and_every_image_has_an_object() -> None:
    _, masks = _render_many(GeneratedSpec(image_size=32), 40)
    assert set(np.unique(masks).tolist()) == set(range(len(CLASS_NAMES)))
    assert (masks > 0).any(axis=(1, 2)).all()


def test_min_size_image_still_has_an_object() -> None:
    _, masks = _render_many(GeneratedSpec(image_size=16, max_objects=1), 200)
    assert (masks > 0).any(axis=(1, 2)).all()


def test_object_pixel_fraction_is_sane() -> None:
    _, masks = _render_many(GeneratedSpec(), 100)
    per_image = (masks > 0).mean(axis=(1, 2))
    assert 0.18 < per_image.mean() < 0.32  # measured 0.24 over 1000 images
    assert per_image.min() > 0.0


def test_colour_does_not_separate_classes() -> None:
    """Mean colour per class agrees across classes, and predicts the class at chance level.

    One sample = the mean RGB of one class's pixels in one image (~1 object, noise averaged
    out). Object colours are uniform on [0, 255]^3, per-channel std ~74, so with ~250 objects
    per class a class mean has std ~5 and a difference of two class means std ~7: the 30
    margin is > 4 sigma. A class-dependent palette would put class means ~100 apart and
    let nearest-centroid classification reach ~100 % instead of ~25 % (4 classes).
    """
    images, masks = _render_many(GeneratedSpec(image_size=32), 400)
    colours, labels = [], []
    for image, mask in zip(images, masks, strict=True):
        for cls in np.unique(mask[mask > 0]):
            colours.append(image[mask == cls].mean(axis=0))
            labels.append(cls)
    x, y = np.array(colours), np.array(labels)
    centroids = np.stack([x[y == c].mean(axis=0) for c in range(1, 5)])
    assert np.abs(centroids[:, None] - centroids[None]).max() < 30.0
    predicted = 1 + np.argmin(np.linalg.norm(x[:, None] - centroids[None], axis=2), axis=1)
    assert (predicted == y).mean() < 0.4


def test_colour_bias_moves_object_colours_towards_their_class_and_keeps_the_masks() -> None:
    """With colour_bias = 1 an object's colour is its class colour plus its light shading (at
    most 30 across the object), so with no noise a class's mean colour per image lies within
    30 of CLASS_COLOURS; the random stream is unchanged, so the masks are the unbiased ones."""
    plain = GeneratedSpec(image_size=32, noise_std=0.0)
    biased = replace(plain, colour_bias=1.0)
    for index in range(40):
        _, mask = render_image(plain, index)
        image, biased_mask = render_image(biased, index)
        assert np.array_equal(mask, biased_mask)
        for cls in np.unique(mask[mask > 0]):
            mean = image[mask == cls].astype(np.float32).mean(axis=0)
            assert np.abs(mean - CLASS_COLOURS[cls]).max() < 30.0, (index, cls, mean)
    # half way: a class's mean colour over many objects is half its colour, half the mean of
    # the uniform draws (127.5): ~100 objects a class, std of such a mean ~4
    images, masks = _render_many(replace(plain, colour_bias=0.5), 200)
    for cls in range(1, 5):
        pixels = [
            image[mask == cls].mean(axis=0)
            for image, mask in zip(images, masks, strict=True)
            if (mask == cls).any()
        ]
        centroid = np.mean(pixels, axis=0)
        assert np.abs(centroid - (0.5 * 127.5 + 0.5 * CLASS_COLOURS[cls])).max() < 15.0, cls


_RING = math.pi * 0.55**2  # outer radius 0.55 * size


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("disc", math.pi / 4, math.pi / 4),  # diameter = size
        ("square", 0.81, 0.81),  # side = 0.9 * size
        ("triangle", 3 * math.sqrt(3) / 4 * 0.7**2, 3 * math.sqrt(3) / 4 * 0.7**2),  # R = 0.7 size
        ("ring", _RING * (1 - 0.65**2), _RING * (1 - 0.45**2)),  # inner/outer in 0.45..0.65
    ],
)
def test_shape_areas(name: str, low: float, high: float) -> None:
    """Pixel count of each shape, at random rotations, matches its area (per size^2).

    The ring's inner radius is random: its areas must span most of [low, high]
    (40 uniform draws all missing a quarter of the range has probability 0.75^40 ~ 1e-5).
    """
    size = 40.0
    offsets = np.arange(101, dtype=np.float32) - 50
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    rngs = [np.random.default_rng(seed) for seed in range(40)]
    areas = np.array([SHAPES[name](rng, dx, dy, size).sum() for rng in rngs]) / size**2
    assert areas.min() > 0.98 * low
    assert areas.max() < 1.02 * high
    quarter = (high - low) / 4
    assert areas.min() <= low + quarter + 0.01 * low
    assert areas.max() >= high - quarter - 0.01 * high


# --- spec and layout --------------------------------------------------------------------------


def test_invalid_spec_reports_every_error() -> None:
    with pytest.raises(ValueError, match="invalid GeneratedSpec") as info:
        GeneratedSpec(num_val=-1, num_classes=9, image_size=8, max_objects=0)
    message = str(info.value)
    for fragment in ("num_val", "num_classes must be in 4..5", "image_size", "max_objects"):
        assert fragment in message


def test_stems_and_split_indices() -> None:
    assert stem(17) == "gen-000017"
    assert split_indices(SMALL) == {
        "labeled": range(3),
        "unlabeled": range(3, 8),
        "val": range(8, 10),
    }


def test_generate_dataset_layout(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    written = generate_dataset(SMALL, out)
    expected = {
        "labeled": ["gen-000000", "gen-000001", "gen-000002"],
        "unlabeled": [f"gen-00000{i}" for i in range(3, 8)],
        "val": ["gen-000008", "gen-000009"],
    }
    assert written == expected
    all_stems = {s for stems in expected.values() for s in stems}
    files = set(_read_dir(out))
    assert files == (
        {f"images/{s}.png" for s in all_stems}
        | {f"masks/{s}.png" for s in all_stems}
        | {"splits/labeled.txt", "splits/unlabeled.txt", "splits/val.txt", "classes.txt"}
    )
    for split, stems in expected.items():
        assert (out / "splits" / f"{split}.txt").read_text() == "".join(f"{s}\n" for s in stems)
    assert (out / "classes.txt").read_text().splitlines() == list(CLASS_NAMES)


def test_written_pngs_match_render(tmp_path: Path) -> None:
    generate_dataset(SMALL, tmp_path / "gen")
    with Image.open(tmp_path / "gen" / "images" / "gen-000004.png") as im:
        assert im.mode == "RGB"
        image = np.asarray(im)
    with Image.open(tmp_path / "gen" / "masks" / "gen-000004.png") as im:
        assert im.mode == "L"
        mask = np.asarray(im)
    want_image, want_mask = render_image(SMALL, 4)
    np.testing.assert_array_equal(image, want_image)
    np.testing.assert_array_equal(mask, want_mask)


def test_fewer_classes_use_a_prefix_of_the_names(tmp_path: Path) -> None:
    spec = GeneratedSpec(num_labeled=2, num_unlabeled=0, num_val=0, num_classes=4)
    generate_dataset(spec, tmp_path / "gen")
    names = (tmp_path / "gen" / "classes.txt").read_text().splitlines()
    assert names == ["background", "disc", "square", "triangle"]
    assert (tmp_path / "gen" / "splits" / "unlabeled.txt").read_text() == ""


def test_generate_is_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    generate_dataset(SMALL, tmp_path / "a")
    generate_dataset(SMALL, tmp_path / "b")
    generate_dataset(replace(SMALL, seed=1), tmp_path / "c")
    a, b, c = (_read_dir(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.startswith("images/"))


def test_adding_images_keeps_earlier_files(tmp_path: Path) -> None:
    small = GeneratedSpec(num_labeled=2, num_unlabeled=10, num_val=1, image_size=24)
    large = GeneratedSpec(num_labeled=2, num_unlabeled=20, num_val=1, image_size=24)
    generate_dataset(small, tmp_path / "small")
    generate_dataset(large, tmp_path / "large")
    for sub in ("images", "masks"):
        got = (tmp_path / "small" / sub / "gen-000005.png").read_bytes()
        assert got == (tmp_path / "large" / sub / "gen-000005.png").read_bytes()


def test_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        generate_dataset(SMALL, tmp_path)
