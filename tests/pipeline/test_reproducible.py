"""Two cold runs of the same config on the same data end bitwise equal: every table, every model,
every metric. Ray Data used to hand rows on in task-completion order (batches, and so weights,
differed from run to run; teacher signals moved by a quantum with their batch's make-up)."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipeline.config import load_config
from pipeline.runner import RunSummary, run_pipeline
from stages.core.cache import output_dataset
from stages.core.storage import Storage
from tests.conftest import local_ray, stage_outputs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TABLES = ("images", "detections", "teacher_signals", "pseudolabels")
MODELS = ("teacher", "detector", "student")


def _table(root: Path, name: str) -> pa.Table:
    output = stage_outputs(root)[name]
    return output_dataset(Storage(str(root)), name, output).read_table().sort_by("image_id")


def _state(root: Path, name: str) -> dict[str, torch.Tensor]:
    path = Storage(str(root)).resolve(stage_outputs(root)[name]["path"])
    checkpoint = torch.load(io.BytesIO(Path(path).read_bytes()), weights_only=True)
    return checkpoint["state_dict"]


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
