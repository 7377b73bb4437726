from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from stages.core import codec
from stages.core.errors import SourceError
from stages.ingest.folder import SourceItem, enumerate_folder
from stages.ingest.stage import item_blocks, items_table, load_batch, load_item
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


def test_batch_of_only_unlabeled_items_loads_every_item(tmp_path: Path) -> None:
    """Ray Data hands load_batch a batch whose items all lack a mask (most blocks of a real
    semi-supervised split): the typed item table keeps ``mask_url`` a string column of nulls,
    never Arrow's null type, which reached numpy batches as float NaN and crashed ingest."""
    items = []
    for i in range(3):
        write_png(tmp_path / f"u{i}.png", np.full((4, 6, 3), 10 * i, np.uint8))
        items.append(SourceItem(f"u{i}", "unlabeled", str(tmp_path / f"u{i}.png"), None))
    table = items_table(items)
    assert table.schema.field("mask_url").type == pa.string()
    assert table["mask_url"].null_count == 3
    rows = load_batch(table, num_classes=3).to_pylist()
    assert [r["error"] for r in rows] == [None, None, None]
    assert [r["mask"] for r in rows] == [None, None, None]
    assert [r["stem"] for r in rows] == ["u0", "u1", "u2"]


def test_item_blocks_keep_source_order_and_every_item(tmp_path: Path) -> None:
    items = [
        SourceItem(f"s{i}", "labeled" if i < 6 else "unlabeled", f"/x/{i}", None) for i in range(24)
    ]
    blocks = item_blocks(items_table(items), 4)
    assert [b.num_rows for b in blocks] == [6, 6, 6, 6]
    assert [set(b["split"].to_pylist()) for b in blocks][:2] == [{"labeled"}, {"unlabeled"}]
    assert [s for b in blocks for s in b["stem"].to_pylist()] == [f"s{i}" for i in range(24)]
    assert [b.num_rows for b in item_blocks(items_table(items[:3]), 4)] == [1, 1, 1]
    assert [b.num_rows for b in item_blocks(items_table(items[:10]), 4)] == [2, 3, 2, 3]


def test_unexpected_error_quarantines_the_item_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_png(tmp_path / "i.png", np.zeros((2, 2, 3), np.uint8))
    # A mask location that is not a string (what a NaN from a float column was): named, kept out.
    row = load_item({**_item(tmp_path / "i.png", None), "mask_url": float("nan")}, 3)
    assert row["error"] == "i: mask location nan is not a path or URL string"

    def broken(*args: object) -> None:
        raise TypeError("argument of type 'numpy.float32' is not iterable")

    monkeypatch.setattr("stages.ingest.stage._check_mask", broken)
    write_png(tmp_path / "m.png", np.zeros((2, 2), np.uint8))
    rows = load_batch(
        items_table(
            [
                SourceItem("i", "labeled", str(tmp_path / "i.png"), str(tmp_path / "m.png")),
                SourceItem("j", "unlabeled", str(tmp_path / "i.png"), None),
            ]
        ),
        num_classes=3,
    ).to_pylist()
    assert rows[0]["error"] == (
        "i: unexpected TypeError: argument of type 'numpy.float32' is not iterable"
    )
    assert rows[1]["error"] is None  # the rest of the batch is loaded


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 50000, 65000]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # a 16-bit grayscale PNG
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    row = load_item(_item(path, None, "unlabeled"), num_classes=3)
    assert row["error"] is None
    assert row["note"] == "scaled_16bit"
    rgb = codec.decode_png(row["image"])
    # round(v * 255 / 65535), by hand: 1000 -> 3.89 -> 4, 20000 -> 77.8 -> 78, ...
    want = np.array([[0, 1, 128, 255], [4, 78, 195, 253]], np.uint8)
    assert np.array_equal(rgb[..., 0], want)
    assert np.array_equal(rgb[..., 1], want)
    assert np.array_equal(rgb[..., 2], want)


