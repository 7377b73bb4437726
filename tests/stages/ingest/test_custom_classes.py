"""A custom dataset in the VOC or Cityscapes layout with its own classes (data.num_classes and
data.class_names in the config): it ingests with those classes, masks with labels beyond them are
quarantined, and the names reach every per-class output. The datasets' own classes stay the
default."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.source import source_items
from stages.core.storage import Storage
from stages.ingest import stage as ingest
from stages.ingest.config import DataConfig
from stages.ingest.voc import enumerate_voc
from tests.conftest import write_png
from tests.stages.ingest.layouts import (
    HEIGHT,
    IGNORE,
    WIDTH,
    class_mask,
    expected_id,
    write_palette_png,
    write_rgb,
)

NAMES = ["background", "crack", "rust", "dent", "scratch"]
TRAIN = ("part_001", "part_002", "part_003", "part_004")
VAL = ("part_101", "part_102")
BAD = "part_003"  # its mask holds label 7, beyond the 5 classes


def _custom_voc(root: Path) -> Path:
    """A VOC2012-layout folder of a 5-class dataset: one class per image, 255 borders, and one
    train mask with label 7."""
    for seed, stem in enumerate((*TRAIN, *VAL)):
        write_rgb(root / "JPEGImages" / f"{stem}.jpg", seed)
        mask = class_mask(7 if stem == BAD else 1 + seed % 4, border=True)
        write_palette_png(root / "SegmentationClass" / f"{stem}.png", mask)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("".join(f"{s}\n" for s in TRAIN))
    (lists / "val.txt").write_text("".join(f"{s}\n" for s in VAL))
    (lists / "labeled.txt").write_text("".join(f"{s}\n" for s in TRAIN[:3]))
    return root


def _custom_overrides(source: str, root: Path | str) -> list[str]:
    return [
        f"data.source={source}",
        f"data.root={root}",
        "data.num_classes=5",
        f"data.class_names=[{', '.join(NAMES)}]",
    ]


def test_voc_layout_with_its_own_classes_ingests_and_quarantines_labels_beyond(
    tmp_path: Path,
) -> None:
    root = _custom_voc(tmp_path / "parts")
    config = load_config("smoke", [*_custom_overrides("voc", root), "data.voc.labeled=labeled"])
    assert config.data.num_classes == 5
    assert config.data.names() == NAMES
    items, _ = source_items(config, Storage(str(tmp_path / "store")))
    loaded = ingest.load_batch(ingest.items_table(items), config.data.num_classes).to_pylist()

    kept: dict[str, dict[str, str]] = {"labeled": {}, "unlabeled": {}, "val": {}}
    errors = {}
    for row in loaded:
        if row["error"] is None:
            kept[row["split"]][row["stem"]] = row["image_id"]
        else:
            errors[row["stem"]] = row["error"]

    def ids(stems: tuple[str, ...]) -> dict[str, str]:
        return {s: expected_id(root / "JPEGImages" / f"{s}.jpg") for s in stems}

    assert kept == {
        "labeled": ids(("part_001", "part_002")),
        "unlabeled": ids(("part_004",)),  # train less the labeled list, no mask
        "val": ids(VAL),
    }
    assert list(errors) == [BAD]
    assert "holds label values [7]; valid are 0..4 and 255 (ignore)" in errors[BAD]
    assert f"SegmentationClass/{BAD}.png" in errors[BAD]


def test_cityscapes_layout_with_its_own_classes(tmp_path: Path) -> None:
    root = tmp_path / "scenes"
    for split, stem, label in (("train", "a_000000_000001", 4), ("val", "b_000000_000001", 6)):
        write_rgb(root / "leftImg8bit" / split / stem[0] / f"{stem}_leftImg8bit.png", 0)
        mask = np.full((HEIGHT, WIDTH), label, np.uint8)
        mask[0] = IGNORE
        write_png(root / "gtFine" / split / stem[0] / f"{stem}_gtFine_labelTrainIds.png", mask)
    config = load_config("smoke", _custom_overrides("cityscapes", root))
    assert config.data.names() == NAMES
    items, _ = source_items(config, Storage(str(tmp_path / "store")))
    rows = {i.stem: ingest.load_item(asdict(i), config.data.num_classes) for i in items}
    assert rows["a_000000_000001"]["error"] is None
    assert "holds label values [6]; valid are 0..4" in rows["b_000000_000001"]["error"]


@pytest.mark.parametrize(
    ("source", "layout", "own"), [("voc", "VOC", 21), ("cityscapes", "Cityscapes", 19)]
)
def test_other_num_classes_needs_class_names(source: str, layout: str, own: int) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("smoke", [f"data.source={source}", "data.root=/d", "data.num_classes=5"])
    message = str(error.value)
    assert f"data.num_classes must be {own} for {source} (" in message
    assert f"got 5; a custom dataset in the {layout} layout gives data.class_names" in message
    assert "(5 names in index order)" in message

    # class_names whose length is not num_classes: says both, and how to set a custom dataset.
    with pytest.raises(ConfigError) as error:
        load_config(
            "smoke",
            [
                f"data.source={source}",
                "data.root=/d",
                "data.num_classes=5",
                "data.class_names=[a, b]",
            ],
        )
    assert "data.class_names has 2 names for data.num_classes=5" in str(error.value)

    # class_names without num_classes: the dataset's count stays, and the message says to set it.
    with pytest.raises(ValueError) as raised:
        DataConfig.model_validate({"source": source, "root": "/d", "class_names": NAMES})
    text = str(raised.value)
    assert f"data.class_names has 5 names for data.num_classes={own}" in text
    assert f"a custom dataset in the {layout} layout sets data.num_classes: 5 as well" in text


@pytest.mark.parametrize("source", ["voc", "cityscapes"])
def test_custom_classes_name_the_per_class_metrics(source: str) -> None:
    data = DataConfig(source=source, root="/d", num_classes=5, class_names=tuple(NAMES))
    assert data.names() == NAMES
    default = DataConfig(source=source, root="/d")
    assert len(default.names()) == default.num_classes == (21 if source == "voc" else 19)


def test_unlabeled_masks_are_kept_only_when_asked(tmp_path: Path) -> None:
    """The semi-supervised protocol drops an unlabeled image's mask; a benchmark keeps it
    (``data.voc.unlabeled_masks``) to score pseudo-labels and run ground-truth rows."""
    root = _custom_voc(tmp_path / "voc")
    masks = root / "SegmentationClass"
    by_default = {i.stem: i.mask_url for i in enumerate_voc(str(root), labeled="labeled")}
    kept = {
        i.stem: i.mask_url
        for i in enumerate_voc(str(root), labeled="labeled", unlabeled_masks=True)
    }
    assert by_default["part_004"] is None  # the one unlabeled image
    assert kept["part_004"] == str(masks / "part_004.png")
    assert {k: v for k, v in kept.items() if k != "part_004"} == {
        k: v for k, v in by_default.items() if k != "part_004"
    }
    (masks / "part_004.png").unlink()  # where the dataset has none, none is made up
    assert {
        i.stem: i.mask_url
        for i in enumerate_voc(str(root), labeled="labeled", unlabeled_masks=True)
    }["part_004"] is None
