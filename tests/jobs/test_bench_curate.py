"""`bench curate --quick`: results.json holds, per pool size, the figures the docs report; its numbers agree
with the runs' own outputs (the Ray and plain runs pick the same set; the norm check's statistics recomputed
from the two runs' score files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

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
    assert human["plain"]["picks"] == 10 and human["plain_seconds"] > 0

    # Outcomes: Ray and the plain loop choose the same rows from the same candidates, in the same order.
    def picks(pattern: str) -> list[str]:
        (run,) = tmp_path.glob(pattern)
        return pq.read_table(run / "curated.parquet")["sample_id"].to_pylist()

    first = results["runs"][0]
    assert first["candidates"] == first["plain"]["candidates"]
    assert picks("run-600-ray-*") == picks("run-600-plain-*") and len(picks("run-600-ray-*")) == 30
    assert picks("human-600-ray-*") == picks("human-600-local-*")
    assert results["by_rows"] == {str(r["rows"]): r for r in results["runs"]}
    small, large = results["runs"]
    assert results["scaling"]["time_ratio"] == pytest.approx(large["seconds"] / small["seconds"])

    # The norm check's statistics, recomputed from the exact- and expected-norm runs' score files.
    def scores(pattern: str) -> dict[str, float]:
        (run,) = tmp_path.glob(pattern)
        out: dict[str, float] = {}
        for part in sorted((run / "scores").glob("part-*.parquet")):
            table = pq.read_table(part, columns=["sample_id", "score"])
            out.update(zip(table["sample_id"].to_pylist(), table["score"].to_pylist(), strict=True))
        return out

    exact, expected = scores("norm-exact-*"), scores("norm-expected-*")
    assert sorted(exact) == sorted(expected) and len(exact) == norm["rows"]
    ids = sorted(exact)
    a, b = np.array([exact[i] for i in ids]), np.array([expected[i] for i in ids])
    assert norm["spearman"] == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    top = set(np.argsort(-a, kind="stable")[:30]) & set(np.argsort(-b, kind="stable")[:30])
    assert norm["top_k_overlap"] == len(top) / 30
    relative = np.abs(b - a) / np.maximum(np.abs(a), 1e-30)
    assert norm["max_relative_difference"] == pytest.approx(float(relative.max()))
