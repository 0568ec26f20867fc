"""The active-learning benchmark's aggregation and goals against tables worked out by hand: no campaigns."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest

from pipeline.experiments.active_learning_analysis import (
    STOCHASTIC_EPIG,
    aggregate,
    beta_sweep,
    class_balance,
    ends_above_goal,
    goals,
    labels_to_reach,
    reach_goal,
    stochastic_goal,
)

BLUR, NOISE = "blur", "noise"


def _point(acc: float, nll: float = 1.0) -> dict[str, dict[str, float]]:
    """Metrics of one point of a curve: MAP's accuracy is Bayes's minus 0.1, so the two can be told apart."""
    metrics = {"accuracy": acc, "nll": nll, "ece": 0.1, "brier": 0.5}
    return {"Bayes": metrics, "MAP": metrics | {"accuracy": acc - 0.1}}


def _run(
    row: str, seed: int, accuracy: list[float], picks: list[list[tuple[str, str]]], **extra: Any
) -> dict[str, Any]:
    """A campaign record as `run_campaign` writes it: `accuracy[0]` is the starting posterior's, then one
    value and one list of (domain, true class) picks per round (budget: the picks of a round)."""
    rounds = []
    for i, (acc, round_picks) in enumerate(zip(accuracy[1:], picks, strict=True)):
        domains = [d for d, _ in round_picks]
        rounds.append(
            {
                "round": i,
                "labels": len(round_picks) * (i + 1),
                **_point(acc),
                "target_share": sum(d == BLUR for d in domains) / len(domains),
                "pick_domains": domains,
                "pick_labels": [c for _, c in round_picks],
                "scores": {"median": 0.1 * (i + 1) + seed},
                "weight_change": 0.01 * (i + 1) + 0.01 * seed,
            }
        )
    record = {
        "row": row,
        "method": row,
        "seed": seed,
        "trainer": "local",
        "target_domain": BLUR,
        "task": "shape",
        "baseline": _point(accuracy[0]),
        "rounds": rounds,
        "seconds": 10.0 + seed,
    }
    return record | extra


def test_aggregate_gives_seed_means_spreads_and_pick_shares() -> None:
    seed0 = _run(
        "epig",
        0,
        [0.5, 0.6, 0.7],
        [[(BLUR, "circle"), (NOISE, "square")], [(BLUR, "circle"), (BLUR, "star")]],
    )
    seed1 = _run(
        "epig",
        1,
        [0.5, 0.8, 0.9],
        [[(NOISE, "circle"), (NOISE, "circle")], [(BLUR, "square"), (BLUR, "square")]],
    )
    ray = _run(
        "epig",
        0,
        [0.0, 0.0, 0.0],
        [[(NOISE, "x"), (NOISE, "x")], [(NOISE, "x"), (NOISE, "x")]],
        trainer="ray",
    )
    [(row, e)] = aggregate([seed0, ray, seed1]).items()  # the Ray run is not a seed of the row

    assert row == "epig" and e["labels"] == [0, 2, 4] and e["seeds"] == [0, 1]
    acc = e["Bayes.accuracy"]
    assert acc["mean"] == pytest.approx([0.5, 0.7, 0.8])
    assert acc["sd"] == pytest.approx([0.0, math.sqrt(0.02), math.sqrt(0.02)])  # sd of (0.6, 0.8): √0.02
    assert (acc["min"], acc["max"], acc["final"]) == ([0.5, 0.6, 0.7], [0.5, 0.8, 0.9], [0.7, 0.9])
    assert e["MAP.accuracy"]["mean"] == pytest.approx([0.4, 0.6, 0.7])
    # Blur picks per round: seed 0 1 of 2 then 2 of 2, seed 1 0 then 2: means 0.25 and 1; overall 5 of 8.
    assert e["target_share"] == pytest.approx([0.25, 1.0]) and e["target_share_all"] == pytest.approx(5 / 8)
    per_class = e[
        "target_picks_per_class"
    ]  # blur picks of each class, over 2 seeds: circle 2, star 1, square 2
    assert per_class == pytest.approx(
        {"circle": 1.0, "square": 1.0, "triangle": 0, "star": 0.5, "cross": 0, "diamond": 0}
    )
    # First half (round 0): seed 0 picked {circle, square}, log 2 / log 6; seed 1 two circles, 0.
    assert e["class_balance"]["first_half"] == pytest.approx(math.log(2) / math.log(6) / 2)
    all0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(6)  # circle x2, square, star
    assert e["class_balance"]["all"] == pytest.approx((all0 + math.log(2) / math.log(6)) / 2)  # seed 1: 2+2
    assert e["median_score"] == pytest.approx([0.6, 0.7])  # (0.1 + 1.1) / 2, (0.2 + 1.2) / 2
    assert e["weight_change_final"] == pytest.approx(0.025) and e["seconds_per_run"] == pytest.approx(10.5)


def test_aggregate_refuses_seeds_that_labelled_different_counts() -> None:
    a = _run("random", 0, [0.5, 0.6], [[(BLUR, "circle"), (BLUR, "circle")]])
    b = _run("random", 1, [0.5, 0.6], [[(BLUR, "circle")]])
    with pytest.raises(ValueError, match="the seeds of random labelled different numbers of samples"):
        aggregate([a, b])


def test_class_balance_is_the_entropy_of_the_class_histogram_over_log_c() -> None:
    assert class_balance(["a", "b", "c", "d"], 4) == pytest.approx(1.0)
    assert class_balance(["a", "a", "b", "b"], 4) == pytest.approx(0.5)  # log 2 / log 4
    assert class_balance(["a", "a", "a"], 3) == pytest.approx(0.0)
    assert class_balance(["a"], 1) == 1.0


def _entry(
    labels: list[int], mean: list[float], finals: dict[int, float], map_shift: float = 0.0
) -> dict[str, Any]:
    """A row of the aggregate table with only what the goals read: the label axis, the seed-mean accuracy
    curve and each seed's final accuracy (MAP's: Bayes's plus `map_shift` at the end)."""

    def acc(shift: float) -> dict[str, Any]:
        return {"mean": [*mean[:-1], mean[-1] + shift], "final": [v + shift for v in finals.values()]}

    return {
        "labels": labels,
        "seeds": list(finals),
        "Bayes.accuracy": acc(0.0),
        "MAP.accuracy": acc(map_shift),
    }


