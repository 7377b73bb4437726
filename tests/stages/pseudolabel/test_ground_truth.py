"""The ground_truth policy: the unlabeled split's own masks as pseudo-labels (reference rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from stages.core import codec
from stages.core.errors import SourceError
from stages.core.storage import DatasetRef, Storage
from stages.ingest.stage import IMAGES_SCHEMA
from stages.pseudolabel import stage
from stages.pseudolabel import table as pseudolabel_table
from stages.pseudolabel.batches import ground_truth_batch
from stages.pseudolabel.config import PseudolabelConfig
from stages.pseudolabel.maps import batch_policy_maps, signal_spec
from stages.pseudolabel.table import decode_pseudolabels
from stages.segtrain import step as segstep
from stages.teach.config import TeachConfig
from tests.conftest import local_ray

GROUND_TRUTH = PseudolabelConfig(policy="ground_truth")

# Three unlabeled masks of two sizes (255: unknown), in the order the rows come.
MASKS = {
    "a": [[0, 1, 255, 2], [3, 3, 0, 255], [1, 1, 1, 1]],  # 3x4, 10 of 12 known
    "b": [[255, 255], [2, 0], [255, 1], [0, 3], [1, 2]],  # 5x2, 7 of 10 known
    "c": [[255, 255, 255, 255], [255, 255, 255, 2], [0, 0, 0, 0]],  # 3x4, 5 of 12 known
}
COVERAGE = {"a": 10 / 12, "b": 7 / 10, "c": 5 / 12}


def _mask_rows() -> pa.Table:
    rows = []
    for image_id, mask in MASKS.items():
        array = np.asarray(mask, np.uint8)
        rows.append(
            {
                "image_id": image_id,
                "height": array.shape[0],
                "width": array.shape[1],
                "mask": codec.encode_png(array),
            }
        )
    return pa.Table.from_pylist(rows)


def test_rows_hold_the_masks_kept_where_known_with_weight_exactly_one() -> None:
    table = ground_truth_batch(_mask_rows(), GROUND_TRUTH.model_dump())
    assert table.schema == pseudolabel_table.PSEUDOLABELS_SCHEMA
    assert table["image_id"].to_pylist() == list(MASKS)  # input order, over mixed sizes
    for row in table.to_pylist():
        mask = np.asarray(MASKS[row["image_id"]], np.uint8)
        assert (row["height"], row["width"]) == mask.shape
        assert row["policy"] == "ground_truth"
        assert row["weight_offset"] == 0.0
        assert row["coverage"] == pytest.approx(COVERAGE[row["image_id"]], abs=1e-7)
        # the threshold policy's shape: no margins, no trusted or reliable mask
        assert [row[n] for n in ("margin", "refined_margin", "trusted", "reliable")] == [None] * 4
        maps = decode_pseudolabels(row)
        assert set(maps) == {"label", "keep", "weight"}
        np.testing.assert_array_equal(maps["label"], mask)
        np.testing.assert_array_equal(maps["keep"], mask != 255)
        assert maps["weight"].dtype == np.float32
        np.testing.assert_array_equal(maps["weight"][mask != 255], 1.0)  # exactly, not ~1
        np.testing.assert_array_equal(maps["weight"][mask == 255], 0.0)


def test_a_row_without_a_mask_is_refused_not_left_as_a_hole() -> None:
    rows = _mask_rows().to_pylist()
    rows[1]["mask"] = None
    with pytest.raises(ValueError, match="unlabeled image b has no mask"):
        ground_truth_batch(pa.Table.from_pylist(rows), GROUND_TRUTH.model_dump())


def test_ground_truth_reads_no_signals_and_trains_like_threshold() -> None:
    assert PseudolabelConfig(policy="ground_truth").policy == "ground_truth"
    assert TeachConfig(policies=["ground_truth"]).policies == ["ground_truth"]
    # what teach stores for it is what threshold needs: the teach key is threshold's
    assert signal_spec(GROUND_TRUTH) == signal_spec(PseudolabelConfig(policy="threshold"))
    signals = {"conf": torch.ones(1, 2, 2), "label": torch.zeros(1, 2, 2, dtype=torch.long)}
    with pytest.raises(ValueError, match="ground_truth policy labels from the unlabeled images"):
        batch_policy_maps(GROUND_TRUTH, signals)
    # the student's loop: the stored weight (keep folded in) is the live one
    label = torch.tensor([[[1, 255], [0, 2]]])
    maps = {"label": label, "keep": label != 255, "weight": (label != 255).float()}
    live = segstep._live_weight(GROUND_TRUTH, maps, label != 255, None, None, (0, 10))
    assert live is maps["weight"]


def _images(storage: Storage, masks: dict[str, tuple[str, np.ndarray | None]]) -> DatasetRef:
    rows = []
    for image_id, (split, mask) in masks.items():
        rows.append(
            {
                "image_id": image_id,
                "stem": f"stem-{image_id}",
                "split": split,
                "height": 2,
                "width": 3,
                "image": codec.encode_png(np.zeros((2, 3, 3), np.uint8)),
                "mask": None if mask is None else codec.encode_png(mask),
                "content_hash": image_id,
            }
        )
    ref = DatasetRef(storage, storage.path("images"), "images")
    ref.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA))
    ref.commit()
    return ref


@pytest.mark.ray
def test_unlabeled_images_without_masks_stop_the_stage_before_it_writes(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    known = np.array([[0, 1, 255], [2, 2, 1]], np.uint8)
    images = _images(
        storage,
        {
            "u3": ("unlabeled", None),
            "u1": ("unlabeled", known),
            "u2": ("unlabeled", None),
            "u4": ("unlabeled", known),
            "l1": ("labeled", known),
            "v1": ("val", None),  # not the unlabeled split: not counted
        },
    )
    out = DatasetRef(storage, storage.path("pseudolabels"), "pseudolabels")
    signals = DatasetRef(storage, storage.path("teacher_signals"), "teacher_signals")  # unread
    with local_ray():
        with pytest.raises(SourceError) as raised:
            stage.run(GROUND_TRUTH, signals=signals, out=out, images=images)
        message = str(raised.value)
        assert "2 of 4 unlabeled images have no ground-truth mask" in message
        assert "e.g. image u2, stem 'stem-u2'" in message  # the first id of the two
        assert "needs masks for the whole unlabeled split" in message
        assert not storage.fs.exists(out.directory)  # nothing written
        # with every unlabeled mask there, the same call writes one row per unlabeled image
        complete = DatasetRef(storage, storage.path("complete"), "images")
        full = pa.Table.from_pylist(
            [
                {**r, "mask": r["mask"] or codec.encode_png(known)}
                for r in images.read_table().to_pylist()
            ],
            schema=IMAGES_SCHEMA,
        )
        complete.write_table(full)
        complete.commit()
        metrics = stage.run(GROUND_TRUTH, signals=signals, out=out, images=complete)
    assert metrics == {"images": 4.0, "mean_image_coverage": pytest.approx(5 / 6)}
    written = out.read_table()
    assert sorted(written["image_id"].to_pylist()) == ["u1", "u2", "u3", "u4"]
