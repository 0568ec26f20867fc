"""`bench select --quick` runs the fast and the reference greedy loops on tiny sizes and reports both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import bench_select

pytestmark = pytest.mark.slow


def test_the_quick_selection_benchmark_compares_the_two_paths(tmp_path: Path) -> None:
    out = tmp_path / "select.json"
    assert bench_select.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"compare", "profile", "memory", "median_speedup", "config", "environment"} <= set(result)
    assert result["config"]["quick"] is True and result["median_speedup"] > 0
