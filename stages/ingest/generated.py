"""Generated default dataset: procedural shapes on textured backgrounds, with exact masks.

Each image is a smooth colour gradient overlaid with a random texture (stripes, checker or
smoothed-noise blotches), on which 1..``max_objects`` filled shapes are painted; later shapes
cover earlier ones in the image and in the mask alike. Every colour, background or object, is
drawn from one distribution shared by all classes, so a pixel's colour says nothing about its
class: the class is the shape (disc, square, triangle, ring). Additive Gaussian noise comes last.
``colour_bias`` > 0 mixes each class's own colour (``CLASS_COLOURS``) into its objects' colours,
making colour a partial cue (the benchmark's dataset: shapes alone are more than a network from
random weights learns in a CPU budget); every random draw stays the same, so the shapes and
masks do not change with it.

Image ``i`` depends only on ``(seed, i)``: it is drawn from ``np.random.default_rng([seed, i])``,
so growing a split never changes images already generated. The dataset is written in the
"image folder" layout the ingest stage reads::

    <out_dir>/images/<stem>.png     RGB uint8
    <out_dir>/masks/<stem>.png      mode "L", class index per pixel (0 = background)
    <out_dir>/splits/<split>.txt    one stem per line, sorted (labeled, unlabeled, val)
    <out_dir>/classes.txt           class names in index order
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy.ndimage import gaussian_filter

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float32]
BoolArray = NDArray[np.bool_]
ShapeFn = Callable[[np.random.Generator, FloatArray, FloatArray, float], BoolArray]

CLASS_NAMES: tuple[str, ...] = ("background", "disc", "square", "triangle", "ring")
# Each class's own colour, mixed into its objects' colours with weight ``colour_bias``.
CLASS_COLOURS = np.array(
    [[0, 0, 0], [230, 40, 40], [40, 200, 40], [40, 80, 230], [230, 200, 30]], np.float32
)
MIN_NUM_CLASSES = 4  # background + at least three shapes
MIN_IMAGE_SIZE = 16  # below this the smallest shapes may cover no pixel centre
STEM_PREFIX = "gen-"

SIZE_RANGE = (0.2, 0.5)  # object extent, as a fraction of the image side
CENTRE_MARGIN = 0.1  # object centres keep this fraction of the side away from the border
MIN_CONTRAST = 60.0  # wanted RGB distance between an object and the background under it
COLOUR_TRIES = 8  # candidate colours drawn per object; the first with enough contrast wins
TEXTURE_ALPHA = (0.25, 0.6)  # weight of the texture colour in the background
OBJECT_SHADING = 30.0  # max brightness change across an object (light linear shading)


@dataclass(frozen=True)
class GeneratedSpec:
    """What to generate; image ``i`` depends only on ``seed``, ``i`` and the rendering fields.

    ``num_classes`` counts the background: a value ``k`` uses the first ``k`` of
    ``CLASS_NAMES``. ``noise_std`` is in 0..255 units. ``colour_bias`` in [0, 1] is the weight of
    the class's own colour in each object's colour (0: colour carries no class information).
    """

    seed: int = 0
    num_labeled: int = 24
    num_unlabeled: int = 400
    num_val: int = 64
    image_size: int = 64
    num_classes: int = 5
    max_objects: int = 4
    noise_std: float = 8.0
    colour_bias: float = 0.0

    def __post_init__(self) -> None:
        errors = _spec_errors(self)
        if errors:
            raise ValueError("invalid GeneratedSpec: " + "; ".join(errors))

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of images per split, in index order (labeled, unlabeled, val)."""
        return {"labeled": self.num_labeled, "unlabeled": self.num_unlabeled, "val": self.num_val}


def _spec_errors(spec: GeneratedSpec) -> list[str]:
    """All problems with ``spec``, so they can be reported together."""
    sizes = spec.split_sizes.items()
    errors = [f"num_{split} must be >= 0, got {n}" for split, n in sizes if n < 0]
    if spec.seed < 0:
        errors.append(f"seed must be >= 0, got {spec.seed}")
    if spec.image_size < MIN_IMAGE_SIZE:
        errors.append(f"image_size must be >= {MIN_IMAGE_SIZE}, got {spec.image_size}")
    if not MIN_NUM_CLASSES <= spec.num_classes <= len(CLASS_NAMES):
        errors.append(
            f"num_classes must be in {MIN_NUM_CLASSES}..{len(CLASS_NAMES)} "
            f"(classes: {', '.join(CLASS_NAMES)}), got {spec.num_classes}"
        )
    if spec.max_objects < 1:
        errors.append(f"max_objects must be >= 1, got {spec.max_objects}")
    if not spec.noise_std >= 0:
        errors.append(f"noise_std must be >= 0, got {spec.noise_std}")
    if not 0 <= spec.colour_bias <= 1:
        errors.append(f"colour_bias must be in [0, 1], got {spec.colour_bias}")
    return errors


