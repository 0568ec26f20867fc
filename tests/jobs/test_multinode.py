"""Multi-node: fit-posterior on a head + 2 nodes Ray cluster equals the single-process factors, curate on it
picks what it picks in-process, and the work was split across the nodes. Runs in a subprocess so its
cluster never meets the session's local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_cluster_fit_matches_single_process(tmp_path: Path) -> None:
    script = Path(__file__).with_name("multinode_check.py")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(script.parents[2])}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    assert report["rc"] == [0, 0]
    for tower, d in report["diffs"].items():
        assert d["n"][0] == d["n"][1], tower
        # float32 model forwards in other processes: agreement to float32 rounding of the largest entry.
        assert d["A"] <= 1e-6 * d["scale"] and d["B"] <= 1e-6 * d["scale"], (tower, d)
    worked = set().union(*map(set, report["nodes"].values()))
    assert len(report["all_nodes"]) == 3
    assert worked == set(report["all_nodes"]), report["nodes"]
    # curate: the same batch as in-process; the kNN partials and the scored blocks ran on several nodes.
    assert report["curate_rc"] == [0, 0, 0]
    assert report["picks"]["cluster"] == report["picks"]["local"] and len(report["picks"]["local"]) == 20
    for stage in ("knn", "score"):
        assert len(report["curate_nodes"][stage]) >= 2, report["curate_nodes"]
