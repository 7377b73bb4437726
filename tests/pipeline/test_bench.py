"""``pseudoflow bench policies`` prints and writes one row per policy; ``bench step`` compares
the two networks."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_bench_policies_rows(tmp_path: Path) -> None:
    out = tmp_path / "costs.json"
    result = run_cli(
        "bench", "policies", "--size", "16", "--classes", "3", "--images", "2", "--json", str(out)
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["threshold", "s4mc", "csl", "wpl"]
    assert all(r["math_ms"] > 0 and r["row_ms"] > 0 for r in rows)
    assert "16x16 px, 3 classes" in result.stdout
    assert result.stdout.count("\n") == 7  # title, header, 4 policies, footnote


def test_bench_step_compares_the_two_networks(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    result = run_cli(
        "bench", "step", "--size", "32", "--batch", "2", "--steps", "2", "--json", str(out)
    )
    assert result.returncode == 0, result.stderr
    cost = json.loads(out.read_text())
    assert cost["swapped"] == 3  # lraspp_mobilenet_v3_large's dilated depthwise layers
    assert cost["stock_ms"] > 0
    assert cost["ours_ms"] > 0
    assert cost["gradient_error"] < 1e-2  # float32 summation order (channels-last), no more
    assert "2 images of 32x32 px" in result.stdout
    assert f"speed-up x{cost['stock_ms'] / cost['ours_ms']:.2f}" in result.stdout


def test_bench_step_names_the_valid_architectures_and_sizes() -> None:
    result = run_cli("bench", "step", "--arch", "unet9000")
    assert result.returncode == 2
    assert "Invalid value for --arch: unknown segmentation arch 'unet9000'" in result.stderr
    assert "lraspp_mobilenet_v3_large" in result.stderr
    small = run_cli("bench", "step", "--size", "8")
    assert small.returncode == 2
    assert "'--size': 8 is not in the range x>=16" in small.stderr
