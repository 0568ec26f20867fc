"""The active-learning benchmark's numbers: its campaigns' records aggregated over seeds, its goals judged.

Pure functions of the records `active_learning.run_campaign` writes (JSON-shaped dicts): a record holds the
metrics of the starting posterior (`baseline`) and of every round (`rounds`), per predictive (`Bayes`,
`MAP`) and metric. `aggregate` turns the records of one row of the table (a method, or greedy EPIG's
stochastic twin) into seed means, spreads and shares; `goals` judges the benchmark's goals on that table.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.data.synthetic import class_names
from pipeline.selection import Acquisition, SelectionSettings

UNTARGETED = "random-untargeted"  # random over the whole pool, the campaign given no targets
STOCHASTIC_EPIG = "epig-stochastic"  # EPIG campaigns with `batch: stochastic` (power sampling), default beta
DEFAULT_BETA: float = SelectionSettings.model_fields["beta"].default  # a selection's power-sampling exponent
PREDICTIVES = ("Bayes", "MAP")
METRICS = ("accuracy", "nll", "ece", "brier")
STOCHASTIC_SHARE = 0.9  # the stochastic batch keeps at least this share of greedy EPIG's gain over random

Agg = dict[str, dict[str, Any]]  # row of the table -> its aggregate (`aggregate`)


def class_balance(labels: Sequence[str], classes: int) -> float:
    """Entropy of the picks' class histogram over log C: 1 when every class is picked equally often."""
    counts = torch.tensor([labels.count(c) for c in sorted(set(labels))], dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum() / math.log(classes)) if classes > 1 else 1.0


def curve(run: dict[str, Any], predictive: str, metric: str) -> list[float]:
    """The metric at 0 labels (the starting posterior) and after every round."""
    return [run["baseline"][predictive][metric]] + [r[predictive][metric] for r in run["rounds"]]


def labels_of(run: dict[str, Any]) -> list[int]:
    return [0] + [r["labels"] for r in run["rounds"]]


# ------------------------------------------------------------------------------------------ aggregation


def _metric_spread(group: list[dict[str, Any]], predictive: str, metric: str) -> dict[str, list[float]]:
    """Over the seeds of `group`, at each label count: mean, sd, min and max; and each seed's last value."""
    points = list(zip(*(curve(r, predictive, metric) for r in group), strict=True))
    return {
        "mean": [statistics.fmean(v) for v in points],
        "sd": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in points],
        "min": [min(v) for v in points],
        "max": [max(v) for v in points],
        "final": [v[-1] for v in (curve(r, predictive, metric) for r in group)],
    }


