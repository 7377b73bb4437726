"""Pascal VOC 2012: ``data.root`` is the ``VOC2012`` folder of VOCdevkit::

    JPEGImages/<stem>.jpg
    SegmentationClass/<stem>.png          palette PNG: pixel = class index, 255 = ignore (borders)
    SegmentationClassAug/<stem>.png       optional, SBD + VOC masks (mode L, the same indices)
    ImageSets/Segmentation/<name>.txt     train (1464), val (1449), trainval; trainaug if added

Each split is a list: a name under ImageSets/Segmentation (``train``) or a ``.txt`` path relative to
the root (``splits/pascal/92/labeled.txt``), in either format of ``stages.ingest.lists``. Without an
``unlabeled`` list the unlabeled split is the ``unlabeled_from`` list less the labeled images: the
92 / 183 / 366 / 732 / 1464 labeled subsets of the semi-supervised literature with the rest of
``train`` (or of ``trainaug``) unlabeled.

Semi-supervised protocol: an unlabeled image gets no mask, even when the dataset has one (unless
``data.voc.unlabeled_masks``, for benchmarks: pseudo-label precision, ground-truth rows), so no
ground truth reaches training through it. Labeled masks come from SegmentationClass, or from
SegmentationClassAug when ``augmented``; val is always scored against SegmentationClass, the
official ground truth.
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
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
IMAGES = "JPEGImages"
MASKS = "SegmentationClass"
AUG_MASKS = "SegmentationClassAug"
LISTS = "ImageSets/Segmentation"


def enumerate_voc(
    url: str,
    *,
    labeled: str = "train",
    unlabeled: str | None = None,
    unlabeled_from: str = "train",
    val: str = "val",
    augmented: bool = False,
    unlabeled_masks: bool = False,
) -> list[SourceItem]:
    """List the items of a VOC 2012 folder, checking lists, images and masks before any work.
    ``unlabeled_masks``: unlabeled images keep their masks where the mask folder has them."""
    fs, root = fsspec.core.url_to_fs(url)
    _check_layout(fs, root, url, augmented)
    splits = _read_splits(fs, root, labeled, unlabeled, unlabeled_from, val)
    mask_dirs = {"labeled": AUG_MASKS if augmented else MASKS, "val": MASKS}
    _check_masks(fs, root, splits, mask_dirs)
    if not splits["unlabeled"]:
        logger.warning("VOC %s: the unlabeled split is empty (set data.voc.unlabeled)", url)
    prefix = url_prefix(fs)
    truth = mask_dirs["labeled"]  # where an unlabeled image's mask is looked for
    kept = _stems(fs, posixpath.join(root, truth), ".png") if unlabeled_masks else set()
    items = []
    for split in SPLITS:
        folder = mask_dirs.get(split)  # none for unlabeled images: see the module docstring
        for stem in sorted(splits[split]):
            image = prefix + posixpath.join(root, IMAGES, f"{stem}.jpg")
            if folder is None and stem in kept:
                folder_of_stem: str | None = truth
            else:
                folder_of_stem = folder
            mask = (
                prefix + posixpath.join(root, folder_of_stem, f"{stem}.png")
                if folder_of_stem
                else None
            )
            items.append(SourceItem(stem, split, image, mask))
    logger.info("VOC %s: %s", url, {split: len(splits[split]) for split in SPLITS})
    return items


def _read_splits(
    fs: fsspec.AbstractFileSystem,
    root: str,
    labeled: str,
    unlabeled: str | None,
    unlabeled_from: str,
    val: str,
) -> dict[str, list[str]]:
    splits, origins = {}, {}
    for split, value in (("labeled", labeled), ("unlabeled", unlabeled), ("val", val)):
        if value is not None:
            origins[split], splits[split] = _read(fs, root, split, value)
    if unlabeled is None:
        path, pool = _read(fs, root, "unlabeled_from", unlabeled_from)
        taken = set(splits["labeled"])
        splits["unlabeled"] = [stem for stem in pool if stem not in taken]
        origins["unlabeled"] = f"{path} less the labeled images"
    check_disjoint(splits, origins)
    images = _stems(fs, posixpath.join(root, IMAGES), ".jpg")
    for split in SPLITS:
        missing = set(splits[split]) - images
        if missing:
            raise SourceError(
                f"{origins[split]} names {shown(missing)} images that have no "
                f"{root}/{IMAGES}/<stem>.jpg"
            )
    return splits


def _check_masks(
    fs: fsspec.AbstractFileSystem,
    root: str,
    splits: dict[str, list[str]],
    mask_dirs: dict[str, str],
) -> None:
    for split, folder in mask_dirs.items():
        missing = set(splits[split]) - _stems(fs, posixpath.join(root, folder), ".png")
        if not missing:
            continue
        hint = ""
        if folder == MASKS and split == "labeled" and fs.isdir(posixpath.join(root, AUG_MASKS)):
            hint = f"; to take labeled masks from {AUG_MASKS}/, set data.voc.augmented: true"
        raise SourceError(
            f"{shown(missing)} {split} images have no mask {root}/{folder}/<stem>.png{hint}"
        )


def _check_layout(fs: fsspec.AbstractFileSystem, root: str, url: str, augmented: bool) -> None:
    if not fs.isdir(root):
        raise SourceError(f"VOC folder {url!r} does not exist")
    wanted = [IMAGES, MASKS] + ([AUG_MASKS] if augmented else [])
    missing = [name for name in wanted if not fs.isdir(posixpath.join(root, name))]
    if not missing:
        return
    nested = posixpath.join(root, "VOCdevkit", "VOC2012")
    hint = f"; did you mean {nested}?" if fs.isdir(nested) else ""
    raise SourceError(
        f"VOC folder {url!r} has no {', '.join(f'{m}/' for m in missing)}: data.root must be "
        f"the VOC2012 folder, holding {', '.join(f'{w}/' for w in wanted)} and {LISTS}/{hint}"
    )


def _read(
    fs: fsspec.AbstractFileSystem, root: str, setting: str, value: str
) -> tuple[str, list[str]]:
    """The path of the list a split setting names, and its stems."""
    lists = posixpath.join(root, LISTS)
    path = posixpath.join(root, value) if is_list_file(value) else f"{lists}/{value}.txt"
    if not fs.isfile(path):
        found = fs.ls(lists, detail=False) if fs.isdir(lists) else []
        names = sorted(file_stem(p) for p in found if p.endswith(".txt"))
        raise SourceError(
            f"data.voc.{setting}={value!r}: {path} does not exist; give a list name under "
            f"{LISTS} ({', '.join(names) or 'none there'}) or a .txt path relative to data.root"
        )
    return path, read_list(fs, path)


def _stems(fs: fsspec.AbstractFileSystem, folder: str, suffix: str) -> set[str]:
    names = (posixpath.basename(path) for path in fs.ls(folder, detail=False))
    return {name[: -len(suffix)] for name in names if name.endswith(suffix)}
