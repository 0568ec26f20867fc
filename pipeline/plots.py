"""The figures users look at (in MLflow and the output folders), rendered to PNG bytes with matplotlib."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from pipeline.bayes import metrics


def _png(fig: object) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return buffer.getvalue()


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_png(results: Mapping[str, torch.Tensor], labels: torch.Tensor, n_bins: int) -> bytes:
    """One reliability diagram per predictive (name -> probabilities [N, C]) against `labels` [N]."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5), squeeze=False)
    for ax, (name, probs) in zip(axes[0], results.items(), strict=True):
        rel = metrics.reliability(probs, labels, n_bins)
        centers = ((rel.bin_edges[1:] + rel.bin_edges[:-1]) / 2).numpy()
        acc = np.nan_to_num(rel.accuracy.numpy())
        ax.bar(centers, acc, width=1.0 / n_bins, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ece = metrics.ece(probs, labels, n_bins)
        ax.set(title=f"{name}: ECE {ece:.3f} ({n_bins} bins)", xlabel="confidence", ylabel="accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left")
    fig.tight_layout()
    return _png(fig)


def curves_png(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> bytes:
    """Lines `series[name]` over `x` (optionally with a shaded (low, high) band per line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, ys in series.items():
        (line,) = ax.plot(list(x)[: len(ys)], list(ys), marker="o", label=name)
        if bands and name in bands:
            low, high = bands[name]
            ax.fill_between(list(x)[: len(low)], list(low), list(high), color=line.get_color(), alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def panels_png(
    x: Sequence[float],
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    xlabel: str,
    title: str,
) -> bytes:
    """One panel per metric (panel name -> {line name -> values over `x`}), side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    for ax, (metric, series) in zip(axes[0], panels.items(), strict=True):
        for name, ys in series.items():
            ax.plot(list(x)[: len(ys)], list(ys), marker="o", label=name)
        ax.set(xlabel=xlabel, ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def histogram_png(
    counts: np.ndarray,
    edges: np.ndarray,
    *,
    title: str,
    xlabel: str,
    marks: Mapping[str, float] | None = None,
) -> bytes:
    """A histogram from counts already binned (the scores of millions of rows, counted part by part), with
    optional vertical lines (e.g. the lowest score that was picked)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    for name, x in (marks or {}).items():
        ax.axvline(x, color="tab:red", linestyle="--", label=name)
    if marks:
        ax.legend(loc="upper right")
    ax.set(title=title, xlabel=xlabel, ylabel="rows")
    ax.set_yscale("log")
    fig.tight_layout()
    return _png(fig)


def shares_png(shares: Mapping[str, Mapping[str, float]], *, title: str, ylabel: str = "share") -> bytes:
    """Grouped bars: for each series (e.g. "picks", "pool") the share of each category (e.g. a domain), or
    any other value in [0, 1] (e.g. each class's recall under "MAP" and "Bayes")."""
    plt = _pyplot()
    categories = sorted({c for values in shares.values() for c in values})
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(categories) + 2), 4))
    width = 0.8 / max(len(shares), 1)
    for i, (name, values) in enumerate(shares.items()):
        x = np.arange(len(categories)) + i * width
        ax.bar(x, [values.get(c, 0.0) for c in categories], width=width, label=name)
    ax.set_xticks(np.arange(len(categories)) + width * (len(shares) - 1) / 2, categories)
    ax.set(title=title, ylabel=ylabel)
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    return _png(fig)
