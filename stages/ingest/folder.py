"""The plain image-folder source: ``images/`` + optional ``masks/`` (matched by file stem) +
optional ``splits/{labeled,unlabeled,val}.txt``.

Without split files, images that have a mask are divided between ``labeled`` and ``val`` by a
stable hash of their stem (``val_fraction``), and images without a mask are ``unlabeled``.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass

import fsspec

from stages.core.constants import SPLITS
from stages.core.errors import SourceError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png",)


@dataclass(frozen=True)
class SourceItem:
    """One image to ingest: where it is and which split it belongs to."""

    stem: str
    split: str
    image_url: str
    mask_url: str | None


def _by_stem(fs: fsspec.AbstractFileSystem, folder: str, suffixes: tuple[str, ...]) -> dict:
    found: dict[str, str] = {}
    for path in sorted(fs.ls(folder, detail=False)):
        name = posixpath.basename(path)
        stem, dot, suffix = name.rpartition(".")
        if dot and f".{suffix.lower()}" in suffixes:
            if stem in found:
                raise SourceError(f"{folder}: two files share the stem {stem!r}")
            found[stem] = path
    return found


def _read_splits(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, str] | None:
    folder = posixpath.join(root, "splits")
    if not fs.isdir(folder):
        return None
    assignment: dict[str, str] = {}
    for split in SPLITS:
        path = posixpath.join(folder, f"{split}.txt")
        if not fs.exists(path):
            continue
        with fs.open(path, "r") as handle:
            for line in handle:
                stem = line.strip()
                if stem and assignment.setdefault(stem, split) != split:
                    raise SourceError(f"{path}: {stem!r} is already listed in another split")
    return assignment


def _check_listed_masks(splits: dict[str, str], masks: dict[str, str], root: str) -> None:
    """A labeled or val image listed without a mask would train on (or be scored against) an
    all-ignore mask: refuse it before any work, naming the images."""
    for split in ("labeled", "val"):
        missing = sorted(s for s, listed in splits.items() if listed == split and s not in masks)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise SourceError(
                f"{len(missing)} {split} images ({', '.join(missing[:5])}{more}) have no mask "
                f"{root}/masks/<stem>.png: add their masks, or list them in splits/unlabeled.txt"
            )


def _hash_split(stem: str, val_fraction: float) -> str:
    bucket = int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], "big") / 2**64
    return "val" if bucket < val_fraction else "labeled"


def listing_digest(url: str, items: list[SourceItem]) -> str:
    """sha256 over each item's stem, split, files and their size and version (ETag on object
    stores, modification time locally): one listing of the folder, no file is read."""
    fs, root = fsspec.core.url_to_fs(url)
    infos = {fs._strip_protocol(path): info for path, info in fs.find(root, detail=True).items()}
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.stem):
        parts = [item.stem, item.split]
        for file_url in (item.image_url, item.mask_url):
            if file_url is None:
                parts.append("-")
                continue
            path = fs._strip_protocol(file_url)
            info = infos.get(path)
            if info is None:
                raise SourceError(f"{file_url} disappeared while the source was being listed")
            version = info.get("ETag") or info.get("mtime") or info.get("LastModified")
            parts += [posixpath.relpath(path, fs._strip_protocol(root)), str(info["size"])]
            parts.append(str(version))
        digest.update(("\t".join(parts) + "\n").encode())
    return digest.hexdigest()


def enumerate_folder(url: str, *, val_fraction: float = 0.2) -> list[SourceItem]:
    """List the items of an image folder, checking the layout before any work is started."""
    fs, root = fsspec.core.url_to_fs(url)
    images_dir = posixpath.join(root, "images")
    if not fs.isdir(root):
        raise SourceError(f"data folder {url!r} does not exist")
    if not fs.isdir(images_dir):
        raise SourceError(
            f"data folder {url!r} has no images/ subfolder (expected images/*.png|jpg)"
        )
    images = _by_stem(fs, images_dir, IMAGE_SUFFIXES)
    if not images:
        raise SourceError(f"{images_dir}: no .png/.jpg/.jpeg images")
    masks_dir = posixpath.join(root, "masks")
    masks = _by_stem(fs, masks_dir, MASK_SUFFIXES) if fs.isdir(masks_dir) else {}
    splits = _read_splits(fs, root)
    if splits is not None:
        missing = sorted(set(splits) - set(images))
        if missing:
            raise SourceError(f"split lists name images that do not exist: {missing[:5]}")
        _check_listed_masks(splits, masks, root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in {"file", "local"} else f"{protocol}://"
    items = []
    for stem, path in images.items():
        if splits is not None:
            split = splits.get(stem)
            if split is None:
                continue
        else:
            split = _hash_split(stem, val_fraction) if stem in masks else "unlabeled"
        mask = masks.get(stem)
        items.append(SourceItem(stem, split, prefix + path, prefix + mask if mask else None))
    logger.info("folder %s: %d images, %d masks", url, len(items), len(masks))
    return items
