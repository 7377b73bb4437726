"""``pseudoflow bench throughput``: every key with a finite value (or its documented skip) and
its goal; the stored bytes per pixel recomputed here from the same synthetic rows; the stand-in's
peaked field; the MLflow run with its metrics and plot."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.bench import adapters, synthetic
from tests.conftest import run_cli

KEYS = [
    "labeling_ratio",
    "detect_ratio",
    "labeling_cpu_ms_per_image",
    "signals_bytes_per_pixel",
    "pseudolabel_ms_per_image.threshold",
    "pseudolabel_ms_per_image.s4mc",
    "pseudolabel_ms_per_image.csl",
    "pseudolabel_ms_per_image.wpl",
    "pseudolabels_bytes_per_pixel",
    "step_ratio",
    "step_cpu_ms_per_image",
    "actor_scaling",
]
SIZE, BATCH, CLASSES = 64, 2, 21  # --quick


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick CPU run through the CLI, logging to a SQLite store next to its JSON."""
    folder = tmp_path_factory.mktemp("throughput")
    out, uri = folder / "throughput.json", f"sqlite:///{folder}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = ["bench", "throughput", "--quick", "--device", "cpu", "--json", str(out)]
    result = run_cli(*args, "--tracking-uri", uri, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    return {"json": json.loads(out.read_text()), "uri": uri, "result": result, "folder": folder}


def test_every_key_has_a_finite_value_and_a_goal(quick: dict[str, Any]) -> None:
    rows = quick["json"]
    assert list(rows) == KEYS
    for key, row in rows.items():
        assert set(row) == {"value", "goal", "detail"}
        assert isinstance(row["goal"], str), key
        assert row["goal"][:2] in (">=", "<="), key
        if key == "actor_scaling":
            assert row["value"] is None
            assert row["detail"] == "skipped: --quick"
        else:
            assert math.isfinite(row["value"]), key
            assert row["value"] > 0, key
    assert rows["labeling_ratio"]["goal"] == ">= 0.9"  # CPU
    assert rows["signals_bytes_per_pixel"]["goal"] == "<= 0.5 B/px"
    stdout = quick["result"].stdout
    for key in KEYS:
        assert re.search(rf"^{re.escape(key)} .* (yes|no)  ", stdout, re.MULTILINE), key


def test_ratio_is_bare_time_over_predictor_time(quick: dict[str, Any]) -> None:
    row = quick["json"]["labeling_ratio"]
    found = re.search(
        r"teach predictor ([\d.]+) ms/image .* bare forward ([\d.]+) ms/image", row["detail"]
    )
    assert found is not None
    predictor, bare = (float(v) for v in found.groups())
    assert row["value"] == pytest.approx(bare / predictor, rel=0.02)
    assert (
        f"({bare:.2f} ms/image on cpu)" in quick["json"]["pseudolabel_ms_per_image.csl"]["detail"]
    )


def _zstd_parquet_size(table: Any) -> int:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return len(buffer.getvalue())


def test_bytes_per_pixel_are_the_rows_parquet_size(quick: dict[str, Any]) -> None:
    """The same synthetic rows, made again here: the stand-in's field (seed 0) through the teach
    predictor and the threshold policy, written as zstd Parquet, over 2 x 64² pixels."""
    generator = torch.Generator().manual_seed(0)
    logits, grid = synthetic.peaked_logits(BATCH, CLASSES, SIZE, generator=generator)
    images = synthetic.synthetic_images(synthetic.region_labels(grid, SIZE), generator)
    replay = synthetic.ReplayNetwork(logits, torch.zeros(BATCH, 4, 8, 8))
    predictor, _ = adapters.teacher_predictor(replay, torch.device("cpu"))
    signals = predictor(synthetic.image_batch(images))
    rows = adapters.label_rows(signals, "threshold")
    pixels = BATCH * SIZE * SIZE
    measured = quick["json"]
    assert measured["signals_bytes_per_pixel"]["value"] == _zstd_parquet_size(signals) / pixels
    assert measured["pseudolabels_bytes_per_pixel"]["value"] == _zstd_parquet_size(rows) / pixels


def test_mlflow_run_holds_the_metrics_and_the_plot(quick: dict[str, Any], tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=quick["uri"])
    experiment = client.get_experiment_by_name("pseudoflow-bench")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "throughput-quick"
    measured = {k: v["value"] for k, v in quick["json"].items() if v["value"] is not None}
    assert run.data.metrics == pytest.approx(measured)
    assert run.data.params["size"] == str(SIZE)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"throughput.json", "throughput.txt", "throughput.png"}
    png = Path(client.download_artifacts(run.info.run_id, "throughput.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(quick["folder"], "mlartifacts").is_dir()  # next to the SQLite database


def test_peaked_field_is_confident_inside_regions_and_soft_across_borders() -> None:
    generator = torch.Generator().manual_seed(3)
    logits, grid = synthetic.peaked_logits(2, CLASSES, 256, generator=generator)
    assert logits.shape == (2, CLASSES, 256, 256)
    conf, label = logits.softmax(dim=1).max(dim=1)
    assert 0.85 <= float((conf > 0.95).float().mean()) <= 0.95
    assert float(conf.max()) == pytest.approx(1 / (1 + 20 * math.exp(-12.0)), abs=1e-6)
    assert float(conf.min()) < 0.6  # where two regions' logits cross
    assert len(label.unique()) >= 8
    inside = label[:, 16, 16]  # the middle of each image's first region (32 px squares)
    assert torch.equal(inside, grid[:, 0, 0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
def test_cuda_without_cuda_is_refused() -> None:
    result: subprocess.CompletedProcess[str] = run_cli(
        "bench", "throughput", "--quick", "--device", "cuda"
    )
    assert result.returncode == 2
    assert "Invalid value for --device: CUDA is not available on this machine" in result.stderr


# What a GPU machine without this project's other packages lacks (cluster/gpu-bench.sh carries
# only pydantic and click there): the bench must run without any of these.
ABSENT = ("ray", "mlflow", "yaml", "matplotlib", "scipy", "boto3", "s3fs", "psycopg2")


def test_the_bench_runs_where_only_torch_pydantic_and_click_are_installed(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    blocker = f"""
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Absent())
sys.argv = ["pseudoflow", "bench", "throughput", "--quick", "--device", "cpu", "--json", {str(out)!r}]
runpy.run_module("pipeline", run_name="__main__")
"""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [sys.executable, "-c", blocker], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(out.read_text())
    assert list(measured) == KEYS
    assert measured["step_ratio"]["value"] > 0
    assert measured["actor_scaling"]["value"] is None
