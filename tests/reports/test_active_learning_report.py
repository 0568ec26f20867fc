"""The active-learning benchmark's summary, section by section, rendered from a hand-made results document."""

from __future__ import annotations

from typing import Any

from pipeline.experiments.active_learning_analysis import aggregate, goals
from pipeline.reports.active_learning import (
    accuracy_section,
    final_metrics_section,
    goals_section,
    summary_markdown,
)
from tests.experiments.test_active_learning_analysis import BLUR, _run

PICKS = [[(BLUR, "circle"), (BLUR, "square")], [(BLUR, "star"), (BLUR, "cross")]]


def _doc() -> dict[str, Any]:
    runs = [_run("random", 0, [0.5, 0.55, 0.6], PICKS), _run("epig", 0, [0.5, 0.65, 0.7], PICKS)]
    agg = aggregate(runs)
    config = {
        "model": "bayescurate-tiny", "task": "shape", "pool_clean": 40, "corrupt": 0.05,
        "pool_per_domain": 40, "pool_domains": ["noise", "blur"], "severity": 3, "num_targets": 24,
        "target_domain": "blur",
        "num_eval": 64, "rounds": 2, "budget": 2, "seeds": [0], "draws": 8,
    }  # fmt: skip
    world = {
        "embedded": {"pool": {"embedded": 118, "rows": 120, "quarantined": {"corrupt": 2}}},
        "pairs_used": 256,
        "prior_precision": {"image": 12.5},
    }
    return {
        "config": config, "world": world, "runs": runs, "methods": agg, "goals": goals(agg),
        "goals_untargeted": [], "ray_check": None, "diagnostics": None, "world_seconds": 3.0, "seconds": 9.0,
        "resumed_runs": [], "step_seconds": 4.0,
    }  # fmt: skip


def test_the_tables_hold_each_rows_numbers() -> None:
    doc = _doc()
    table = final_metrics_section(doc)
    assert table[4] == "| starting posterior | 0 | 0.500 | 1.000 | 0.100 | 0.400 | 1.000 | 0.100 | | | |"
    # EPIG passes random's final 0.6 after 2 labels; random itself after 4. Both picked only blur.
    assert table[6] == (
        "| epig | 4 | 0.700 ± 0.000 | 1.000 ± 0.000 | 0.100 ± 0.000 | 0.600 | 1.000 | 0.100 | 2 | 1.00 | 10 |"
    )
    assert accuracy_section(doc)[2:] == [
        "| method | 0 | 2 | 4 |",
        "|---|---|---|---|",
        "| random | 0.500 | 0.550 | 0.600 |",
        "| epig | 0.500 | 0.650 | 0.700 |",
    ]


def test_goals_show_both_verdicts_and_untargeted_context() -> None:
    doc = _doc()
    doc["goals"] = [
        {"goal": "a", "met": True, "met_map": False, "detail": "numbers"},
        {"goal": "b", "met": None, "detail": "not evaluated: ['bald'] not run"},
    ]
    doc["goals_untargeted"] = [{"goal": "a", "met": False, "detail": "more numbers"}]
    assert goals_section(doc) == [
        "## Goals",
        "",
        "- a: **met** (with MAP accuracy: not met). numbers.",
        "- b: not evaluated. not evaluated: ['bald'] not run.",
        "- (context) against random over the whole pool: not met. more numbers.",
    ]


def test_the_summary_joins_its_sections_and_leaves_out_missing_diagnostics() -> None:
    text = summary_markdown(_doc())
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == [
        "# Active-learning benchmark",
        "## Final metrics (seed mean ± sd; Bayes = probit predictive of the round's posterior)",
        "## Bayes accuracy after each round (seed mean)",
        "## Goals",
        "## Ray Train against the local trainer",
    ]
    assert "Not run (`--no-ray-check`).\n\nRun time 9 s (world, posterior and embeddings 3 s)" in text
    assert text.endswith("the campaigns' own steps took 4 s.\n") and "\n\n\n" not in text
