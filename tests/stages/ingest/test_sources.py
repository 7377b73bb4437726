"""``data.source`` in the config (voc and cityscapes need a root and keep their own class count
unless class_names come with another) and the runner's dispatch to a layout, whose listing digest
follows the split lists and the files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.source import source_folder, source_items
from stages.core.storage import Storage
from stages.ingest.config import DataConfig
from stages.ingest.voc import enumerate_voc
from tests.stages.ingest.layouts import VOC_TRAIN, VOC_VAL, write_cityscapes, write_voc


@pytest.mark.parametrize("source", ["voc", "cityscapes"])
def test_dataset_source_requires_root(source: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("smoke", [f"data.source={source}"])
    message = str(error.value)
    assert f"data.root is required when data.source is '{source}'" in message
    assert "data.num_classes must be" in message  # smoke's 4: both problems at once


def test_num_classes_defaults_to_the_dataset_and_must_match_it() -> None:
    voc = DataConfig(source="voc", root="/data/VOC2012")
    assert voc.num_classes == 21
    assert voc.names()[0] == "background"
    assert voc.names()[15] == "person"
    assert voc.names()[20] == "tvmonitor"
    city = DataConfig(source="cityscapes", root="/data/cityscapes")
    assert city.num_classes == 19
    assert city.names()[11] == "person"
    assert city.names()[18] == "bicycle"
    # smoke.yaml says num_classes: 4; a dataset source does not silently replace it.
    with pytest.raises(ConfigError, match=r"data\.num_classes must be 21 for voc .*got 4"):
        load_config("smoke", ["data.source=voc", "data.root=/data/VOC2012"])
    with pytest.raises(ConfigError, match=r"data\.num_classes must be 19 for cityscapes"):
        load_config("smoke", ["data.source=cityscapes", "data.root=/c", "data.num_classes=21"])


def test_split_settings_are_strict() -> None:
    with pytest.raises(ConfigError) as error:
        load_config("smoke", ["data.voc.labelled=train"])
    assert "data.voc.labelled: unknown key; valid keys here: augmented, labeled, unlabeled, " in (
        str(error.value)
    )
    config = load_config(
        "quickstart",
        [
            "data.source=voc",
            "data.root=/data/VOC2012",
            "data.num_classes=21",
            "data.voc.labeled=splits/pascal/92/labeled.txt",
            "data.voc.augmented=true",
        ],
    )
    assert config.data.voc.labeled == "splits/pascal/92/labeled.txt"
    assert config.data.voc.unlabeled is None
    assert config.data.voc.unlabeled_from == "train"


def test_runner_reads_the_voc_layout_and_digests_lists_and_files(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC2012")
    (root / "splits").mkdir()
    (root / "splits" / "labeled.txt").write_text(f"{VOC_TRAIN[0]}\n")
    overrides = ["data.source=voc", f"data.root={root}", "data.num_classes=21"]
    config = load_config("smoke", [*overrides, "data.voc.labeled=splits/labeled.txt"])
    storage = Storage(str(tmp_path / "store"))
    assert source_folder(config, storage) == str(root)
    items, digest = source_items(config, storage)
    assert items == enumerate_voc(str(root), labeled="splits/labeled.txt")
    assert [i.stem for i in items if i.split == "val"] == sorted(VOC_VAL)
    assert not (tmp_path / "store").exists()  # nothing written for a dataset source

    (root / "splits" / "labeled.txt").write_text(f"{VOC_TRAIN[0]}\n{VOC_TRAIN[1]}\n")
    _, more_labeled = source_items(config, storage)
    assert more_labeled != digest
    (root / "JPEGImages" / f"{VOC_TRAIN[3]}.jpg").write_bytes(b"changed")
    _, changed_file = source_items(config, storage)
    assert changed_file not in {digest, more_labeled}
    augmented = load_config("smoke", [*overrides, "data.voc.augmented=true"])
    assert (
        source_items(augmented, storage)[1]
        != source_items(load_config("smoke", overrides), storage)[1]
    )


def test_runner_reads_the_cityscapes_layout(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cityscapes")
    config = load_config(
        "smoke", ["data.source=cityscapes", f"data.root={root}", "data.num_classes=19"]
    )
    items, digest = source_items(config, Storage(str(tmp_path / "store")))
    assert {i.split for i in items} == {"labeled", "val"}  # labeled = all of train
    assert len(digest) == 64


def test_plan_reads_a_dataset_layout_like_the_runner(tmp_path: Path) -> None:
    """``pseudoflow plan`` lists the same items as a run would: every stage runs on a new root."""
    from pipeline.cache.plan import plan

    root = write_voc(tmp_path / "VOC2012")
    config = load_config("smoke", ["data.source=voc", f"data.root={root}", "data.num_classes=21"])
    rows = plan(config, str(tmp_path / "store"))
    assert rows[0].stage == "ingest"
    assert {row.action for row in rows} == {"run"}