def _row(finals: dict[int, float], map_shift: float = 0.0) -> dict[str, Any]:
    """A row whose seed-mean curve ends at the mean of its seeds' final accuracies."""
    return _entry([0, 10, 20], [0.5, 0.55, statistics.fmean(finals.values())], finals, map_shift)


def test_labels_to_reach_is_the_first_label_count_at_or_above_the_level() -> None:
    e = _entry([0, 10, 20, 30], [0.5, 0.6, 0.7, 0.65], {0: 0.65})
    assert (
        labels_to_reach(e, 0.6) == 10 and labels_to_reach(e, 0.65) == 20 and labels_to_reach(e, 0.71) is None
    )


@pytest.mark.parametrize(
    ("epig_curve", "needed", "met"),
    [([0.5, 0.72, 0.8], 10, True), ([0.5, 0.69, 0.8], 20, False), ([0.5, 0.6, 0.65], None, False)],
)
def test_epig_must_reach_randoms_final_accuracy_with_half_its_labels(
    epig_curve: list[float], needed: int | None, met: bool
) -> None:
    random = _entry([0, 10, 20], [0.5, 0.6, 0.7], {0: 0.7})
    agg = {"random": random, "epig": _entry([0, 10, 20], epig_curve, {0: epig_curve[-1]})}
    goal = reach_goal(agg)
    assert goal["met"] is met and goal["met_map"] is met  # MAP's curves are Bayes's here
    assert goal["numbers"]["Bayes"] == {"level": 0.7, "baseline_labels": 20, "epig_labels": needed}
    reached = "never" if needed is None else f"after {needed} labels"
    assert f"EPIG reaches it {reached} (goal: at most 10)" in goal["detail"]


def test_epig_must_end_above_every_other_method() -> None:
    agg = {
        "epig": _row({0: 0.8, 1: 0.8}),
        "entropy": _row({0: 0.7, 1: 0.76}),
        "bald": _row({0: 0.82, 1: 0.8}, map_shift=-0.1),
    }
    goal = ends_above_goal(agg, "EPIG ends above entropy and BALD", ("entropy", "bald"))
    assert goal["met"] is False  # BALD's Bayes mean 0.81 > 0.80
    assert goal["met_map"] is True  # BALD's MAP mean 0.71 < 0.80
    assert goal["numbers"]["Bayes"]["paired epig - entropy"] == pytest.approx([0.1, 0.04])
    assert goal["numbers"]["Bayes"]["paired epig - bald"] == pytest.approx([-0.02, 0.0])
    assert "EPIG 0.8000, entropy 0.7300, bald 0.8100" in goal["detail"]


RANDOM = {0: 0.50, 1: 0.60}
GREEDY = {0: 0.70, 1: 0.70}  # gains over random 0.20 and 0.10; on the mean 0.15


