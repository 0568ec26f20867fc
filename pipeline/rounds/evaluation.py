"""Metrics of a campaign's posterior on its labelled evaluation set: MAP and Bayes side by side, per domain.

MAP is `softmax(s·cos(P a + offset, h_c) + b)` with the posterior's mean projection; Bayes is the probit
predictive of the ProbCosine logits (MATH §5–6) with the posterior's variance. Both come from cached
activations: accuracy, NLL, ECE, Brier (and the rest of `calibration_report`), overall and per value of
the domain column when the evaluation set has one, and the accuracy within each class (its recall), which
shows the classes the labels leave behind where the overall accuracy averages them away.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.bayes import metrics
from pipeline.bayes.head import BayesHead
from pipeline.plots import reliability_png
from pipeline.rounds.data import ModelCache, Rows

N_BINS = 15
REPORTED = ("accuracy", "nll", "ece", "brier")


def predictives(head: BayesHead, cache: ModelCache, rows: Rows) -> dict[str, torch.Tensor]:
    """{"MAP": probs [N, C], "Bayes": probs [N, C]} of the rows under `head`."""
    acts = rows.acts
    logits = head.logits(acts, cache.text_acts, image_offset=rows.offsets, text_offset=cache.text_offset)
    mean_x, _ = head.image_embeddings(acts, rows.offsets)
    mean_y, _ = head.text_embeddings(cache.text_acts, cache.text_offset)
    cos = torch.nn.functional.normalize(mean_x, dim=1) @ torch.nn.functional.normalize(mean_y, dim=1).T
    return {"MAP": torch.softmax(head.scale * cos + head.bias, dim=1), "Bayes": logits.probit()}


def label_indices(rows: Rows, column: str, classes: Sequence[str]) -> torch.Tensor:
    if column not in rows.columns:
        raise ValueError(
            f"the evaluation set has no label column {column!r}; columns: {sorted(rows.columns)}"
        )
    index = {c: i for i, c in enumerate(classes)}
    values = rows.columns[column]
    unknown = sorted({v for v in values if v not in index})
    if unknown:
        raise ValueError(
            f"evaluation labels {unknown[:5]} in column {column!r} are not classes {list(classes)}"
        )
    return torch.tensor([index[v] for v in values], dtype=torch.long)


def evaluate(
    head: BayesHead, cache: ModelCache, rows: Rows, column: str, domain_column: str | None
) -> tuple[dict[str, Any], bytes]:
    """(metrics, reliability diagram PNG): {"MAP": {...}, "Bayes": {...}, "domains": {d: {...}}, "n": N,
    "classes": {class: {"n": images of it, "MAP": recall, "Bayes": recall}}} (classes the set has)."""
    labels = label_indices(rows, column, cache.classes)
    probs = predictives(head, cache, rows)
    out: dict[str, Any] = {"n": len(labels)}
    for name, p in probs.items():
        report = metrics.calibration_report(p, labels, N_BINS)
        out[name] = {k: float(report[k]) for k in (*REPORTED, "mean_confidence")}
    recalls = {name: metrics.per_class_recall(p, labels) for name, p in probs.items()}
    counts = next(iter(recalls.values()))[1]
    out["classes"] = {
        c: {"n": int(counts[i]), **{name: float(r[i]) for name, (r, _) in recalls.items()}}
        for i, c in enumerate(cache.classes)
        if counts[i] > 0
    }
    if domain_column and domain_column in rows.columns:
        domains = rows.columns[domain_column]
        out["domains"] = {}
        for domain in sorted({str(d) for d in domains}):
            mask = torch.tensor([str(d) == domain for d in domains])
            out["domains"][domain] = {
                name: {
                    k: float(v)
                    for k, v in metrics.calibration_report(p[mask], labels[mask], N_BINS).items()
                    if k in REPORTED
                }
                for name, p in probs.items()
            }
    return out, reliability_png(probs, labels, N_BINS)
