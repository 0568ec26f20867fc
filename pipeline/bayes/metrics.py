"""Calibration metrics for class-probability predictions (MATH.md §8): tensors in, floats out.

Every function takes `probs` [N, C] (rows sum to one) and integer `labels` [N]. The predicted class is the
argmax of `probs` and its confidence the max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_BINS = 15
# Probabilities are clamped to at least this before taking logs, so a confidently wrong prediction costs
# log(1/EPS) ≈ 27.6 nats in float64 / float32 instead of infinity.
EPS = 1e-12


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats over the last axis: `H[p] = −Σ_c p_c log p_c`, with `0 log 0 = 0`.

    probs [..., C] -> [...].
    """
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def _check(probs: Tensor, labels: Tensor) -> None:
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [N, C], got {list(probs.shape)}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels has shape {list(labels.shape)} but probs has {probs.shape[0]} rows")
    if probs.shape[0] == 0:
        raise ValueError("probs is empty: metrics need at least one sample")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {probs.shape[1] - 1}], got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose argmax class equals the label."""
    _check(probs, labels)
    return float((probs.argmax(dim=1) == labels).double().mean())


def per_class_recall(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Accuracy within each true class: `recall_c = #{n: y_n = c, argmax p_n = c} / #{n: y_n = c}`.

    probs [N, C], labels [N] -> (recall [C] float64, NaN for a class without samples; counts [C] int64).
    The mean of `recall` weighted by `counts` is `accuracy`; a class the model never gets right has 0 however
    well the others do, which the overall accuracy hides.
    """
    _check(probs, labels)
    c = probs.shape[1]
    counts = torch.bincount(labels, minlength=c)  # [C]
    hits = torch.bincount(labels[probs.argmax(dim=1) == labels], minlength=c)  # [C]
    recall = hits.double() / counts.double()  # 0/0 = NaN for an absent class
    return recall, counts


def nll(probs: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood `−(1/N) Σ_n log p_n[y_n]` in nats (probabilities clamped at `EPS`)."""
    _check(probs, labels)
    picked = probs.gather(1, labels[:, None]).squeeze(1)  # [N]
    return float(-picked.double().clamp_min(EPS).log().mean())


def brier(probs: Tensor, labels: Tensor) -> float:
    """Brier score `(1/N) Σ_n Σ_c (p_nc − 1[y_n = c])²`: summed over classes, averaged over samples.

    Range [0, 2]; some libraries also divide by C, this one does not.
    """
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(torch.float64)  # [N, C]
    return float(((probs.double() - onehot) ** 2).sum(dim=1).mean())


@dataclass(frozen=True)
class Reliability:
    """Per-bin data of a reliability diagram over equal-width confidence bins on [0, 1].

    Bin b covers `(edges[b], edges[b+1]]`; the first bin also includes 0. Empty bins have NaN confidence and
    accuracy and a count of 0.
    """

    bin_edges: Tensor  # [n_bins + 1] float64
    confidence: Tensor  # [n_bins] float64: mean max-probability of the samples in the bin
    accuracy: Tensor  # [n_bins] float64: fraction of them predicted correctly
    counts: Tensor  # [n_bins] int64


def reliability(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> Reliability:
    """Bin samples by confidence `max_c p_nc` into `n_bins` equal-width bins and summarise each bin."""
    _check(probs, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    conf, pred = probs.double().max(dim=1)  # [N], [N]
    correct = (pred == labels).double()  # [N]
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)  # [n_bins + 1]
    # right=False on the inner edges puts a value equal to an edge into the bin that edge closes: (lo, hi].
    index = torch.bucketize(conf, edges[1:-1], right=False)  # [N] in [0, n_bins - 1]
    counts = torch.bincount(index, minlength=n_bins)  # [n_bins]
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    denom = counts.double()
    nan = torch.full((n_bins,), math.nan, dtype=torch.float64)
    return Reliability(
        bin_edges=edges,
        confidence=torch.where(counts > 0, conf_sum / denom.clamp_min(1), nan),
        accuracy=torch.where(counts > 0, acc_sum / denom.clamp_min(1), nan),
        counts=counts,
    )


def ece(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error `Σ_b (n_b / N) |acc_b − conf_b|` over equal-width confidence bins."""
    rel = reliability(probs, labels, n_bins)
    filled = rel.counts > 0
    weight = rel.counts[filled].double() / rel.counts.sum()
    return float((weight * (rel.accuracy[filled] - rel.confidence[filled]).abs()).sum())


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of `values` [N] (ascending), tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    end = counts.cumsum(0).double()  # rank of the last member of each group
    start = end - counts.double() + 1.0  # rank of the first
    return ((start + end) / 2.0)[inverse]


def auroc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of `scores` [N] for separating `positives` [N] (bool) from the rest.

    Mann–Whitney form: `AUROC = (R₊ − n₊(n₊ + 1)/2) / (n₊ n₋)` with `R₊` the sum of the positives' ranks
    among all scores, ties given their average rank; equals P(score₊ > score₋) + ½ P(score₊ = score₋).
    Use it with an uncertainty score and `positives = wrong predictions` for error detection.
    """
    if scores.ndim != 1 or positives.shape != scores.shape:
        raise ValueError(
            f"scores and positives must be 1-D of equal length, got {list(scores.shape)} "
            f"and {list(positives.shape)}"
        )
    positives = positives.bool()
    n_pos = int(positives.sum())
    n_neg = positives.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positives and {n_neg} negatives")
    ranks = _average_ranks(scores.double())  # [N]
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def calibration_report(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> dict[str, float]:
    """Accuracy, NLL, Brier, ECE (with its bin count) and the AUROC of predictive entropy for error detection.

    `auroc_entropy_error` is NaN when every prediction is right (or every one wrong).
    """
    _check(probs, labels)
    p = probs.double()
    wrong = p.argmax(dim=1) != labels
    uncertainty = entropy(p)  # [N]
    n_wrong = int(wrong.sum())
    both = 0 < n_wrong < len(wrong)
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels, n_bins),
        "n_bins": float(n_bins),
        "auroc_entropy_error": auroc(uncertainty, wrong) if both else math.nan,
        "mean_confidence": float(p.max(dim=1).values.mean()),
        "n": float(len(labels)),
    }