def _pick_shares(group: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the picks came from and which classes they were: the target domain's share per round (seed
    mean) and overall, its picks of each true class (seed mean), and the class balance of the picks."""
    target, task = group[0]["target_domain"], group[0]["task"]
    shares = [[r["target_share"] for r in run["rounds"]] for run in group]
    picks = [d for run in group for r in run["rounds"] for d in r["pick_domains"]]
    classes = len(class_names(task))
    half = max(1, len(group[0]["rounds"]) // 2)
    return {
        "target_share": [statistics.fmean(v) for v in zip(*shares, strict=True)],
        "target_share_all": sum(d == target for d in picks) / len(picks) if picks else math.nan,
        "target_picks_per_class": {
            name: sum(
                lab == name and dom == target
                for run in group
                for r in run["rounds"]
                for lab, dom in zip(r["pick_labels"], r["pick_domains"], strict=True)
            )
            / len(group)
            for name in class_names(task)
        },  # target-domain picks of each true class over the whole campaign, seed mean
        "class_balance": {
            "first_half": statistics.fmean(
                class_balance([x for r in run["rounds"][:half] for x in r["pick_labels"]], classes)
                for run in group
            ),
            "all": statistics.fmean(
                class_balance([x for r in run["rounds"] for x in r["pick_labels"]], classes) for run in group
            ),
        },
    }


def aggregate(runs: list[dict[str, Any]]) -> Agg:
    """Per row of the table (local runs): the label axis, and per predictive and metric the mean, sd, min
    and max over seeds at each point; the share of picks from the target domain per round and overall."""
    by_row: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["trainer"] == "local":
            by_row.setdefault(run["row"], []).append(run)
    out: Agg = {}
    for row, group in by_row.items():
        labels = labels_of(group[0])
        if any(labels_of(r) != labels for r in group):
            raise ValueError(f"the seeds of {row} labelled different numbers of samples: {labels}")
        entry: dict[str, Any] = {"labels": labels, "seeds": [r["seed"] for r in group]}
        entry["beta"] = group[0].get("beta")  # a stochastic row's power-sampling exponent, else None
        for p in PREDICTIVES:
            for m in METRICS:
                entry[f"{p}.{m}"] = _metric_spread(group, p, m)
        entry |= _pick_shares(group)
        entry["median_score"] = [
            statistics.fmean(v)
            for v in zip(*([r["scores"]["median"] for r in run["rounds"]] for run in group), strict=True)
        ]
        entry["weight_change_final"] = statistics.fmean(run["rounds"][-1]["weight_change"] for run in group)
        entry["seconds_per_run"] = statistics.fmean(run["seconds"] for run in group)
        out[row] = entry
    return out


# ------------------------------------------------------------------------------------------------ goals


def labels_to_reach(entry: dict[str, Any], level: float, predictive: str = "Bayes") -> int | None:
    """The fewest labels after which the seed-mean accuracy is at least `level` (None: never)."""
    for labels, acc in zip(entry["labels"], entry[f"{predictive}.accuracy"]["mean"], strict=True):
        if acc >= level - 1e-12:
            return int(labels)
    return None


def _final(agg: Agg, row: str, predictive: str = "Bayes") -> float:
    return float(agg[row][f"{predictive}.accuracy"]["mean"][-1])


def _finals(agg: Agg, row: str, predictive: str = "Bayes") -> dict[int, float]:
    """Seed -> final accuracy of `row`."""
    return dict(zip(agg[row]["seeds"], agg[row][f"{predictive}.accuracy"]["final"], strict=True))


def _paired(agg: Agg, a: str, b: str, predictive: str = "Bayes") -> list[float]:
    """Per-seed final accuracy differences a − b (the seeds both ran)."""
    fa, fb = _finals(agg, a, predictive), _finals(agg, b, predictive)
    return [fa[s] - fb[s] for s in fa if s in fb]


def _not_run(agg: Agg, goal: str, *rows: str) -> dict[str, Any] | None:
    """The goal, not evaluated, when a row it needs is not in the table."""
    missing = [m for m in rows if m not in agg]
    return {"goal": goal, "met": None, "detail": f"not evaluated: {missing} not run"} if missing else None


def reach_goal(agg: Agg, baseline: str = Acquisition.RANDOM.value) -> dict[str, Any]:
    """Targeted EPIG reaches `baseline`'s final accuracy (seed mean) with at most half its labels."""
    epig = Acquisition.EPIG.value
    name = f"targeted EPIG reaches {baseline}'s final accuracy with at most half of {baseline}'s labels"
    skipped = _not_run(agg, name, epig, baseline)
    if skipped:
        return skipped
    verdicts, numbers = {}, {}
    for p in PREDICTIVES:
        level = _final(agg, baseline, p)
        final_labels = agg[baseline]["labels"][-1]
        needed = labels_to_reach(agg[epig], level, p)
        verdicts[p] = needed is not None and needed <= final_labels / 2
        numbers[p] = {"level": level, "baseline_labels": final_labels, "epig_labels": needed}
    b = numbers["Bayes"]
    reached = "never" if b["epig_labels"] is None else f"after {b['epig_labels']} labels"
    return {
        "goal": name,
        "met": verdicts["Bayes"],
        "met_map": verdicts["MAP"],
        "numbers": numbers,
        "detail": f"{baseline} ends at {b['level']:.4f} after {b['baseline_labels']} labels; EPIG "
        f"reaches it {reached} (goal: at most {b['baseline_labels'] / 2:g})",
    }


def ends_above_goal(agg: Agg, goal: str, others: Sequence[str]) -> dict[str, Any]:
    """EPIG's final accuracy (seed mean) is above each of `others`'."""
    epig = Acquisition.EPIG.value
    skipped = _not_run(agg, goal, epig, *others)
    if skipped:
        return skipped
    numbers = {
        p: {m: _final(agg, m, p) for m in (epig, *others)} | {
            f"paired {epig} - {m}": _paired(agg, epig, m, p) for m in others
        }
        for p in PREDICTIVES
    }  # fmt: skip
    verdict = {p: all(_final(agg, epig, p) > _final(agg, m, p) for m in others) for p in PREDICTIVES}
    parts = [f"EPIG {_final(agg, epig):.4f}"] + [f"{m} {_final(agg, m):.4f}" for m in others]
    seeds = "; ".join(
        f"per-seed EPIG − {m}: " + ", ".join(f"{d:+.4f}" for d in _paired(agg, epig, m)) for m in others
    )
    return {
        "goal": goal,
        "met": verdict["Bayes"],
        "met_map": verdict["MAP"],
        "numbers": numbers,
        "detail": "final Bayes accuracy " + ", ".join(parts) + f" ({seeds})",
    }


def gain_ratio(stochastic: float, greedy: float) -> float | None:
    """The stochastic batch's accuracy gain over random as a share of greedy EPIG's (None: greedy gained
    exactly nothing)."""
    return None if greedy == 0 else stochastic / greedy


