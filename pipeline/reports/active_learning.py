"""The active-learning benchmark's report: `summary.md`, one renderer per section, and `curves.png`.

Both render the JSON document `experiments.active_learning.run` writes as `results.json` (its `config`
there is the JSON of `ActiveLearningConfig`), so a report can be redrawn from a results file alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.experiments.active_learning_analysis import (
    METRICS,
    PREDICTIVES,
    STOCHASTIC_EPIG,
    UNTARGETED,
    labels_to_reach,
)
from pipeline.selection import Acquisition

COLOURS = {
    "random": "#7f7f7f",
    UNTARGETED: "#bcbd22",
    "entropy": "#ff7f0e",
    "bald": "#2ca02c",
    "epig": "#1f77b4",
    STOCHASTIC_EPIG: "#17becf",
    "epig-independent": "#d62728",
}

Doc = dict[str, Any]

# ------------------------------------------------------------------------------------------ the figure


def _plotted(doc: Doc) -> dict[str, Any]:
    """The rows the figure draws: every row but the exponents of the power-sampling sweep (its own table)."""
    return {m: e for m, e in doc["methods"].items() if not m.startswith(f"{STOCHASTIC_EPIG}-beta")}


def _metric_panel(ax: Any, doc: Doc, predictive: str, metric: str, title: str) -> None:
    """One metric against labels, a line per row (band: min-max over seeds); accuracy panels also mark
    random's final accuracy and half of random's labels."""
    agg, target = _plotted(doc), doc["config"]["target_domain"]
    random = agg.get(Acquisition.RANDOM.value)
    for method, entry in agg.items():
        s = entry[f"{predictive}.{metric}"]
        style = "--" if method == UNTARGETED else "-"
        ax.plot(entry["labels"], s["mean"], style, marker="o", ms=3, color=COLOURS.get(method), label=method)
        if len(entry["seeds"]) > 1:
            ax.fill_between(entry["labels"], s["min"], s["max"], color=COLOURS.get(method), alpha=0.15)
    if metric == "accuracy" and random is not None:
        level = random[f"{predictive}.accuracy"]["mean"][-1]
        ax.axhline(level, color="black", lw=0.8, ls=":", label="random's final accuracy")
        ax.axvline(random["labels"][-1] / 2, color="black", lw=0.8, ls="-.", label="half random's labels")
    ax.set(xlabel="labels", ylabel=title, title=f"{predictive}: {title} on the {target} eval set")
    ax.grid(alpha=0.3)
    if metric == "accuracy":  # one legend a row: the colours are the same in every panel
        ax.legend(fontsize=7)


def _per_round(ax: Any, method: str, entry: dict[str, Any], values: list[float]) -> None:
    """One row's line of a value per round (the label count after each round on x)."""
    ax.plot(entry["labels"][1:], values, marker="o", ms=3, color=COLOURS.get(method), label=method)


def _share_panel(ax: Any, doc: Doc) -> None:
    """The target domain's share of each round's picks."""
    for method, entry in _plotted(doc).items():
        _per_round(ax, method, entry, entry["target_share"])
    target = doc["config"]["target_domain"]
    ax.set(xlabel="labels", ylabel="share", ylim=(0, 1.02), title=f"share of the round's picks from {target}")
    ax.grid(alpha=0.3)


