"""``pseudoflow bench detectors``: the detect stage's predictor with each detector backend, timed
on the same images, ratios to torchvision's; detectron2 is skipped, with the reason, where it
cannot be imported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli

TORCHVISION = ("torchvision", "fasterrcnn_mobilenet_v3_large_fpn")
DETECTRON2 = ("detectron2", "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")


def _without_detectron2(tmp_path: Path) -> dict[str, str]:
    """An environment whose ``import detectron2`` fails as where it is not installed (CI), also
    on a machine that has it: a package of that name, first on the path, that is missing."""
    shim = tmp_path / "shim" / "detectron2"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'detectron2'\", name='detectron2')\n"
    )
    path = os.pathsep.join(p for p in (str(shim.parent), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_bench_detectors_quick_times_torchvision_and_says_why_detectron2_is_not(
    tmp_path: Path,
) -> None:
    out = tmp_path / "detectors.json"
    result = run_cli(
        "bench", "detectors", "--quick", "--json", str(out), env=_without_detectron2(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["arch"]) for r in rows] == [TORCHVISION]
    assert rows[0]["ms_per_image"] > 0
    assert rows[0]["ratio"] == 1.0
    assert rows[0]["boxes_per_image"] == 32  # every RoI scores 1/4: max_detections boxes
    lines = result.stdout.splitlines()
    assert lines[0].startswith("DetectorPredictor per image: 2 images of 32x32 px a call, ")
    assert "detector size 64, median of 3 calls, cpu" in lines[0]
    assert lines[2].split()[:2] == list(TORCHVISION)
    assert lines[-1].startswith(
        "detectron2: not timed: detector.backend 'detectron2' needs the detectron2 package, "
        "which is not installed in this environment"
    )
    assert len(lines) == 5  # title, header, torchvision, footnote, why not detectron2


def test_bench_detectors_quick_compares_detectron2_where_installed(tmp_path: Path) -> None:
    pytest.importorskip("detectron2")
    out = tmp_path / "detectors.json"
    result = run_cli("bench", "detectors", "--quick", "--json", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["arch"]) for r in rows] == [TORCHVISION, DETECTRON2]
    torchvision, detectron2 = rows
    assert detectron2["ratio"] == pytest.approx(
        detectron2["ms_per_image"] / torchvision["ms_per_image"]
    )
    # every RoI scores 1/4: boxes unless the backend drops them (as it did, all of them, when it
    # fed the network unnormalised pixels: degenerate boxes)
    assert detectron2["boxes_per_image"] > 0
    assert f"{detectron2['ratio']:.2f}" in result.stdout.splitlines()[3].split()
    assert "not timed" not in result.stdout


def test_bench_detectors_names_the_valid_architectures() -> None:
    result = run_cli("bench", "detectors", "--backend", "torchvision", "--torchvision-arch", "yolo")
    assert result.returncode == 2
    assert "Invalid value for --torchvision-arch: unknown torchvision detector arch 'yolo'" in (
        result.stderr
    )
    assert "fasterrcnn_mobilenet_v3_large_fpn" in result.stderr
    both = run_cli(
        "bench", "detectors", "--backend", "torchvision", "--detectron2-arch", DETECTRON2[1]
    )
    assert both.returncode == 2
    assert "--detectron2-arch without the detectron2 backend" in both.stderr
