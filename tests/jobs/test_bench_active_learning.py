"""`bayescurate bench active-learning --quick` runs its campaigns in-process on tiny sizes and writes
well-formed outputs: every method and round, labels increasing, finite metrics, shares in [0, 1], goals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jobs.bench_active_learning import main


@pytest.mark.slow
def test_quick_run_writes_results_curves_and_goals(tmp_path: Path) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    cfg = doc["config"]
    assert set(cfg["methods"]) == {"random", "epig"} and cfg["rounds"] == 2 and cfg["seeds"] == [0]

    runs = {(r["method"], r["seed"]) for r in doc["runs"]}
    assert runs == {(m, s) for m in cfg["methods"] for s in cfg["seeds"]}
    for run in doc["runs"]:
        assert [r["round"] for r in run["rounds"]] == list(range(cfg["rounds"]))
        labels = [r["labels"] for r in run["rounds"]]
        assert labels == [cfg["budget"] * (i + 1) for i in range(cfg["rounds"])]  # strictly increasing
        for point in [run["baseline"], *run["rounds"]]:
            for predictive in ("MAP", "Bayes"):
                for metric in ("accuracy", "nll", "ece", "brier"):
                    assert math.isfinite(point[predictive][metric])
                assert 0.0 <= point[predictive]["accuracy"] <= 1.0
                assert 0.0 <= point[predictive]["ece"] <= 1.0
        for r in run["rounds"]:
            assert 0.0 <= r["target_share"] <= 1.0
            assert len(r["picks"]) == cfg["budget"] and len(set(r["picks"])) == cfg["budget"]
        every_pick = [p for r in run["rounds"] for p in r["picks"]]
        assert len(set(every_pick)) == len(every_pick)  # a sample is labelled once

    assert set(doc["methods"]) == set(cfg["methods"])
    for entry in doc["methods"].values():
        assert entry["labels"] == [0, cfg["budget"], 2 * cfg["budget"]]
        assert all(0.0 <= s <= 1.0 for s in entry["target_share"])
    # The corrupt pool files were quarantined, and the rest embedded.
    pool = doc["world"]["embedded"]["pool"]
    assert sum(pool["quarantined"].values()) >= 1 and pool["embedded"] < pool["rows"]

    assert len(doc["goals"]) == 3 and all(g["met"] in (True, False, None) for g in doc["goals"])
    assert doc["goals"][0]["met"] in (True, False)  # random and epig ran: the first goal is evaluated
    summary = (tmp_path / "summary.md").read_text()
    assert "## Goals" in summary and "| method | labels | Bayes accuracy |" in summary
    assert (tmp_path / "curves.png").stat().st_size > 20_000


def test_a_target_domain_outside_the_pool_is_a_user_error(tmp_path: Path) -> None:
    code = main(["--quick", "--target-domain", "colour_jitter", "--out", str(tmp_path)])
    assert code == 2
    assert not (tmp_path / "work").exists()  # refused before any work


@pytest.mark.slow
@pytest.mark.ray
def test_quick_ray_check_compares_ray_train_with_its_local_twin(tmp_path: Path, ray_session: None) -> None:
    assert main(["--quick", "--ray-check", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    check = doc["ray_check"]
    assert (check["local"], check["ray"]) == ("epig-seed0", "epig-seed0-ray")
    assert check["rounds"] == 2 and check["rounds_with_identical_picks"] == 2
    assert check["max_difference"] < 1e-6 and check["max_projection_difference"] < 1e-8
    assert "Ray Train against the local trainer" in (tmp_path / "summary.md").read_text()
