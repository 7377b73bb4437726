"""The whole pipeline (every stage, local Ray) on datasets in the real layouts at semi-supervised
split ratios: a Pascal VOC tree, a Cityscapes tree and a plain image folder, each mostly unlabeled,
with mixed image sizes, JPEG and PNG, cut into ingest blocks of which one holds only labeled and
others only unlabeled images (a block without any mask once crashed ingest). Every table's ids are
checked, split by split, against the ids computed here from the files; the same on S3 roots.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.cache.entries import output_dataset
from pipeline.config import load_config
from pipeline.runner import RunSummary, run_pipeline
from pipeline.source import source_items
from stages.core.detectors import DEFAULT_ARCHITECTURES
from stages.core.models import load_checkpoint
from stages.core.storage import Storage
from stages.ingest.stage import item_blocks, items_table
from tests.conftest import local_ray, stage_outputs, write_png
from tests.stages.ingest.layouts import expected_id, voc_palette

pytestmark = pytest.mark.ray

# (height, width) of the images, in turn: landscape, portrait and square.
SIZES = ((32, 40), (48, 32), (40, 40))
BLOCKS = 4
LABELED, UNLABELED, VAL = 6, 14, 4  # 24 items in 4 blocks of 6: L | U | U | 2U + 4V


@dataclass
class Layout:
    """A dataset written by a test: its config overrides and the image files of each split."""

    overrides: list[str]
    files: dict[str, dict[str, Path]]  # split -> stem -> image file

    def ids(self, split: str) -> set[str]:
        return {expected_id(path) for path in self.files[split].values()}


def _picture(rng: np.random.Generator, size: tuple[int, int], cls: int) -> np.ndarray:
    """Noise with a bright box where the mask has ``cls`` (see :func:`_mask`)."""
    pixels = rng.integers(0, 96, (*size, 3), dtype=np.uint8)
    pixels[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = (40 * cls) % 200 + 55
    return pixels


def _mask(size: tuple[int, int], cls: int, border: bool) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    if border:  # VOC's 255 ring around objects
        mask[size[0] // 4 - 1 : size[0] // 2 + 1, size[1] // 4 - 1 : size[1] // 2 + 1] = 255
    mask[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = cls
    return mask


def _splits() -> Iterator[tuple[int, str, int]]:
    """(index, split, class) for every item, labeled first."""
    counts = (("labeled", LABELED), ("unlabeled", UNLABELED), ("val", VAL))
    index = 0
    for split, count in counts:
        for _ in range(count):
            yield index, split, 1 + index % 3
            index += 1


def write_voc_semi(root: Path) -> Layout:
    """VOC2012: JPEGs, palette masks with 255 rings for every image (as VOC ships them, the
    unlabeled ones included), and UniMatch-style lists lab6 / unl14 / val."""
    rng = np.random.default_rng(1)
    files: dict[str, dict[str, Path]] = {"labeled": {}, "unlabeled": {}, "val": {}}
    for index, split, cls in _splits():
        stem, size = f"2007_{index:06d}", SIZES[index % 3]
        path = root / "JPEGImages" / f"{stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_picture(rng, size, cls)).save(path, quality=95)
        mask = _mask(size, cls, border=True)
        palette = Image.frombytes("P", (size[1], size[0]), mask.tobytes())
        palette.putpalette(voc_palette())
        (root / "SegmentationClass").mkdir(exist_ok=True)
        palette.save(root / "SegmentationClass" / f"{stem}.png")
        files[split][stem] = path
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, name in (("labeled", "lab6"), ("unlabeled", "unl14"), ("val", "val")):
        (lists / f"{name}.txt").write_text("".join(f"{s}\n" for s in files[split]))
    overrides = ["data.source=voc", "data.num_classes=21", "data.voc.labeled=lab6"]
    return Layout([*overrides, "data.voc.unlabeled=unl14", "data.voc.val=val"], files)


def write_cityscapes_semi(root: Path) -> Layout:
    """Cityscapes: leftImg8bit PNGs (2:1 and other shapes) in two cities, trainId masks for
    every train and val image; labeled = a list of 6 train images, unlabeled = the rest of
    train (14), val = the val folder (4)."""
    rng = np.random.default_rng(2)
    files: dict[str, dict[str, Path]] = {"labeled": {}, "unlabeled": {}, "val": {}}
    sizes = ((32, 64), *SIZES[1:])
    for index, split, cls in _splits():
        folder = "val" if split == "val" else "train"
        city = "frankfurt" if split == "val" else ("aachen" if index < 12 else "bochum")
        stem, size = f"{city}_{index:06d}_000019", sizes[index % 3]
        path = root / "leftImg8bit" / folder / city / f"{stem}_leftImg8bit.png"
        write_png(path, _picture(rng, size, cls))
        gt = root / "gtFine" / folder / city
        write_png(gt / f"{stem}_gtFine_labelTrainIds.png", _mask(size, 10 + cls, border=False))
        files[split][stem] = path
    (root / "lists").mkdir()
    (root / "lists" / "labeled.txt").write_text("".join(f"{s}\n" for s in files["labeled"]))
    overrides = ["data.source=cityscapes", "data.num_classes=19"]
    return Layout([*overrides, "data.cityscapes.labeled=lists/labeled.txt"], files)


def _hash_split(stem: str, val_fraction: float) -> str:
    """The folder source's split of a masked image without split lists, computed here."""
    bucket = int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], "big") / 2**64
    return "val" if bucket < val_fraction else "labeled"


