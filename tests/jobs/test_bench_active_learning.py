"""`bayescurate bench active-learning --quick` runs its campaigns in-process on tiny sizes, and what it
reports is what its campaign directories hold: the picks, the oracle's answers (the world's labels), the
curves, and the goals' verdicts, recomputed here from the runs' own numbers."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.bench_active_learning import main


def _world_labels(pool: Path) -> dict[str, tuple[str, str]]:
    """sample_id -> (shape, domain) of the pool's embeddings, quarantine excluded: the world's truth."""
    out: dict[str, tuple[str, str]] = {}
    for part in sorted(pool.glob("part-*.parquet")):
        t = pq.read_table(part, columns=["sample_id", "shape", "domain"]).to_pydict()
        out |= {sid: (y, d) for sid, y, d in zip(t["sample_id"], t["shape"], t["domain"], strict=True)}
    return out


def _accuracy(run: dict[str, Any], predictive: str = "Bayes") -> list[float]:
    """The run's accuracy curve: the starting posterior's, then after every round."""
    return [run["baseline"][predictive]["accuracy"]] + [r[predictive]["accuracy"] for r in run["rounds"]]


def _check_run(run: dict[str, Any], cfg: dict[str, Any], truth: dict[str, tuple[str, str]]) -> None:
    """A run's record against its campaign directory and the world's labels."""
    budget, target = cfg["budget"], cfg["target_domain"]
    assert [r["round"] for r in run["rounds"]] == list(range(cfg["rounds"]))
    assert [r["labels"] for r in run["rounds"]] == [budget * (i + 1) for i in range(cfg["rounds"])]
    for point in [run["baseline"], *run["rounds"]]:
        for predictive in ("MAP", "Bayes"):
            assert all(math.isfinite(point[predictive][m]) for m in ("accuracy", "nll", "ece", "brier"))
            assert 0.0 <= point[predictive]["accuracy"] <= 1.0 and 0.0 <= point[predictive]["ece"] <= 1.0
    for r in run["rounds"]:
        picks = pq.read_table(Path(run["directory"]) / f"rounds/{r['round']:03d}/picks.parquet").to_pydict()
        assert r["picks"] == picks["sample_id"] and len(set(r["picks"])) == budget
        assert r["pick_labels"] == [truth[s][0] for s in r["picks"]]  # the oracle answered the world's labels
        assert r["pick_domains"] == [truth[s][1] for s in r["picks"]]
        assert r["target_share"] == sum(truth[s][1] == target for s in r["picks"]) / budget
        assert r["scores"]["median"] == statistics.median(picks["score"])
    every_pick = [p for r in run["rounds"] for p in r["picks"]]
    assert len(set(every_pick)) == len(every_pick)  # a sample is labelled once


@pytest.mark.slow
def test_quick_run_writes_results_curves_and_goals(tmp_path: Path) -> None:
    assert main(["--quick", "--beta-sweep", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    cfg = doc["config"]
    assert set(cfg["methods"]) == {"random", "epig"} and cfg["rounds"] == 2 and cfg["seeds"] == [0]

    # Greedy EPIG's stochastic twin runs beside it: the same campaign but for `batch: stochastic` at the
    # default exponent, then at the sweep's exponent.
    assert [(r["row"], r["method"], r["batch"], r["beta"], r["seed"]) for r in doc["runs"]] == [
        ("random", "random", None, None, 0), ("epig", "epig", None, None, 0),
        ("epig-stochastic", "epig", "stochastic", 4.0, 0),
        ("epig-stochastic-beta1", "epig", "stochastic", 1.0, 0),
    ]  # fmt: skip
    runs = {r["row"]: r for r in doc["runs"]}
    configs = {
        row: yaml.safe_load((Path(r["directory"]) / "campaign.yaml").read_text()) for row, r in runs.items()
    }
    greedy = configs["epig"] | {"selection": configs["epig"]["selection"] | {"batch": "stochastic"}}
    assert configs["epig-stochastic"] == greedy and greedy["selection"]["beta"] == 4.0
    swept = greedy | {"selection": greedy["selection"] | {"beta": 1.0}}
    assert configs["epig-stochastic-beta1"] == swept

    truth = _world_labels(Path(configs["random"]["pool"]))
    for run in doc["runs"]:
        _check_run(run, cfg, truth)
    # The corrupt pool files were quarantined; the campaigns chose from the rest.
    pool = doc["world"]["embedded"]["pool"]
    assert sum(pool["quarantined"].values()) >= 1 and pool["embedded"] == len(truth) < pool["rows"]

    # One seed: each row of the table is its run's curve.
    assert list(doc["methods"]) == list(runs)
    for row, entry in doc["methods"].items():
        assert entry["labels"] == [0, cfg["budget"], 2 * cfg["budget"]]
        assert entry["Bayes.accuracy"]["mean"] == _accuracy(runs[row])
        assert entry["MAP.accuracy"]["mean"] == _accuracy(runs[row], "MAP")
        assert entry["target_share"] == [r["target_share"] for r in runs[row]["rounds"]]

    # The goals, recomputed from the curves.
    reach, above, joint, stochastic = doc["goals"]
    random, epig, power = (_accuracy(runs[row]) for row in ("random", "epig", "epig-stochastic"))
    needed = next((n for n, a in zip(entry["labels"], epig, strict=True) if a >= random[-1] - 1e-12), None)
    assert reach["numbers"]["Bayes"]["epig_labels"] == needed
    assert reach["met"] is (needed is not None and needed <= cfg["budget"])  # half of random's 2 rounds
    assert above["met"] is None and joint["met"] is None  # entropy, BALD, EPIG-independent: not run
    gain_greedy, gain_power = epig[-1] - random[-1], power[-1] - random[-1]
    assert stochastic["met"] is (gain_power >= 0.9 * gain_greedy)  # one seed: its gain is the mean's
    ratio = stochastic["numbers"]["Bayes"]["ratio"]
    assert ratio is None if gain_greedy == 0 else ratio == pytest.approx(gain_power / gain_greedy)

    summary = (tmp_path / "summary.md").read_text()
    verdict = "**met**" if stochastic["met"] else "**not met**"
    assert (
        f"per seed and on the mean: {verdict}" in summary
        and f"| epig-stochastic | {2 * cfg['budget']} |" in summary
    )
    assert "## Goals" in summary and "| method | labels | Bayes accuracy |" in summary
    # The sweep's table: each exponent's gain over random as a share of greedy EPIG's.
    sweep = {s["beta"]: s for s in doc["beta_sweep"]}
    assert [(s["beta"], s["row"]) for s in doc["beta_sweep"]] == [
        (1.0, "epig-stochastic-beta1"),
        (4.0, "epig-stochastic"),
    ]
    for beta, row in ((1.0, "epig-stochastic-beta1"), (4.0, "epig-stochastic")):
        gain = _accuracy(runs[row])[-1] - random[-1]
        expected = None if gain_greedy == 0 else gain / gain_greedy
        assert sweep[beta]["ratio"] == (None if expected is None else pytest.approx(expected))
    assert "## Power sampling: the exponent" in summary and "| 1 | epig-stochastic-beta1 |" in summary
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