@pytest.mark.parametrize(
    ("stochastic", "met", "ratios", "mean_ratio"),
    [
        ({0: 0.69, 1: 0.70}, True, (0.95, 1.0), 0.145 / 0.15),  # every seed and the mean keep >= 90%
        ({0: 0.72, 1: 0.66}, False, (1.1, 0.6), 0.14 / 0.15),  # the mean keeps 93%, seed 1 only 60%
        ({0: 0.70, 1: 0.64}, False, (1.0, 0.4), 0.12 / 0.15),  # the mean keeps 80%
    ],
)
def test_stochastic_epig_must_keep_ninety_percent_of_greedy_gain_per_seed_and_on_the_mean(
    stochastic: dict[int, float], met: bool, ratios: tuple[float, float], mean_ratio: float
) -> None:
    agg = {"random": _row(RANDOM), "epig": _row(GREEDY), STOCHASTIC_EPIG: _row(stochastic)}
    goal = stochastic_goal(agg)
    assert goal["met"] is met
    numbers = goal["numbers"]["Bayes"]
    assert numbers["gain_greedy"] == pytest.approx(0.15) and numbers["ratio"] == pytest.approx(mean_ratio)
    assert [numbers["per_seed"][s]["ratio"] for s in (0, 1)] == pytest.approx(list(ratios))
    assert f"ratio {mean_ratio:.2f} on the mean" in goal["detail"]  # the measured ratio, met or not


def test_the_stochastic_goal_judges_map_on_its_own_and_survives_a_greedy_gain_of_nothing() -> None:
    agg = {
        "random": _row(RANDOM),
        "epig": _row(GREEDY),
        STOCHASTIC_EPIG: _row({0: 0.69, 1: 0.70}, map_shift=-0.05),
    }
    goal = stochastic_goal(agg)
    assert (goal["met"], goal["met_map"]) == (True, False)  # MAP: gains 0.14 and 0.05 of 0.20 and 0.10

    flat = {"random": _row(RANDOM), "epig": _row(RANDOM), STOCHASTIC_EPIG: _row(RANDOM)}
    goal = stochastic_goal(flat)
    assert goal["met"] is True and goal["numbers"]["Bayes"]["ratio"] is None  # 0 >= 0.9 x 0
    assert "undefined (greedy gained nothing)" in goal["detail"]


def _stochastic(finals: dict[int, float], beta: float, share: float) -> dict[str, Any]:
    sd = statistics.stdev(finals.values())
    row = _row(finals)
    row["Bayes.accuracy"]["sd"] = [0.0, 0.0, sd]
    return row | {"beta": beta, "target_share_all": share}


def test_the_beta_sweep_orders_the_stochastic_rows_by_exponent_with_their_share_of_greedy_gain() -> None:
    agg = {
        "random": _row(RANDOM),
        "epig": _row(GREEDY) | {"beta": None},
        STOCHASTIC_EPIG: _stochastic({0: 0.72, 1: 0.72}, 4.0, 0.5),  # gains 0.22 and 0.12 of 0.20 and 0.10
        f"{STOCHASTIC_EPIG}-beta1": _stochastic({0: 0.54, 1: 0.63}, 1.0, 0.4),  # 0.04 and 0.03
    }
    sweep = beta_sweep(agg)
    assert [(s["beta"], s["row"]) for s in sweep] == [
        (1.0, f"{STOCHASTIC_EPIG}-beta1"),
        (4.0, STOCHASTIC_EPIG),
    ]
    one, four = sweep
    assert one["ratio"] == pytest.approx(0.035 / 0.15) and four["ratio"] == pytest.approx(0.17 / 0.15)
    assert one["per_seed"] == pytest.approx({0: 0.2, 1: 0.3}) and four["per_seed"] == pytest.approx(
        {0: 1.1, 1: 1.2}
    )
    assert (four["accuracy"], four["sd"], four["target_share"]) == (pytest.approx(0.72), 0.0, 0.5)
    assert beta_sweep({k: v for k, v in agg.items() if k != "epig"}) == []  # nothing to compare with


def test_goals_are_not_evaluated_without_the_rows_they_compare() -> None:
    agg = {"random": _row(RANDOM), "epig": _row(GREEDY)}
    reached, above, joint, stochastic = goals(agg)
    assert reached["met"] is not None
    assert above == {
        "goal": "EPIG ends above entropy and BALD",
        "met": None,
        "detail": "not evaluated: ['entropy', 'bald'] not run",
    }
    assert joint["met"] is None and "['epig-independent'] not run" in joint["detail"]
    assert stochastic["met"] is None and stochastic["detail"] == "not evaluated: ['epig-stochastic'] not run"
