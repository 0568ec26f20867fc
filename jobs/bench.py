"""`bayescurate bench NAME`: the benchmarks whose figures docs/benchmarks.md reports."""

from __future__ import annotations

from collections.abc import Sequence

from jobs._app import subcommands

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "core": ("jobs.bench_core", "GGN fast path vs per-sample formula; Bayesian overhead of embeddings."),
    "calibration": ("jobs.bench_calibration", "MAP vs Bayesian calibration of the tiny model under shift."),
    "pipeline": ("jobs.bench_pipeline", "Ray embed throughput vs a plain torch loop; memory at scale."),
    "select": ("jobs.bench_select", "Greedy batch selection at ViT-B/32 sizes: fast exact path vs old loop."),
    "active-learning": ("jobs.bench_active_learning", "Accuracy per label of the acquisitions in campaigns."),
    "curate": ("jobs.bench_curate", "curate on synthetic ViT-B/32-sized pools: Ray vs a plain loop, memory."),
    "round": ("jobs.bench_round", "Round latency at ViT-B/32 sizes: labels in -> next batch in Label Studio"),
}


def main(argv: Sequence[str] | None = None) -> int:
    return subcommands(SUBCOMMANDS, argv, "bayescurate bench", what="benchmark")