def stem(index: int) -> str:
    """File stem of image ``index``, e.g. ``gen-000017``."""
    return f"{STEM_PREFIX}{index:06d}"


def split_indices(spec: GeneratedSpec) -> dict[str, range]:
    """Image indices per split: labeled ``0..L-1``, unlabeled ``L..L+U-1``, then val."""
    out: dict[str, range] = {}
    start = 0
    for split, n in spec.split_sizes.items():
        out[split] = range(start, start + n)
        start += n
    return out


# --- rendering --------------------------------------------------------------------------------


def render_image(spec: GeneratedSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Render image ``index`` of the dataset described by ``spec``.

    Returns ``(image, mask)``: ``image`` uint8[H, W, 3] RGB and ``mask`` uint8[H, W] with class
    indices in ``[0, spec.num_classes)``, ``H = W = spec.image_size``. At least one object
    pixel is present. Deterministic in ``(spec, index)``.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([spec.seed, index])
    yy, xx = _grid(spec.image_size)
    image = _background(rng, yy, xx)
    mask = np.zeros(yy.shape, dtype=np.uint8)
    for _ in range(_num_objects(rng, spec.max_objects)):
        _paint_object(rng, spec, image, mask, (yy, xx))
    image += rng.normal(0.0, spec.noise_std, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _num_objects(rng: np.random.Generator, max_objects: int) -> int:
    """Uniform in ``ceil(max_objects / 2)..max_objects``: enough object pixels per image."""
    return int(rng.integers((max_objects + 1) // 2, max_objects + 1))


def _grid(side: int) -> tuple[FloatArray, FloatArray]:
    """Pixel-centre coordinates ``(yy, xx)``, each float32[side, side], in ``[0.5, side)``."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + np.float32(0.5)
    return yy, xx


def _colours(rng: np.random.Generator, n: int) -> FloatArray:
    """``n`` colours from the one distribution shared by backgrounds and all classes.

    Returns float32[n, 3], uniform in the RGB cube ``[0, 255]^3``.
    """
    return rng.uniform(0.0, 255.0, size=(n, 3)).astype(np.float32)


def _rotate(
    rng: np.random.Generator, dx: FloatArray, dy: FloatArray, period: float = 2 * math.pi
) -> tuple[FloatArray, FloatArray]:
    """Offsets ``(dx, dy)`` (float32[H, W]) in a frame rotated by a random angle in [0, period)."""
    theta = rng.uniform(0.0, period)
    c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
    return c * dx + s * dy, c * dy - s * dx


def _background(rng: np.random.Generator, yy: FloatArray, xx: FloatArray) -> FloatArray:
    """Gradient between two random colours, blended with a textured third colour.

    ``yy, xx``: float32[H, W] pixel centres. Returns float32[H, W, 3] in ``[0, 255]``.
    """
    start, end, tint = _colours(rng, 3)
    centre = np.float32(yy.shape[0] / 2)
    u, _ = _rotate(rng, xx - centre, yy - centre)
    ramp = ((u - u.min()) / max(float(u.max() - u.min()), 1e-6))[..., None]
    base = start * (1 - ramp) + end * ramp
    weight = (np.float32(rng.uniform(*TEXTURE_ALPHA)) * _texture(rng, yy, xx))[..., None]
    return (base * (1 - weight) + tint * weight).astype(np.float32)


def _texture(rng: np.random.Generator, yy: FloatArray, xx: FloatArray) -> FloatArray:
    """One random texture of random scale and orientation: float32[H, W] in ``[0, 1]``."""
    kind = int(rng.integers(3))
    side = yy.shape[0]
    u, v = _rotate(rng, xx, yy)
    if kind == 0:  # sinusoidal stripes
        period = rng.uniform(4.0, side / 2)
        return (0.5 + 0.5 * np.sin(u * np.float32(2 * math.pi / period))).astype(np.float32)
    if kind == 1:  # checker
        cell = np.float32(rng.uniform(4.0, side / 3))
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    noise = gaussian_filter(rng.standard_normal(yy.shape), sigma=rng.uniform(1.5, side / 8))
    return ((noise - noise.min()) / max(float(noise.max() - noise.min()), 1e-6)).astype(np.float32)


def _paint_object(
    rng: np.random.Generator,
    spec: GeneratedSpec,
    image: FloatArray,
    mask: NDArray[np.uint8],
    grid: tuple[FloatArray, FloatArray],
) -> None:
    """Paint one random object into ``image`` (float32[H, W, 3]) and ``mask`` (uint8[H, W]).

    The centre lies on a pixel centre inside the image, so the object covers at least one
    pixel; the object may be cut by the border and covers whatever was painted before.
    """
    side = spec.image_size
    cls = int(rng.integers(1, spec.num_classes))
    size = float(rng.uniform(*SIZE_RANGE)) * side
    margin = int(CENTRE_MARGIN * side)
    cy, cx = rng.integers(margin, side - margin, size=2) + 0.5
    dy, dx = grid[0] - np.float32(cy), grid[1] - np.float32(cx)
    inside = SHAPES[CLASS_NAMES[cls]](rng, dx, dy, size)
    colour = _object_colour(rng, image[inside])
    if spec.colour_bias:  # after every draw of the unbiased image: same shapes, same rng stream
        colour = (1 - spec.colour_bias) * colour + spec.colour_bias * CLASS_COLOURS[cls]
    shade_axis, _ = _rotate(rng, dx, dy)
    shading = np.float32(rng.uniform(-OBJECT_SHADING, OBJECT_SHADING) / size) * shade_axis
    image[inside] = colour + shading[inside][:, None]
    mask[inside] = cls


def _object_colour(rng: np.random.Generator, under: FloatArray) -> FloatArray:
    """A colour from the shared distribution that stands out from ``under`` (float32[N, 3]).

    The first of ``COLOUR_TRIES`` candidates at least ``MIN_CONTRAST`` away from the mean of
    ``under`` wins (else the farthest). The rule ignores the class, so colour stays
    uninformative about it. Returns float32[3].
    """
    candidates = _colours(rng, COLOUR_TRIES)
    distance = np.linalg.norm(candidates - under.mean(axis=0), axis=1)
    good = np.flatnonzero(distance >= MIN_CONTRAST)
    return candidates[good[0] if good.size else int(np.argmax(distance))]


def _disc(rng: np.random.Generator, dx: FloatArray, dy: FloatArray, size: float) -> BoolArray:
    """Filled disc of diameter ``size``; ``dx, dy``: float32[H, W] offsets from the centre."""
    return np.asarray(dx**2 + dy**2 <= (size / 2) ** 2)


def _square(rng: np.random.Generator, dx: FloatArray, dy: FloatArray, size: float) -> BoolArray:
    """Filled square of side ``0.9 * size`` at a random rotation."""
    u, v = _rotate(rng, dx, dy, period=math.pi / 2)
    return np.asarray(np.maximum(np.abs(u), np.abs(v)) <= 0.45 * size)


def _triangle(rng: np.random.Generator, dx: FloatArray, dy: FloatArray, size: float) -> BoolArray:
    """Filled equilateral triangle of circumradius ``0.7 * size`` at a random rotation.

    A point is inside when its projection on each of the three edge normals is at most the
    inradius (half the circumradius).
    """
    normals = rng.uniform(0.0, 2 * math.pi / 3) + np.arange(3) * (2 * math.pi / 3)
    proj = dx[..., None] * np.cos(normals) + dy[..., None] * np.sin(normals)
    return np.asarray(proj.max(axis=-1) <= 0.35 * size)


def _ring(rng: np.random.Generator, dx: FloatArray, dy: FloatArray, size: float) -> BoolArray:
    """Annulus of outer diameter ``1.1 * size`` and inner radius 45–65 % of the outer one."""
    r2 = dx**2 + dy**2
    outer = 0.55 * size
    inner = outer * rng.uniform(0.45, 0.65)
    return np.asarray((r2 <= outer**2) & (r2 >= inner**2))


SHAPES: dict[str, ShapeFn] = {
    "disc": _disc,
    "square": _square,
    "triangle": _triangle,
    "ring": _ring,
}
assert set(SHAPES) == set(CLASS_NAMES[1:])


# --- writing ----------------------------------------------------------------------------------


def generate_dataset(spec: GeneratedSpec, out_dir: str | Path) -> dict[str, list[str]]:
    """Render every image of ``spec`` and write it to ``out_dir`` in the image-folder layout.

    ``out_dir`` must be missing or empty, so no stale file from another spec can mix in.
    Returns split name -> sorted stems written (labeled, unlabeled, val).
    """
    root = Path(out_dir)
    _prepare(root)
    start = time.perf_counter()
    written: dict[str, list[str]] = {}
    for split, indices in split_indices(spec).items():
        written[split] = sorted(_write_pair(spec, index, root) for index in indices)
        _write_lines(root / "splits" / f"{split}.txt", written[split])
    _write_lines(root / "classes.txt", CLASS_NAMES[: spec.num_classes])
    total = sum(len(stems) for stems in written.values())
    logger.info("generated %d images in %.2fs at %s", total, time.perf_counter() - start, root)
    return written


def _prepare(root: Path) -> None:
    """Create ``root`` and its sub-folders; refuse a non-empty existing ``root``."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty directory; choose a new one")
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)


def _write_pair(spec: GeneratedSpec, index: int, root: Path) -> str:
    """Render image ``index`` and save ``images/<stem>.png`` and ``masks/<stem>.png``."""
    name = stem(index)
    image, mask = render_image(spec, index)
    Image.fromarray(image).save(root / "images" / f"{name}.png", format="PNG")
    Image.fromarray(mask).save(root / "masks" / f"{name}.png", format="PNG")
    return name


def _write_lines(path: Path, lines: list[str] | tuple[str, ...]) -> None:
    """Write one entry per line, newline-terminated (an empty file for no entries)."""
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
