"""`bench curate --quick`: results.json holds, per pool size, the figures the docs report, and its numbers
agree with the runs' own reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import bench_curate

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_quick_bench_writes_every_figure(ray_session: None, tmp_path: Path) -> None:
    assert bench_curate.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["rows"] for r in results["runs"]] == [600, 1200]
    keys = {
        "rows",
        "seconds",
        "stage_seconds",
        "rows_per_s",
        "peak_driver_rss_bytes",
        "peak_worker_rss_bytes",
    }
    for run in results["runs"]:
        assert keys <= set(run)
        assert run["rows_per_s"] == pytest.approx(run["rows"] / run["seconds"])
        assert run["peak_driver_rss_bytes"] > 0 and run["picks"] == 30
        assert run["stage_seconds"]["score"] <= run["seconds"]
    assert results["runs"][0]["plain_seconds"] > 0 and results["runs"][1]["plain"] is None
    assert results["scaling"]["rows_ratio"] == 2.0
    assert set(results["by_rows"]) == {"600", "1200"}
    human = results["human_batch"]
    assert human["rows"] == 600 and human["budget"] == 10 and human["picks"] == 10
    norm = results["norm_check"]
    assert norm["rows"] == results["runs"][0]["candidates"] and norm["k"] == 30
    assert -1.0 <= norm["spearman"] <= 1.0 and 0.0 <= norm["top_k_overlap"] <= 1.0
    assert human["plain"]["picks"] == 10 and human["plain_seconds"] > 0
