"""Tiny datasets written in the real layouts (Pascal VOC 2012, Cityscapes), and the image ids
ingest must give them: the pixel digest of each image as ingest decodes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from stages.core import codec
from stages.ingest.folder import SourceItem
from stages.ingest.stage import ID_LENGTH
from tests.conftest import write_png

HEIGHT, WIDTH = 6, 8
PERSON_VOC = 15  # 'person' in VOC's 21 classes
PERSON_CITYSCAPES = 11  # 'person' in Cityscapes' 19 train classes
IGNORE = 255

VOC_TRAIN = ("2007_000032", "2007_000039", "2007_000063", "2007_000068")
VOC_VAL = ("2007_000033", "2007_000042")
VOC_SBD_ONLY = "2008_000002"  # an SBD image: in JPEGImages and SegmentationClassAug only

CITY_TRAIN = ("aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313")
CITY_VAL = ("frankfurt_000000_000294",)
CITY_TEST = ("berlin_000000_000019",)


def voc_palette() -> list[int]:
    """VOC's colour map (index 1 = (128, 0, 0), 15 = (192, 128, 128), 255 = (224, 224, 192))."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def class_mask(cls: int, border: bool) -> np.ndarray:
    """Background with a ``cls`` box; ``border`` rings the box with 255 as VOC's masks do."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    if border:
        mask[1:5, 1:7] = IGNORE
    mask[2:4, 2:6] = cls
    return mask


def write_rgb(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    image.putpalette(voc_palette())
    image.save(path)


def voc_class(stem: str) -> int:
    """The class of ``stem``'s object in the fixture: person for the first train image."""
    stems = (*VOC_TRAIN, *VOC_VAL, VOC_SBD_ONLY)
    return PERSON_VOC if stem == VOC_TRAIN[0] else 1 + stems.index(stem)


def write_voc(root: Path, augmented: bool = True) -> Path:
    """A VOC2012 folder: JPEGs, palette masks with 255 borders for train and val, ImageSets
    lists, and (``augmented``) SegmentationClassAug masks (mode L, no borders, as SBD's are)."""
    stems = (*VOC_TRAIN, *VOC_VAL, VOC_SBD_ONLY)
    for seed, stem in enumerate(stems):
        write_rgb(root / "JPEGImages" / f"{stem}.jpg", seed)
        if stem != VOC_SBD_ONLY:
            write_palette_png(
                root / "SegmentationClass" / f"{stem}.png", class_mask(voc_class(stem), True)
            )
        if augmented:
            write_png(
                root / "SegmentationClassAug" / f"{stem}.png", class_mask(voc_class(stem), False)
            )
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("".join(f"{s}\n" for s in VOC_TRAIN))
    (lists / "val.txt").write_text("".join(f"{s}\n" for s in VOC_VAL))
    (lists / "trainval.txt").write_text("".join(f"{s}\n" for s in (*VOC_TRAIN, *VOC_VAL)))
    return root


def city_split(stem: str) -> str:
    return "train" if stem in CITY_TRAIN else "val" if stem in CITY_VAL else "test"


def city_mask(stem: str) -> np.ndarray:
    """trainIds: road (0) below, a person (11) or a car (13) box, a 255 (ignore) top row."""
    mask = class_mask(PERSON_CITYSCAPES if stem == CITY_TRAIN[0] else 13, False)
    mask[0] = IGNORE
    return mask


def write_cityscapes(root: Path, train_ids: bool = True) -> Path:
    """leftImg8bit PNGs for train/val/test and gtFine masks for train/val: *_labelIds always,
    *_labelTrainIds (mode L) when ``train_ids``."""
    for seed, stem in enumerate((*CITY_TRAIN, *CITY_VAL, *CITY_TEST)):
        split, city = city_split(stem), stem.split("_")[0]
        write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed)
        if split == "test":
            continue
        gt = root / "gtFine" / split / city
        write_png(gt / f"{stem}_gtFine_labelIds.png", np.full((HEIGHT, WIDTH), 24, np.uint8))
        if train_ids:
            write_png(gt / f"{stem}_gtFine_labelTrainIds.png", city_mask(stem))
    return root


def expected_id(path: Path) -> str:
    """The image id ingest gives the picture at ``path`` (JPEG is lossy: digest the decoded
    pixels, as ingest does)."""
    with Image.open(path) as image:
        return codec.pixel_digest(np.asarray(image.convert("RGB")))[:ID_LENGTH]


def by_split(items: list[SourceItem]) -> dict[str, list[str]]:
    """Stems per split, in the order the source listed them."""
    found: dict[str, list[str]] = {"labeled": [], "unlabeled": [], "val": []}
    for item in items:
        found[item.split].append(item.stem)
    return found


def write_list(root: Path, name: str, lines: list[str]) -> str:
    """A split list file ``root/name`` with ``lines``; returns ``name`` (as a config names it)."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return name
