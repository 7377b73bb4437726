"""Two cold runs of the same config on the same data end bitwise equal: every table, every model,
every metric. Ray Data used to hand rows on in task-completion order (batches, and so weights,
differed from run to run; teacher signals moved by a quantum with their batch's make-up); then
the training sets' blocks ended where a sort's random sample of keys put them, and the training
loop's local shuffle, which draws over the blocks it holds, gave the quickstart's student (400
unlabeled images) other batches every run."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.cache.entries import output_dataset
from pipeline.config import load_config
from pipeline.runner import RunSummary, run_pipeline
from stages.core import codec
from stages.core.storage import DatasetRef, Storage
from stages.core.tables import DRIVER_SPLIT_BYTES
from stages.core.training import endless_batches
from stages.segtrain import labeled_dataset
from tests.conftest import local_ray, stage_outputs

pytestmark = pytest.mark.ray

TABLES = ("images", "detections", "teacher_signals", "pseudolabels")
MODELS = ("teacher", "detector", "student")


def _table(root: Path, name: str) -> pa.Table:
    output = stage_outputs(root)[name]
    return output_dataset(Storage(str(root)), name, output).read_table().sort_by("image_id")


def _state(root: Path, name: str) -> dict[str, torch.Tensor]:
    path = Storage(str(root)).resolve(stage_outputs(root)[name]["path"])
    checkpoint = torch.load(io.BytesIO(Path(path).read_bytes()), weights_only=True)
    return checkpoint["state_dict"]


@pytest.mark.slow
def test_two_cold_runs_are_bitwise_equal(tmp_path: Path) -> None:
    config = load_config(
        "smoke",
        [
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "pseudolabel.policy=wpl",  # detections, features and the prototype memory too
            "data.generated.num_unlabeled=24",
        ],
    )
    summaries: list[RunSummary] = []
    with local_ray():
        for name in ("first", "second"):
            summaries.append(run_pipeline(config, str(tmp_path / name)))
    first, second = tmp_path / "first", tmp_path / "second"
    # Each root writes its own copy of the generated source, and the source's listing digest holds
    # file times: the ingest keys differ; every key after it (content digests) must not.
    keys = [{s: k for s, (k, _) in summary.cache.items() if s != "ingest"} for summary in summaries]
    assert keys[0] == keys[1]
    assert len(keys[0]) == 7
    for name in TABLES:
        assert _table(first, name).equals(_table(second, name)), name
    for name in MODELS:
        a, b = _state(first, name), _state(second, name)
        assert a.keys() == b.keys()
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert unequal == [], f"{name}: {unequal[:5]}"
    evaluate = {k: v for k, v in summaries[0].metrics.items() if k.startswith("evaluate.")}
    assert evaluate == {k: summaries[1].metrics[k] for k in evaluate}
    assert summaries[0].metrics["pseudolabel.images"] == 24


def _labeled_images(tmp_path: Path, count: int, shards: int) -> DatasetRef:
    """An images table of ``count`` labeled 8x8 images, each its own colour, in ``shards``
    shards of ids in random order (as a source's listing may give them)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in rng.permutation(count):
        pixels = np.full((8, 8, 3), [i % 256, i // 256, 7], np.uint8)
        rows.append({"image_id": f"img{i:04d}", "split": "labeled", "height": 8, "width": 8})
        rows[-1] |= {"image": codec.encode_png(pixels), "mask": codec.encode_png(pixels[..., 0])}
    table = pa.Table.from_pylist(rows)
    storage = Storage(str(tmp_path))
    ref = DatasetRef(storage, storage.path("images"), "images")
    ref.prepare()
    per = count // shards
    for shard in range(shards):
        ref.write_table(table.slice(shard * per, per), f"part-{shard}.parquet")
    ref.commit()
    return ref


def test_training_sets_are_cut_alike_so_their_shuffled_batches_are_the_same(
    tmp_path: Path,
) -> None:
    """A training set built twice gives the same blocks and the same shuffled batches. Ray
    Data's sort samples 10 keys a block at random for its boundaries: with more rows a block
    (quickstart: 100 unlabeled a shard) its blocks ended elsewhere each time, and the local
    shuffle buffer (``endless_batches``), which draws over the blocks it holds, with them.
    Made on the driver (a small split), it gives those blocks and batches too."""
    images = _labeled_images(tmp_path, count=100, shards=4)  # 7 uneven blocks
    layouts, streams = [], []
    with local_ray():
        for driver_bytes in (0, 0, DRIVER_SPLIT_BYTES):  # Ray Data twice, then the driver
            dataset = labeled_dataset(images, image_size=8, driver_bytes=driver_bytes)
            bundles = dataset.iter_internal_ref_bundles()
            layouts.append([meta.num_rows for bundle in bundles for meta in bundle.metadata])
            batches = endless_batches(dataset.iterator(), batch_size=2, seed=0)
            # 60 batches: the whole first pass (50) and into the second's reshuffle; the image's
            # first pixel is its index
            ids = [next(batches)["image"][:, 0, 0, 0].tolist() for _ in range(60)]
            batches.close()  # its iterator's clean-up, while Ray is up
            assert sorted(i for batch in ids[:50] for i in batch) == list(range(100))
            streams.append(ids)
    assert streams[0] == streams[1] == streams[2]
    assert layouts[0] == layouts[1] == layouts[2]
    assert layouts[0] == [14, 14, 14, 15, 14, 14, 15]  # Ray's cuts, not np.array_split's