def _stems(prefix: str, split: str, count: int, val_fraction: float) -> list[str]:
    """The first ``count`` names ``prefix<i>`` that the folder source puts in ``split``."""
    names = (f"{prefix}{i:03d}" for i in range(1000))
    return [n for n in names if _hash_split(n, val_fraction) == split][:count]


def write_folder_semi(root: Path) -> Layout:
    """images/ with PNGs and JPEGs, masks/ for 10 of them, no split lists: the masked images
    are divided between labeled and val by the stem hash, the other 14 are unlabeled. Names
    sort labeled first and val last, so the blocks are as for the other layouts."""
    rng = np.random.default_rng(3)
    files: dict[str, dict[str, Path]] = {"labeled": {}, "unlabeled": {}, "val": {}}
    stems = {
        "labeled": _stems("a", "labeled", LABELED, 0.3),
        "unlabeled": [f"m{i:03d}" for i in range(UNLABELED)],
        "val": _stems("z", "val", VAL, 0.3),
    }
    for index, split, cls in _splits():
        stem, size = stems[split][len(files[split])], SIZES[index % 3]
        suffix = ".jpg" if index % 2 else ".png"
        path = root / "images" / f"{stem}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_picture(rng, size, cls)).save(path, quality=95)
        if split != "unlabeled":
            write_png(root / "masks" / f"{stem}.png", _mask(size, cls, border=False))
        files[split][stem] = path
    return Layout(["data.source=folder", "data.num_classes=4", "data.val_fraction=0.3"], files)


def _config(layout: Layout, data_root: str, tmp_path: Path, *extra: str, base: str = "smoke"):
    return load_config(
        base,
        [
            *layout.overrides,
            f"data.root={data_root}",
            f"data.blocks={BLOCKS}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            *extra,
        ],
    )


def _check_blocks(config, root: str, layout: Layout) -> None:
    """The ingest blocks are as the test means them: one only labeled, some only unlabeled."""
    items, _ = source_items(config, Storage(root))
    blocks = [set(b["split"].to_pylist()) for b in item_blocks(items_table(items), BLOCKS)]
    assert {"labeled"} in blocks
    assert blocks.count({"unlabeled"}) >= 1
    assert [i.split for i in items].count("unlabeled") == len(layout.files["unlabeled"])


