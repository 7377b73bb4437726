"""``pseudoflow bench policies`` prints and writes one row per policy."""

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
