"""The Pascal VOC 2012 source on a tiny VOC2012 folder: split lists in both formats, palette
masks read as class indices with the 255 border kept, SegmentationClassAug, and the errors."""

from __future__ import annotations

import secrets
from dataclasses import asdict
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from stages.core import codec
from stages.core.errors import SourceError
from stages.ingest.folder import listing_digest
from stages.ingest.stage import load_item
from stages.ingest.voc import CLASS_NAMES, enumerate_voc
from tests.stages.ingest.layouts import (
    IGNORE,
    PERSON_VOC,
    VOC_SBD_ONLY,
    VOC_TRAIN,
    VOC_VAL,
    by_split,
    class_mask,
    expected_id,
    voc_class,
    write_list,
    write_voc,
)

NUM_CLASSES = 21


def test_unimatch_labeled_list_and_rest_of_train_unlabeled(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC2012")
    labeled = write_list(
        root,
        "splits/pascal/2/labeled.txt",
        [f"JPEGImages/{s}.jpg SegmentationClass/{s}.png" for s in VOC_TRAIN[:2]],
    )
    items = enumerate_voc(str(root), labeled=labeled)
    assert by_split(items) == {
        "labeled": sorted(VOC_TRAIN[:2]),
        "unlabeled": sorted(VOC_TRAIN[2:]),
        "val": sorted(VOC_VAL),
    }
    masks = {i.stem: i.mask_url for i in items}
    assert masks[VOC_TRAIN[0]] == f"{root}/SegmentationClass/{VOC_TRAIN[0]}.png"
    assert masks[VOC_VAL[0]] == f"{root}/SegmentationClass/{VOC_VAL[0]}.png"
    # The unlabeled images have masks on disk, and get none.
    assert (root / "SegmentationClass" / f"{VOC_TRAIN[2]}.png").exists()
    assert masks[VOC_TRAIN[2]] is None
    assert masks[VOC_TRAIN[3]] is None

    rows = {i.stem: load_item(asdict(i), NUM_CLASSES) for i in items}
    assert all(row["error"] is None for row in rows.values())
    assert {s: r["image_id"] for s, r in rows.items()} == {
        i.stem: expected_id(root / "JPEGImages" / f"{i.stem}.jpg") for i in items
    }
    assert {r["split"] for r in rows.values()} == {"labeled", "unlabeled", "val"}


def test_palette_mask_gives_class_indices_and_keeps_the_255_border(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC2012")
    person = root / "SegmentationClass" / f"{VOC_TRAIN[0]}.png"
    with Image.open(person) as image:
        assert image.mode == "P"  # as VOC ships them: colours through a palette
        assert image.getpalette()[3 * PERSON_VOC : 3 * PERSON_VOC + 3] == [192, 128, 128]
    item = next(i for i in enumerate_voc(str(root)) if i.stem == VOC_TRAIN[0])
    mask = codec.decode_png(load_item(asdict(item), NUM_CLASSES)["mask"])
    assert np.array_equal(mask, class_mask(PERSON_VOC, border=True))
    assert mask[2, 2] == PERSON_VOC
    assert CLASS_NAMES[PERSON_VOC] == "person"
    assert (mask == IGNORE).sum() == 16  # the border ring: a 4x6 box less its 2x4 inside


def test_plain_lists_and_explicit_unlabeled(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC2012")
    unlabeled = write_list(root, "my/unlabeled.txt", [f"  {VOC_SBD_ONLY}  ", "", VOC_TRAIN[0]])
    with pytest.raises(SourceError, match="in both labeled"):  # train already holds VOC_TRAIN[0]
        enumerate_voc(str(root), unlabeled=unlabeled)
    unlabeled = write_list(root, "my/unlabeled.txt", [VOC_SBD_ONLY, "", VOC_SBD_ONLY])
    items = enumerate_voc(str(root), labeled="train", unlabeled=unlabeled, val="val")
    assert by_split(items) == {
        "labeled": sorted(VOC_TRAIN),
        "unlabeled": [VOC_SBD_ONLY],
        "val": sorted(VOC_VAL),
    }


def test_augmented_takes_labeled_masks_from_segmentation_class_aug(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC2012")
    labeled = write_list(root, "splits/labeled.txt", [VOC_TRAIN[0], VOC_SBD_ONLY])
    with pytest.raises(SourceError, match=r"set data\.voc\.augmented: true") as error:
        enumerate_voc(str(root), labeled=labeled)  # the SBD image has no SegmentationClass mask
    assert VOC_SBD_ONLY in str(error.value)

    items = enumerate_voc(str(root), labeled=labeled, augmented=True)
    assert by_split(items)["labeled"] == [VOC_TRAIN[0], VOC_SBD_ONLY]
    masks = {i.stem: i.mask_url for i in items}
    assert masks[VOC_SBD_ONLY] == f"{root}/SegmentationClassAug/{VOC_SBD_ONLY}.png"
    assert masks[VOC_VAL[0]] == f"{root}/SegmentationClass/{VOC_VAL[0]}.png"  # official truth
    rows = {i.stem: load_item(asdict(i), NUM_CLASSES) for i in items if i.split == "labeled"}
    for stem, row in rows.items():  # SBD masks: mode L, the same indices, no border
        assert np.array_equal(codec.decode_png(row["mask"]), class_mask(voc_class(stem), False))


def test_unlabeled_from_less_labeled(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC2012")
    labeled = write_list(root, "splits/labeled.txt", [VOC_TRAIN[1]])
    with pytest.raises(SourceError, match=r"in both unlabeled .* and val"):
        enumerate_voc(str(root), labeled=labeled, unlabeled_from="trainval")
    items = enumerate_voc(str(root), labeled=labeled, unlabeled_from="train", val="val")
    expected = sorted(set(VOC_TRAIN) - {VOC_TRAIN[1]})
    assert by_split(items)["unlabeled"] == expected


def test_missing_list_names_the_path_and_the_lists_there(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC2012")
    with pytest.raises(SourceError) as error:
        enumerate_voc(str(root), labeled="trainaug")
    message = str(error.value)
    assert f"{root}/ImageSets/Segmentation/trainaug.txt does not exist" in message
    assert "data.voc.labeled='trainaug'" in message
    assert "(train, trainval, val)" in message
    with pytest.raises(SourceError, match=r"splits/pascal/92/labeled\.txt does not exist"):
        enumerate_voc(str(root), labeled="splits/pascal/92/labeled.txt")


def test_list_naming_a_missing_image(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC2012")
    labeled = write_list(root, "splits/labeled.txt", [VOC_TRAIN[0], "2012_999999"])
    with pytest.raises(SourceError) as error:
        enumerate_voc(str(root), labeled=labeled)
    assert f"{root}/splits/labeled.txt names 1 (2012_999999) images" in str(error.value)
    assert f"{root}/JPEGImages/<stem>.jpg" in str(error.value)


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        enumerate_voc(str(tmp_path / "nope"))
    write_voc(tmp_path / "VOCdevkit" / "VOC2012", augmented=False)
    with pytest.raises(SourceError, match=r"did you mean .*VOCdevkit/VOC2012\?"):
        enumerate_voc(str(tmp_path))
    with pytest.raises(SourceError, match="has no SegmentationClassAug/"):
        enumerate_voc(str(tmp_path / "VOCdevkit" / "VOC2012"), augmented=True)


def test_voc_on_s3_gives_s3_urls_that_load(s3: str, tmp_path: Path) -> None:
    local = write_voc(tmp_path / "VOC2012")
    url = f"{s3}/voc-{secrets.token_hex(3)}"
    fs, path = fsspec.core.url_to_fs(url)
    fs.put(f"{local}/", f"{path}/", recursive=True)
    items = enumerate_voc(url)
    assert [i.stem for i in items] == [
        stem for split in (VOC_TRAIN, (), VOC_VAL) for stem in sorted(split)
    ]
    assert items[0].image_url == f"{url}/JPEGImages/{VOC_TRAIN[0]}.jpg"
    assert items[0].mask_url == f"{url}/SegmentationClass/{VOC_TRAIN[0]}.png"
    row = load_item(asdict(items[0]), NUM_CLASSES)
    assert row["image_id"] == expected_id(local / "JPEGImages" / f"{VOC_TRAIN[0]}.jpg")
    assert len(listing_digest(url, items)) == 64