def _check_tables(root: str, summary: RunSummary, layout: Layout) -> None:
    """Every table of the run holds exactly the ids it should, each once."""
    storage = Storage(root)
    run_dir = Path(storage.root) / "pipelines" / summary.run_id if storage.is_local else None
    outputs = stage_outputs(Path(storage.root), run_dir) if storage.is_local else _outputs(storage)

    def table(name: str, columns: list[str]):
        return output_dataset(storage, name, outputs[name]).read_table(columns)

    labeled, unlabeled, val = layout.ids("labeled"), layout.ids("unlabeled"), layout.ids("val")
    images = table("images", ["image_id", "split", "height", "width", "mask"]).to_pylist()
    for split, want in (("labeled", labeled), ("unlabeled", unlabeled), ("val", val)):
        rows = [r for r in images if r["split"] == split]
        assert {r["image_id"] for r in rows} == want, split
        assert len(rows) == len(want)
        # Unlabeled rows never carry a mask; labeled and val rows always do.
        assert all((r["mask"] is None) == (split == "unlabeled") for r in rows)
    sizes = {(r["height"], r["width"]) for r in images}
    assert len(sizes) == 3  # mixed sizes survived ingest as they are
    assert table("quarantine", ["stem"]).num_rows == 0
    expected = {
        "teacher_signals": labeled | unlabeled,
        "detections": unlabeled,
        "pseudolabels": unlabeled,
    }
    for name, want in expected.items():
        ids = table(name, ["image_id"])["image_id"].to_pylist()
        assert sorted(ids) == sorted(want), name  # each image exactly once
    signals = table("teacher_signals", ["image_id", "height", "width"]).to_pylist()
    shapes = {r["image_id"]: (r["height"], r["width"]) for r in images}
    assert all(shapes[r["image_id"]] == (r["height"], r["width"]) for r in signals)
    metrics = summary.metrics
    assert metrics["ingest.images_labeled"] == LABELED
    assert metrics["ingest.images_unlabeled"] == UNLABELED
    assert metrics["ingest.images_val"] == VAL
    assert metrics["ingest.quarantined_images"] == 0
    assert 0.0 <= metrics["evaluate.teacher_miou"] <= 1.0
    assert 0.0 <= metrics["evaluate.student_miou"] <= 1.0


def _outputs(storage: Storage) -> dict[str, dict]:
    """Every output of the one run under a remote root, from its stages' cache entries."""
    import json

    (run_dir,) = storage.fs.ls(storage.path("pipelines"), detail=False)
    stages = json.loads(storage.fs.cat(f"{run_dir}/stages.json"))
    outputs: dict[str, dict] = {}
    for stage, used in stages.items():
        entry = storage.read_json(storage.path("cache", stage, used["key"], "_ENTRY.json"))
        outputs.update(entry["outputs"])
    return outputs


WRITERS = {
    "voc": (write_voc_semi, "VOC2012"),
    "cityscapes": (write_cityscapes_semi, "cityscapes"),
    "folder": (write_folder_semi, "folder"),
}


# VOC, the layout of the crash this guards against, in the default suite; the others as slow.
LAYOUTS = [
    "voc",
    pytest.param("cityscapes", marks=pytest.mark.slow),
    pytest.param("folder", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_whole_pipeline_on_a_mostly_unlabeled_real_layout(layout_name: str, tmp_path: Path) -> None:
    write, folder = WRITERS[layout_name]
    layout = write(tmp_path / folder)
    if layout_name == "voc":
        # the voc preset under smoke's sizes: its recipe (backbone rate, scale range, EMA) on a
        # tiny run, trained on 24-px crops of the 32-px canvas and scored through a sliding window
        extra = ["data.crop_size=24", f"detector.arch={DEFAULT_ARCHITECTURES['torchvision']}"]
        config = _config(layout, str(tmp_path / folder), tmp_path, *extra, base="voc,smoke")
        assert (config.student.ema, config.student.backbone_lr) == (0.99, 0.1)
    else:
        config = _config(layout, str(tmp_path / folder), tmp_path)
    root = str(tmp_path / "runs")
    _check_blocks(config, root, layout)
    with local_ray():
        summary = run_pipeline(config, root)
    _check_tables(root, summary, layout)
    if layout_name == "voc":
        outputs = stage_outputs(Path(root))
        for model in ("teacher", "student"):
            blob = (Path(root) / outputs[model]["path"]).read_bytes()
            checkpoint = load_checkpoint(blob, source=model)
            assert (checkpoint["image_size"], checkpoint["window"]) == (32, 24), model


@pytest.mark.slow
def test_whole_pipeline_on_s3_with_a_mostly_unlabeled_voc_tree(s3: str, tmp_path: Path) -> None:
    layout = write_voc_semi(tmp_path / "VOC2012")
    source = f"{s3}/voc-{secrets.token_hex(3)}"
    fs, _ = fsspec.core.url_to_fs(source)
    fs.put(f"{tmp_path / 'VOC2012'}/", source.removeprefix("s3://") + "/", recursive=True)
    root = f"{s3}/runs-{secrets.token_hex(3)}"
    config = _config(layout, source, tmp_path)
    _check_blocks(config, root, layout)
    with local_ray():
        summary = run_pipeline(config, root)
    _check_tables(root, summary, layout)
