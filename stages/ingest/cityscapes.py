"""Cityscapes: ``data.root`` holds the fine annotations as the official packages unpack::

    leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png     mode L: 0..18, 255 = ignore

with ``<split>`` train (2975 images), val (500) or test, and ``<stem>`` = ``<city>_<seq>_<frame>``.
Only the ``*_labelTrainIds`` masks are read: the 19 train classes, every other label already
mapped to 255 (ignore). cityscapesscripts' ``createTrainIdLabelImgs`` writes them from the
``*_labelIds`` masks of the download.

``labeled`` (default ``train``) and ``val`` (default ``val``) are a split folder name or a ``.txt``
list relative to the root, in either format of ``stages.ingest.lists`` (UniMatch lines are
``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png gtFine/...``). Without an
``unlabeled`` setting the unlabeled split is the rest of the train split.

Semi-supervised protocol: an unlabeled image gets no mask, even when gtFine has one (unless
``data.cityscapes.unlabeled_masks``, for benchmarks), so no ground
truth reaches training through it.
"""

from __future__ import annotations

import logging
import posixpath

import fsspec

from stages.core.constants import SPLITS
from stages.core.errors import SourceError
from stages.ingest.folder import SourceItem
from stages.ingest.lists import (
    check_disjoint,
    file_stem,
    is_list_file,
    read_list,
    shown,
    url_prefix,
)

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
IMAGES = "leftImg8bit"
MASKS = "gtFine"
IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
CONVERT = "pip install cityscapesscripts; CITYSCAPES_DATASET=<root> csCreateTrainIdLabelImgs"

Index = dict[str, tuple[str, str]]  # stem -> (split folder, path)


def enumerate_cityscapes(
    url: str,
    *,
    labeled: str = "train",
    unlabeled: str | None = None,
    val: str = "val",
    unlabeled_masks: bool = False,
) -> list[SourceItem]:
    """List the items of a Cityscapes folder, checking splits, images and masks before any work.
    ``unlabeled_masks``: unlabeled images keep their masks where gtFine has them."""
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise SourceError(f"Cityscapes folder {url!r} does not exist")
    for folder in (posixpath.join(root, IMAGES), posixpath.join(root, MASKS)):
        if not fs.isdir(folder):
            raise SourceError(
                f"Cityscapes folder {url!r} has no {folder}/: data.root must hold "
                f"{IMAGES}/<split>/<city>/ and {MASKS}/<split>/<city>/"
            )
    images = _index(fs, posixpath.join(root, IMAGES), IMAGE_SUFFIX)
    splits = _read_splits(fs, root, images, labeled, unlabeled, val)
    masks = _index(fs, posixpath.join(root, MASKS), TRAIN_IDS_SUFFIX)
    for split in ("labeled", "val"):
        _check_masks(fs, root, split, set(splits[split]) - set(masks))
    if not splits["unlabeled"]:
        logger.warning("Cityscapes %s: the unlabeled split is empty", url)
    prefix = url_prefix(fs)
    items = []
    for split in SPLITS:
        for stem in sorted(splits[split]):
            # an unlabeled image has no mask (see the docstring) unless unlabeled_masks
            shown_mask = split != "unlabeled" or (unlabeled_masks and stem in masks)
            mask = prefix + masks[stem][1] if shown_mask else None
            items.append(SourceItem(stem, split, prefix + images[stem][1], mask))
    logger.info("Cityscapes %s: %s", url, {split: len(splits[split]) for split in SPLITS})
    return items


def _index(fs: fsspec.AbstractFileSystem, folder: str, suffix: str) -> Index:
    """Files ``<folder>/<split>/<city>/<stem><suffix>`` by stem."""
    found: Index = {}
    for path in sorted(fs.find(folder)):
        parts = posixpath.relpath(path, folder).split("/")
        if len(parts) == 3 and parts[2].endswith(suffix):
            found.setdefault(parts[2][: -len(suffix)], (parts[0], path))
    return found


def _stem(token: str) -> str:
    """A list entry (a stem, or a path to a ``*_leftImg8bit.png``) -> its stem."""
    return file_stem(token).removesuffix(IMAGE_SUFFIX[: -len(".png")])


def _read_splits(
    fs: fsspec.AbstractFileSystem,
    root: str,
    images: Index,
    labeled: str,
    unlabeled: str | None,
    val: str,
) -> dict[str, list[str]]:
    splits, origins = {}, {}
    for split, value in (("labeled", labeled), ("unlabeled", unlabeled), ("val", val)):
        if value is not None:
            origins[split], splits[split] = _stems_of(fs, root, images, split, value)
    if unlabeled is None:
        path, pool = _stems_of(fs, root, images, "unlabeled", "train")
        taken = set(splits["labeled"])
        splits["unlabeled"] = [stem for stem in pool if stem not in taken]
        origins["unlabeled"] = f"{path} less the labeled images"
    check_disjoint(splits, origins)
    return splits


def _stems_of(
    fs: fsspec.AbstractFileSystem, root: str, images: Index, setting: str, value: str
) -> tuple[str, list[str]]:
    """Where a split setting points, and the stems of its images."""
    folders = sorted({split for split, _ in images.values()})
    if not is_list_file(value):
        stems = sorted(stem for stem, (split, _) in images.items() if split == value)
        if not stems:
            raise SourceError(
                f"data.cityscapes.{setting}={value!r}: {root}/{IMAGES}/{value}/ holds no "
                f"*{IMAGE_SUFFIX}; choose one of {', '.join(folders) or 'none there'} or give a "
                ".txt list relative to data.root"
            )
        return f"{IMAGES}/{value}/", stems
    path = posixpath.join(root, value)
    if not fs.isfile(path):
        raise SourceError(
            f"data.cityscapes.{setting}={value!r}: {path} does not exist; give a split folder of "
            f"{IMAGES}/ ({', '.join(folders)}) or a .txt list relative to data.root"
        )
    stems = read_list(fs, path, _stem)
    missing = set(stems) - set(images)
    if missing:
        raise SourceError(
            f"{path} names {shown(missing)} images that have no "
            f"{root}/{IMAGES}/<split>/<city>/<stem>{IMAGE_SUFFIX}"
        )
    return path, stems


def _check_masks(fs: fsspec.AbstractFileSystem, root: str, split: str, missing: set[str]) -> None:
    if not missing:
        return
    label_ids = set(_index(fs, posixpath.join(root, MASKS), LABEL_IDS_SUFFIX))
    if missing & label_ids:
        raise SourceError(
            f"{shown(missing & label_ids)} {split} images have *{LABEL_IDS_SUFFIX} but no "
            f"*{TRAIN_IDS_SUFFIX} in {root}/{MASKS}/: make them with cityscapesscripts' "
            f"createTrainIdLabelImgs ({CONVERT.replace('<root>', root)})"
        )
    raise SourceError(
        f"{shown(missing)} {split} images have no mask "
        f"{root}/{MASKS}/<split>/<city>/<stem>{TRAIN_IDS_SUFFIX}"
    )
