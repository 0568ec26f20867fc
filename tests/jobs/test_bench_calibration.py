"""`bayescurate bench calibration --quick` runs in-process on the tiny model and writes its three outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jobs.bench_calibration import main


@pytest.mark.slow
def test_quick_run_writes_tables_json_and_plot(tmp_path: Path) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    names = {r["predictive"] for r in doc["rows"]}
    assert names == {"MAP", "paper-probit", "paper-mc", "exact-probit", "exact-mc"}
    assert all(0.0 <= r["ece"] <= 1.0 and math.isfinite(r["nll"]) for r in doc["rows"])
    assert "| task | test set |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "reliability.png").stat().st_size > 10_000


def test_bad_domain_is_a_user_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("domains: [fog]\n")
    assert main(["--quick", "--config", str(cfg), "--out", str(tmp_path)]) == 2
