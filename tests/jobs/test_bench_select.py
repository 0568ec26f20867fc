"""`bench select --quick` runs the fast and the reference greedy loops on tiny sizes and reports both."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from jobs import bench_select

pytestmark = pytest.mark.slow


def test_the_quick_selection_benchmark_compares_the_two_paths(tmp_path: Path) -> None:
    out = tmp_path / "select.json"
    assert bench_select.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"compare", "profile", "memory", "median_speedup", "config", "environment"} <= set(result)
    assert result["config"]["quick"] is True
    rows = result["compare"]
    assert [(r["dtype"], r["candidates"], r["budget"]) for r in rows] == [("float64", 300, 4)]  # quick sizes
    for r in rows:  # a speedup is the plain loop's seconds per pick over the fast path's
        assert r["speedup"] == pytest.approx(r["reference_s_per_pick"] / r["fast_s_per_pick"], rel=1e-12)
        assert r["max_rel_score_diff"] < 1e-8  # float64: the two loops' scores agree to rounding
    assert result["median_speedup"] == statistics.median(r["speedup"] for r in rows)
    # The paired steps are the library's two loops a step at a time: they pick what the whole loops pick.
    assert all(r["same_picks"] and r["paired_same_picks"] for r in result["compare"])
