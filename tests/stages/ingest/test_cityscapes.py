"""The Cityscapes source on a tiny leftImg8bit + gtFine tree: split folders and lists in both
formats, *_labelTrainIds read as the 19 train classes with 255 kept, and the errors."""

from __future__ import annotations

import secrets
import shutil
from dataclasses import asdict
from pathlib import Path

import fsspec
import numpy as np
import pytest

from stages.core import codec
from stages.core.errors import SourceError
from stages.ingest.cityscapes import CLASS_NAMES, enumerate_cityscapes
from stages.ingest.folder import listing_digest
from stages.ingest.stage import load_item
from tests.stages.ingest.layouts import (
    CITY_TEST,
    CITY_TRAIN,
    CITY_VAL,
    IGNORE,
    PERSON_CITYSCAPES,
    by_split,
    city_mask,
    city_split,
    expected_id,
    write_cityscapes,
    write_list,
)

NUM_CLASSES = 19


def _image(root: Path, stem: str) -> Path:
    city = stem.split("_")[0]
    return root / "leftImg8bit" / city_split(stem) / city / f"{stem}_leftImg8bit.png"


def test_unimatch_list_and_rest_of_train_unlabeled(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cityscapes")
    stem = CITY_TRAIN[0]
    line = (
        f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png "
        f"gtFine/train/aachen/{stem}_gtFine_labelTrainIds.png"
    )
    labeled = write_list(root, "splits/cityscapes/1_3/labeled.txt", [line])
    items = enumerate_cityscapes(str(root), labeled=labeled)
    assert by_split(items) == {
        "labeled": [stem],
        "unlabeled": sorted(CITY_TRAIN[1:]),
        "val": list(CITY_VAL),
    }
    masks = {i.stem: i.mask_url for i in items}
    assert masks[stem] == f"{root}/gtFine/train/aachen/{stem}_gtFine_labelTrainIds.png"
    assert masks[CITY_VAL[0]] == (
        f"{root}/gtFine/val/frankfurt/{CITY_VAL[0]}_gtFine_labelTrainIds.png"
    )
    assert masks[CITY_TRAIN[1]] is None  # gtFine has it: unlabeled images get none
    kept = {
        i.stem: i.mask_url
        for i in enumerate_cityscapes(str(root), labeled=labeled, unlabeled_masks=True)
    }  # a benchmark keeps them (data.cityscapes.unlabeled_masks)
    for unlabeled in CITY_TRAIN[1:]:
        city = unlabeled.split("_")[0]
        assert kept[unlabeled] == (
            f"{root}/gtFine/train/{city}/{unlabeled}_gtFine_labelTrainIds.png"
        )
    assert {k: kept[k] for k in masks if k not in CITY_TRAIN[1:]} == {
        k: v for k, v in masks.items() if k not in CITY_TRAIN[1:]
    }

    rows = {i.stem: load_item(asdict(i), NUM_CLASSES) for i in items}
    assert all(row["error"] is None for row in rows.values())
    assert {s: r["image_id"] for s, r in rows.items()} == {
        s: expected_id(_image(root, s)) for s in (*CITY_TRAIN, *CITY_VAL)
    }
    mask = codec.decode_png(rows[stem]["mask"])
    assert np.array_equal(mask, city_mask(stem))
    assert mask[2, 2] == PERSON_CITYSCAPES
    assert CLASS_NAMES[PERSON_CITYSCAPES] == "person"
    assert (mask[0] == IGNORE).all()
    assert (mask[5] == 0).all()


def test_split_folders_and_a_plain_unlabeled_list(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cityscapes")
    unlabeled = write_list(root, "extra.txt", [CITY_TEST[0], ""])
    items = enumerate_cityscapes(str(root), labeled="train", unlabeled=unlabeled, val="val")
    assert by_split(items) == {
        "labeled": sorted(CITY_TRAIN),
        "unlabeled": list(CITY_TEST),
        "val": list(CITY_VAL),
    }
    test_item = next(i for i in items if i.split == "unlabeled")
    assert test_item.image_url == str(_image(root, CITY_TEST[0]))
    assert test_item.mask_url is None


def test_label_ids_only_says_how_to_make_train_ids(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cityscapes", train_ids=False)
    with pytest.raises(SourceError) as error:
        enumerate_cityscapes(str(root))
    message = str(error.value)
    assert "3 (aachen_000000_000019, aachen_000001_000019, bochum_000000_000313)" in message
    assert "have *_gtFine_labelIds.png but no *_gtFine_labelTrainIds.png" in message
    assert f"CITYSCAPES_DATASET={root} csCreateTrainIdLabelImgs" in message


def test_unknown_split_folder_lists_the_folders(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cityscapes")
    with pytest.raises(SourceError, match=r"data\.cityscapes\.labeled='trian'") as error:
        enumerate_cityscapes(str(root), labeled="trian")
    assert "choose one of test, train, val" in str(error.value)


def test_missing_list_and_list_naming_a_missing_image(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cityscapes")
    with pytest.raises(SourceError, match=r"splits/1_4/labeled\.txt does not exist"):
        enumerate_cityscapes(str(root), labeled="splits/1_4/labeled.txt")
    labeled = write_list(root, "l.txt", [CITY_TRAIN[0], "ulm_000099_000019"])
    with pytest.raises(SourceError) as error:
        enumerate_cityscapes(str(root), labeled=labeled)
    assert f"{root}/l.txt names 1 (ulm_000099_000019) images" in str(error.value)


def test_val_image_without_mask_and_missing_folders(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cityscapes")
    with pytest.raises(SourceError, match=r"1 .berlin_000000_000019. val images have no mask"):
        enumerate_cityscapes(str(root), val="test")
    shutil.rmtree(root / "gtFine")
    with pytest.raises(SourceError, match=r"has no .*/cityscapes/gtFine/: data.root must hold"):
        enumerate_cityscapes(str(root))
    with pytest.raises(SourceError, match="does not exist"):
        enumerate_cityscapes(str(tmp_path / "nope"))


def test_cityscapes_on_s3_gives_s3_urls_that_load(s3: str, tmp_path: Path) -> None:
    local = write_cityscapes(tmp_path / "cityscapes")
    url = f"{s3}/cityscapes-{secrets.token_hex(3)}"
    fs, path = fsspec.core.url_to_fs(url)
    fs.put(f"{local}/", f"{path}/", recursive=True)
    items = enumerate_cityscapes(url, labeled="train")
    assert by_split(items) == {
        "labeled": sorted(CITY_TRAIN),
        "unlabeled": [],
        "val": list(CITY_VAL),
    }
    stem = CITY_TRAIN[0]
    assert items[0].image_url == f"{url}/leftImg8bit/train/aachen/{stem}_leftImg8bit.png"
    assert items[0].mask_url == f"{url}/gtFine/train/aachen/{stem}_gtFine_labelTrainIds.png"
    row = load_item(asdict(items[0]), NUM_CLASSES)
    assert row["image_id"] == expected_id(_image(local, stem))
    assert np.array_equal(codec.decode_png(row["mask"]), city_mask(stem))
    assert len(listing_digest(url, items)) == 64