def test_alpha_is_dropped_and_noted_colour_kept(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 10, 20, 30
    rgba[0, 0, 3], rgba[1, 2, 3] = 0, 255  # transparent and opaque pixels alike
    write_png(tmp_path / "a.png", rgba)
    row = load_item(_item(tmp_path / "a.png", None, "unlabeled"), num_classes=3)
    assert row["note"] == "alpha_dropped"
    rgb = codec.decode_png(row["image"])
    assert rgb.shape == (2, 3, 3)
    assert (rgb == np.array([10, 20, 30], np.uint8)).all()
    write_png(tmp_path / "rgb.png", np.zeros((2, 2, 3), np.uint8))
    assert load_item(_item(tmp_path / "rgb.png", None, "unlabeled"), 3)["note"] is None


@pytest.mark.parametrize("split", ["labeled", "val"])
def test_listed_labeled_or_val_image_without_mask_stops_before_work(
    tmp_path: Path, split: str
) -> None:
    for stem in ("a", "b", "c", "d"):
        write_png(tmp_path / "images" / f"{stem}.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / f"{split}.txt").write_text("a\nc\nb\n")
    (tmp_path / "splits" / "unlabeled.txt").write_text("d\n")
    with pytest.raises(SourceError) as caught:
        enumerate_folder(str(tmp_path))
    message = str(caught.value)
    assert f"2 {split} images (b, c) have no mask {tmp_path}/masks/<stem>.png" in message
    assert "splits/unlabeled.txt" in message


def _jpeg_cmyk(path: Path) -> None:
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(path, "JPEG", quality=100)


def _palette(path: Path) -> None:
    image = Image.frombytes("P", (4, 3), bytes([0, 1] * 6))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.save(path)


def _truncated(path: Path) -> None:
    write_png(path, np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:200])


IMAGE_KINDS = {
    # kind: (writer, the error's words, or None when the image is kept)
    "zero_byte": (lambda p: p.write_bytes(b""), "is not a readable PNG/JPEG image"),
    "text_named_png": (lambda p: p.write_text("not an image"), "is not a readable PNG/JPEG image"),
    "truncated": (_truncated, "is not a readable PNG/JPEG image"),
    "cmyk_jpeg": (_jpeg_cmyk, None),
    "palette": (_palette, None),
    "grayscale": (lambda p: write_png(p, np.full((3, 4), 77, np.uint8)), None),
}


@pytest.mark.parametrize("kind", list(IMAGE_KINDS))
def test_image_kinds_are_kept_as_rgb_or_quarantined_with_the_reason(
    tmp_path: Path, kind: str
) -> None:
    write, error = IMAGE_KINDS[kind]
    path = tmp_path / f"{kind}.png"
    write(path)
    row = load_item(_item(path, None, "unlabeled"), num_classes=3)
    if error is not None:
        assert row["error"].startswith(f"{kind}: {path} {error}")
        return
    assert row["error"] is None
    rgb = codec.decode_png(row["image"])
    assert rgb.shape == (3, 4, 3)
    expected = {
        "cmyk_jpeg": (255, 0, 0),  # CMYK (0, 255, 255, 0) is red
        "palette": (10, 20, 30),  # index 0 of the palette, at the top-left pixel
        "grayscale": (77, 77, 77),
    }[kind]
    assert tuple(int(v) for v in rgb[0, 0]) == pytest.approx(expected, abs=2)  # JPEG rounding


def test_rgb_mask_is_quarantined_with_its_mode(tmp_path: Path) -> None:
    write_png(tmp_path / "i.png", np.zeros((2, 2, 3), np.uint8))
    write_png(tmp_path / "m.png", np.zeros((2, 2, 3), np.uint8))
    row = load_item(_item(tmp_path / "i.png", tmp_path / "m.png"), num_classes=3)
    assert row["error"] == (
        f"i: mask {tmp_path / 'm.png'} has mode 'RGB'; expected a single-channel L or P PNG"
    )