def _score_panel(ax: Any, doc: Doc) -> None:
    """The median acquisition score of each round's picks (random picks have none)."""
    for method, entry in _plotted(doc).items():
        if method in (Acquisition.RANDOM.value, UNTARGETED):
            continue
        _per_round(ax, method, entry, entry["median_score"])
    ax.set(
        xlabel="labels", ylabel="nats", yscale="log", title="median acquisition score of the round's picks"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_curves(doc: Doc, path: Path) -> None:
    """Accuracy, NLL and ECE against labels (Bayes above, MAP below; bands: min-max over seeds), the
    target-domain share of each round's picks, and the picks' median acquisition score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = doc["config"]
    fig, axes = plt.subplots(2, 4, figsize=(19, 8.4), squeeze=False)
    for row, p in enumerate(PREDICTIVES):
        for col, (m, title) in enumerate((("accuracy", "accuracy"), ("nll", "NLL"), ("ece", "ECE"))):
            _metric_panel(axes[row][col], doc, p, m, title)
    _share_panel(axes[0][3], doc)
    _score_panel(axes[1][3], doc)
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    fig.suptitle(
        f"Active learning on {cfg['target_domain']} (severity {cfg['severity']}), {cfg['budget']} labels a "
        "round, "
        f"seeds {seeds}: seed mean, band = min-max over seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the summary


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def setup_section(doc: Doc) -> list[str]:
    """The title and one paragraph: the world, the posterior and the campaigns."""
    cfg, world = doc["config"], doc["world"]
    pool = world["embedded"]["pool"]
    return [
        "# Active-learning benchmark",
        "",
        f"Tiny model `{cfg['model']}`, task `{cfg['task']}`. Pool: {cfg['pool_clean']} in-domain images "
        f"({cfg['corrupt']:.0%} made corrupt) and {cfg['pool_per_domain']} per shifted domain "
        f"({', '.join(cfg['pool_domains'])}) at severity {cfg['severity']}; {pool['embedded']} of "
        f"{pool['rows']} embedded, quarantined {pool['quarantined'] or 'none'}. "
        f"Targets: {cfg['num_targets']} "
        f"unlabelled `{cfg['target_domain']}` images; evaluation: {cfg['num_eval']} labelled "
        f"`{cfg['target_domain']}` "
        f"images (other world indices). Posterior fitted on {world['pairs_used']} in-domain pairs "
        f"(λ image {world['prior_precision']['image']:.3g}). {cfg['rounds']} rounds of {cfg['budget']} "
        "labels, "
        f"seeds {cfg['seeds']}, {cfg['draws']} joint draws, oracle labels, local trainer.",
    ]


def final_metrics_section(doc: Doc) -> list[str]:
    """The table of final metrics per row, under the starting posterior's."""
    agg = doc["methods"]
    random = agg.get(Acquisition.RANDOM.value)
    level = random["Bayes.accuracy"]["mean"][-1] if random else None
    lines = [
        "## Final metrics (seed mean ± sd; Bayes = probit predictive of the round's posterior)",
        "",
        "| method | labels | Bayes accuracy | Bayes NLL | Bayes ECE | MAP accuracy | MAP NLL | MAP ECE | "
        "labels to reach random's final accuracy | target-domain share of picks | s per run |",
        "|" + "---|" * 11,
    ]
    base = next(iter(agg.values())) if agg else None
    if base is not None:
        b = {f"{p}.{m}": base[f"{p}.{m}"]["mean"][0] for p in PREDICTIVES for m in METRICS}
        lines.append(
            f"| starting posterior | 0 | {b['Bayes.accuracy']:.3f} | {b['Bayes.nll']:.3f} | "
            f"{b['Bayes.ece']:.3f} | "
            f"{b['MAP.accuracy']:.3f} | {b['MAP.nll']:.3f} | {b['MAP.ece']:.3f} | | | |"
        )
    for method, e in agg.items():
        cells = []
        for p in PREDICTIVES:
            for m in ("accuracy", "nll", "ece"):
                s = e[f"{p}.{m}"]
                cells.append(
                    f"{s['mean'][-1]:.3f} ± {s['sd'][-1]:.3f}" if p == "Bayes" else f"{s['mean'][-1]:.3f}"
                )
        reach = labels_to_reach(e, level) if level is not None else None
        lines.append(
            f"| {method} | {e['labels'][-1]} | "
            + " | ".join(cells)
            + f" | {reach if reach is not None else 'not reached'} "
            f"| {e['target_share_all']:.2f} | {e['seconds_per_run']:.0f} |"
        )
    return lines


def accuracy_section(doc: Doc) -> list[str]:
    """Bayes accuracy after each round, a row per method."""
    agg = doc["methods"]
    lines = ["## Bayes accuracy after each round (seed mean)", ""]
    base = next(iter(agg.values())) if agg else None
    if base is not None:
        lines += [
            "| method | " + " | ".join(str(x) for x in base["labels"]) + " |",
            "|" + "---|" * (len(base["labels"]) + 1),
        ]
        for method, e in agg.items():
            lines.append(
                f"| {method} | " + " | ".join(f"{v:.3f}" for v in e["Bayes.accuracy"]["mean"]) + " |"
            )
    return lines


def goals_section(doc: Doc) -> list[str]:
    """Each goal's verdict (Bayes accuracy; MAP's in brackets) and its numbers; the first goal against
    random over the whole pool, as context."""
    lines = ["## Goals", ""]
    for g in doc["goals"]:
        verdict = {True: "**met**", False: "**not met**", None: "not evaluated"}[g["met"]]
        extra = (
            ""
            if g.get("met_map") is None
            else f" (with MAP accuracy: {'met' if g['met_map'] else 'not met'})"
        )
        lines.append(f"- {g['goal']}: {verdict}{extra}. {g['detail']}.")
    if doc.get("goals_untargeted"):
        g = doc["goals_untargeted"][0]
        verdict = "met" if g["met"] else "not met" if g["met"] is False else "not evaluated"
        lines.append(f"- (context) against random over the whole pool: {verdict}. {g['detail']}.")
    return lines


def sweep_section(doc: Doc) -> list[str]:
    """Stochastic EPIG's final accuracy by power-sampling exponent, against greedy EPIG's gain over
    random; nothing when the run had no sweep."""
    sweep = doc.get("beta_sweep") or []
    if len(sweep) < 2:
        return []
    lines = [
        "## Power sampling: the exponent",
        "",
        "Stochastic EPIG draws each round's picks with P(pick) ∝ EPIG^beta. Its gain in final Bayes accuracy "
        "over random as a share of greedy EPIG's (seed mean; per seed in brackets):",
        "",
        "| beta | row | Bayes accuracy | share of greedy EPIG's gain | target-domain share of picks |",
        "|---|---|---|---|---|",
    ]
    for s in sweep:
        seeds = ", ".join(_fmt(v, 2) for v in s["per_seed"].values())
        lines.append(
            f"| {s['beta']:g} | {s['row']} | {s['accuracy']:.3f} ± {s['sd']:.3f} | {_fmt(s['ratio'], 2)} "
            f"({seeds}) | {s['target_share']:.2f} |"
        )
    return lines


def ray_section(doc: Doc) -> list[str]:
    """The Ray Train campaign against its local twin, or why it did not run."""
    check = doc.get("ray_check")
    lines = ["## Ray Train against the local trainer", ""]
    if check:
        lines.append(
            f"`{check['ray']}` against `{check['local']}`: identical picks in "
            f"{check['rounds_with_identical_picks']} of {check['rounds']} rounds "
            f"({check['picks_differing']} picks differ); largest metric difference "
            f"{check['max_difference']:.2e}; largest projection difference "
            f"{check['max_projection_difference']:.2e}; "
            f"{check['seconds_ray']:.0f} s against {check['seconds_local']:.0f} s."
        )
    else:
        lines.append("Not run (`--no-ray-check`).")
    return lines


def _score_table(diag: dict[str, Any], budget: int) -> list[str]:
    """The candidates, and the spread, seed agreement and top target share of each method's scores."""
    lines = [
        f"The kNN step keeps {diag['candidates']} of {diag['pool']} pool rows; the target domain is "
        f"{diag['target_share_pool']:.0%} of the pool and {diag['target_share_candidates']:.0%} of the "
        "candidates."
    ]
    header = "| score | mean | sd | median | p90 | max | rank corr. seed 0 vs 1 | target share of the top"
    lines += ["", f"{header} {budget} |", "|" + "---|" * 8]
    for name, s in diag["scores"].items():
        sp = s["spread"]
        top = s[f"target_share_top_{budget}"]
        lines.append(
            f"| {name} | {sp['mean']:.2e} | {sp['sd']:.2e} | {sp['p50']:.2e} | {sp['p90']:.2e} | "
            f"{sp['max']:.2e} | "
            f"{s['seed_rank_correlation']:.3f} | {top:.2f} |"
        )
    lines.append(
        f"\nRank correlation of EPIG with joint draws and with independent noise: "
        f"{diag['rank_correlation_epig_joint_vs_independent']:.3f}."
    )
    return lines


def _posterior_tables(diag: dict[str, Any], agg: dict[str, Any], target_domain: str) -> list[str]:
    """The embedding variance per pool domain, and the accuracy (and target picks) per true class."""
    lines = ["", "Mean trace of the image-embedding variance per pool domain:", ""]
    names = sorted(next(iter(diag["embedding_variance"].values())))
    lines += ["| posterior | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for label, v in diag["embedding_variance"].items():
        lines.append(f"| {label} | " + " | ".join(f"{v[n]:.4f}" for n in names) + " |")
    if diag["eval_accuracy_per_class"]:
        classes = list(next(iter(diag["eval_accuracy_per_class"].values())))
        lines += [
            "",
            f"Bayes accuracy per true class on the evaluation set (first seed's last round), and the "
            f"`{target_domain}` picks of each class over the campaign (seed mean):",
            "",
            "| posterior | " + " | ".join(classes) + " |",
            "|" + "---|" * (len(classes) + 1),
        ]
        for label, v in diag["eval_accuracy_per_class"].items():
            picks = agg.get(label, {}).get("target_picks_per_class", {})
            cells = [f"{v[n]:.2f}" + (f" ({picks[n]:.1f})" if n in picks else "") for n in classes]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _picks_summary(agg: dict[str, Any]) -> list[str]:
    """How far each row's last re-fit moved the projection, and the class balance of its picks."""
    lines = ["", "Relative change of the projection after the last round, ‖P* − P̂‖/‖P̂‖ (seed mean):", ""]
    lines.append(", ".join(f"{m} {e['weight_change_final']:.4f}" for m, e in agg.items()) + ".")
    lines += ["", "Class balance of the picks (entropy of their class histogram / log C; seed mean):", ""]
    lines.append(
        ", ".join(
            f"{m} {e['class_balance']['first_half']:.2f} in the first half, "
            f"{e['class_balance']['all']:.2f} in all"
            for m, e in agg.items()
        )
        + "."
    )
    return lines


def diagnostics_section(doc: Doc) -> list[str]:
    """What explains the curves (`active_learning_diagnostics`); nothing when there are none."""
    diag, cfg, agg = doc.get("diagnostics"), doc["config"], doc["methods"]
    if not diag:
        return []
    return [
        "## Diagnostics (starting posterior, round-0 candidates)",
        "",
        *_score_table(diag, cfg["budget"]),
        *_posterior_tables(diag, agg, cfg["target_domain"]),
        *_picks_summary(agg),
    ]


def timing_section(doc: Doc) -> list[str]:
    """How long the run took, and which campaigns were resumed."""
    resumed = doc["resumed_runs"]
    return [
        f"Run time {doc['seconds']:.0f} s (world, posterior and embeddings {doc['world_seconds']:.0f} s); "
        f"the campaigns' own steps took {doc['step_seconds']:.0f} s"
        + (f"; {len(resumed)} campaigns were resumed from an earlier run." if resumed else "."),
    ]


SECTIONS = (
    setup_section,
    final_metrics_section,
    accuracy_section,
    goals_section,
    sweep_section,
    ray_section,
    diagnostics_section,
    timing_section,
)


def summary_markdown(doc: Doc) -> str:
    """`summary.md`: the `SECTIONS`, one blank line between two."""
    lines: list[str] = []
    for section in SECTIONS:
        part = section(doc)
        if part:
            lines += ([""] if lines else []) + part
    return "\n".join(lines) + "\n"