def stochastic_goal(agg: Agg, baseline: str = Acquisition.RANDOM.value) -> dict[str, Any]:
    """Stochastic EPIG keeps at least `STOCHASTIC_SHARE` of greedy EPIG's final accuracy gain over
    `baseline`, per seed and on the seed mean: `gain_stochastic >= 0.9 · gain_greedy` (an inequality, so
    that it is decided even where greedy EPIG gained nothing; the ratio is reported either way)."""
    epig = Acquisition.EPIG.value
    beta = agg.get(STOCHASTIC_EPIG, {}).get("beta") or DEFAULT_BETA
    name = (
        f"stochastic EPIG (power sampling, beta {beta:g}) keeps at least {STOCHASTIC_SHARE:.0%} of greedy "
        f"EPIG's accuracy gain over {baseline} after the last round, per seed and on the mean"
    )
    skipped = _not_run(agg, name, epig, STOCHASTIC_EPIG, baseline)
    if skipped:
        return skipped
    verdicts, numbers = {}, {}
    for p in PREDICTIVES:
        base = _finals(agg, baseline, p)
        greedy = {s: v - base[s] for s, v in _finals(agg, epig, p).items() if s in base}
        stochastic = {s: v - base[s] for s, v in _finals(agg, STOCHASTIC_EPIG, p).items() if s in base}
        seeds = [s for s in greedy if s in stochastic]
        mean_greedy = _final(agg, epig, p) - _final(agg, baseline, p)
        mean_stochastic = _final(agg, STOCHASTIC_EPIG, p) - _final(agg, baseline, p)
        verdicts[p] = bool(seeds) and all(
            stochastic[s] >= STOCHASTIC_SHARE * greedy[s] for s in seeds
        ) and mean_stochastic >= STOCHASTIC_SHARE * mean_greedy  # fmt: skip
        numbers[p] = {
            "gain_greedy": mean_greedy,
            "gain_stochastic": mean_stochastic,
            "ratio": gain_ratio(mean_stochastic, mean_greedy),
            "per_seed": {
                s: {
                    "gain_greedy": greedy[s],
                    "gain_stochastic": stochastic[s],
                    "ratio": gain_ratio(stochastic[s], greedy[s]),
                }
                for s in seeds
            },
        }
    b = numbers["Bayes"]
    per_seed = ", ".join(
        f"seed {s}: {v['gain_stochastic']:+.4f} / {v['gain_greedy']:+.4f} = {_ratio(v['ratio'])}"
        for s, v in b["per_seed"].items()
    )
    return {
        "goal": name,
        "met": verdicts["Bayes"],
        "met_map": verdicts["MAP"],
        "numbers": numbers,
        "detail": f"final Bayes accuracy gain over {baseline}: stochastic {b['gain_stochastic']:+.4f}, "
        f"greedy {b['gain_greedy']:+.4f}, ratio {_ratio(b['ratio'])} on the mean ({per_seed})",
    }


def beta_sweep(agg: Agg, baseline: str = Acquisition.RANDOM.value) -> list[dict[str, Any]]:
    """Every stochastic EPIG row by its exponent: final Bayes accuracy (seed mean and sd), its gain over
    `baseline` as a share of greedy EPIG's (on the mean and per seed), and its picks' target-domain share.
    Empty without greedy EPIG, `baseline` or a stochastic row."""
    epig = Acquisition.EPIG.value
    rows = [(r, e) for r, e in agg.items() if e.get("beta") is not None]
    if epig not in agg or baseline not in agg or not rows:
        return []
    base, greedy = _finals(agg, baseline, "Bayes"), _finals(agg, epig, "Bayes")
    mean_greedy = _final(agg, epig, "Bayes") - _final(agg, baseline, "Bayes")
    out = []
    for row, e in sorted(rows, key=lambda item: item[1]["beta"]):
        finals = _finals(agg, row, "Bayes")
        out.append(
            {
                "row": row,
                "beta": e["beta"],
                "accuracy": _final(agg, row, "Bayes"),
                "sd": e["Bayes.accuracy"]["sd"][-1],
                "ratio": gain_ratio(_final(agg, row, "Bayes") - _final(agg, baseline, "Bayes"), mean_greedy),
                "per_seed": {
                    s: gain_ratio(v - base[s], greedy[s] - base[s])
                    for s, v in finals.items()
                    if s in base and s in greedy
                },
                "target_share": e["target_share_all"],
            }
        )
    return out


def _ratio(x: float | None) -> str:
    return "undefined (greedy gained nothing)" if x is None else f"{x:.2f}"


def goals(agg: Agg, baseline: str = Acquisition.RANDOM.value) -> list[dict[str, Any]]:
    """The goals, each met or not with its numbers (Bayes accuracy, seed means; MAP's verdict too): EPIG
    reaches `baseline`'s final accuracy with half its labels, ends above entropy and BALD, and above
    EPIG with independent noise; stochastic EPIG keeps 90% of greedy EPIG's gain over `baseline`."""
    indep = Acquisition.EPIG_INDEPENDENT.value
    return [
        reach_goal(agg, baseline),
        ends_above_goal(
            agg, "EPIG ends above entropy and BALD", (Acquisition.ENTROPY.value, Acquisition.BALD.value)
        ),
        ends_above_goal(
            agg, "EPIG with joint draws ends above EPIG with independent per-logit noise", (indep,)
        ),
        stochastic_goal(agg, baseline),
    ]
