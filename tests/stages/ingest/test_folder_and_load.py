from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.core import codec
from stages.ingest.folder import SourceError, enumerate_folder
from stages.ingest.stage import load_item
from tests.conftest import write_png


def _item(image: Path, mask: Path | None, split: str = "labeled") -> dict:
    return {
        "stem": image.stem,
        "split": split,
        "image_url": str(image),
        "mask_url": str(mask) if mask else None,
    }


def test_folder_with_split_lists(tmp_path: Path) -> None:
    for stem in ("a", "b", "c"):
        write_png(tmp_path / "images" / f"{stem}.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "labeled.txt").write_text("a\n")
    (tmp_path / "splits" / "unlabeled.txt").write_text("b\nc\n")
    items = {i.stem: i for i in enumerate_folder(str(tmp_path))}
    assert {s: i.split for s, i in items.items()} == {
        "a": "labeled",
        "b": "unlabeled",
        "c": "unlabeled",
    }
    assert items["a"].mask_url == str(tmp_path / "masks" / "a.png")
    assert items["b"].mask_url is None


def test_folder_without_splits_masks_decide(tmp_path: Path) -> None:
    for i in range(40):
        write_png(tmp_path / "images" / f"m{i}.png", np.zeros((2, 2, 3), np.uint8))
        write_png(tmp_path / "masks" / f"m{i}.png", np.zeros((2, 2), np.uint8))
    write_png(tmp_path / "images" / "free.jpg", np.zeros((2, 2, 3), np.uint8))
    items = enumerate_folder(str(tmp_path), val_fraction=0.25)
    splits = [i.split for i in items]
    assert splits.count("unlabeled") == 1
    assert 0 < splits.count("val") < splits.count("labeled")
    assert items == enumerate_folder(str(tmp_path), val_fraction=0.25)  # stable


def test_missing_folder_and_missing_listed_image(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        enumerate_folder(str(tmp_path / "nope"))
    (tmp_path / "images").mkdir()
    write_png(tmp_path / "images" / "a.png", np.zeros((2, 2, 3), np.uint8))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "labeled.txt").write_text("a\nghost\n")
    with pytest.raises(SourceError, match="ghost"):
        enumerate_folder(str(tmp_path))


def test_load_item_good_row_has_pixel_id(tmp_path: Path) -> None:
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    mask = np.array([[0, 1, 2, 255, 0]] * 4, np.uint8)
    write_png(tmp_path / "i.png", image)
    write_png(tmp_path / "m.png", mask)
    row = load_item(_item(tmp_path / "i.png", tmp_path / "m.png"), num_classes=3)
    assert row["error"] is None
    assert row["image_id"] == codec.pixel_digest(image)[:24]
    assert (row["height"], row["width"]) == (4, 5)
    assert np.array_equal(codec.decode_png(row["mask"]), mask)


def test_load_item_corrupt_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    row = load_item(_item(bad, None, "unlabeled"), num_classes=3)
    assert row["error"].startswith("broken: ")
    assert "broken.png" in row["error"]


def test_load_item_wrong_mask_size_says_both_sizes(tmp_path: Path) -> None:
    write_png(tmp_path / "i.png", np.zeros((4, 5, 3), np.uint8))
    write_png(tmp_path / "m.png", np.zeros((3, 5), np.uint8))
    row = load_item(_item(tmp_path / "i.png", tmp_path / "m.png"), num_classes=3)
    assert "is 5x3 (WxH) but image" in row["error"]
    assert "is 5x4" in row["error"]


def test_load_item_label_out_of_range(tmp_path: Path) -> None:
    write_png(tmp_path / "i.png", np.zeros((2, 2, 3), np.uint8))
    write_png(tmp_path / "m.png", np.array([[0, 7], [1, 255]], np.uint8))
    row = load_item(_item(tmp_path / "i.png", tmp_path / "m.png"), num_classes=3)
    assert "label values [7]; valid are 0..2 and 255" in row["error"]
