"""Calibration metrics against cases worked out by hand and against brute-force formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.bayes.metrics import (
    accuracy,
    auroc,
    brier,
    calibration_report,
    ece,
    nll,
    per_class_recall,
    reliability,
)

# Four samples, three classes.
#   row 0: p = (0.7, 0.2, 0.1), y = 0 -> predicted 0, right,  confidence 0.7
#   row 1: p = (0.1, 0.6, 0.3), y = 2 -> predicted 1, wrong,  confidence 0.6
#   row 2: p = (0.2, 0.2, 0.6), y = 2 -> predicted 2, right,  confidence 0.6
#   row 3: p = (0.05, 0.9, 0.05), y = 1 -> predicted 1, right, confidence 0.9
PROBS = torch.tensor(
    [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.05, 0.9, 0.05]], dtype=torch.float64
)
LABELS = torch.tensor([0, 2, 2, 1])
TOL = {"rtol": 0.0, "atol": 1e-12}


def close(a: float, b: float) -> None:
    assert math.isclose(a, b, rel_tol=0.0, abs_tol=1e-12), (a, b)


def test_accuracy_by_hand() -> None:
    close(accuracy(PROBS, LABELS), 3 / 4)


def test_per_class_recall_by_hand() -> None:
    # class 0: row 0 right (1/1); class 1: row 3 right (1/1); class 2: row 1 wrong, row 2 right (1/2)
    recall, counts = per_class_recall(PROBS, LABELS)
    torch.testing.assert_close(recall, torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64), **TOL)
    assert counts.tolist() == [1, 1, 2]
    close(float((recall * counts).sum() / counts.sum()), accuracy(PROBS, LABELS))
    # A fourth class nobody belongs to: no recall (NaN), not a perfect or a zero one.
    four = torch.cat([PROBS, torch.zeros(4, 1, dtype=torch.float64)], dim=1)
    recall, counts = per_class_recall(four, LABELS)
    assert counts.tolist() == [1, 1, 2, 0] and torch.isnan(recall[3]) and not torch.isnan(recall[:3]).any()


def test_nll_by_hand() -> None:
    # −(log 0.7 + log 0.3 + log 0.6 + log 0.9) / 4
    close(nll(PROBS, LABELS), -(math.log(0.7) + math.log(0.3) + math.log(0.6) + math.log(0.9)) / 4)


def test_brier_sums_classes_and_averages_samples() -> None:
    # row 0: 0.3² + 0.2² + 0.1² = 0.14
    # row 1: 0.1² + 0.6² + 0.7² = 0.86
    # row 2: 0.2² + 0.2² + 0.4² = 0.24
    # row 3: 0.05² + 0.1² + 0.05² = 0.015
    close(brier(PROBS, LABELS), (0.14 + 0.86 + 0.24 + 0.015) / 4)


def test_ece_two_bins_by_hand() -> None:
    # Bins (0, 0.5], (0.5, 1]: all four confidences fall in the second bin.
    # conf = (0.7 + 0.6 + 0.6 + 0.9) / 4 = 0.7, acc = 3/4 -> ECE = |0.75 − 0.7| = 0.05
    close(ece(PROBS, LABELS, n_bins=2), 0.05)


def test_ece_five_bins_by_hand() -> None:
    # Bins of width 0.2: (0.4, 0.6] holds rows 1, 2 (conf 0.6, acc 1/2); (0.6, 0.8] holds row 0 (conf 0.7,
    # acc 1); (0.8, 1] holds row 3 (conf 0.9, acc 1).
    # ECE = 2/4·|0.5 − 0.6| + 1/4·|1 − 0.7| + 1/4·|1 − 0.9| = 0.05 + 0.075 + 0.025 = 0.15
    close(ece(PROBS, LABELS, n_bins=5), 0.15)


def test_reliability_bins_by_hand() -> None:
    rel = reliability(PROBS, LABELS, n_bins=5)
    torch.testing.assert_close(
        rel.bin_edges, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    )
    assert rel.counts.tolist() == [0, 0, 2, 1, 1]
    torch.testing.assert_close(rel.confidence[2:], torch.tensor([0.6, 0.7, 0.9], dtype=torch.float64), **TOL)
    torch.testing.assert_close(rel.accuracy[2:], torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64), **TOL)
    assert torch.isnan(rel.confidence[:2]).all() and torch.isnan(rel.accuracy[:2]).all()


def test_ece_matches_direct_loop_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 7, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 7, (500,), generator=g)
    conf, pred = probs.max(dim=1)
    n_bins = 15
    expected = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(500) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if members:
            acc_b = sum(float(pred[i] == labels[i]) for i in members) / len(members)
            conf_b = sum(float(conf[i]) for i in members) / len(members)
            expected += len(members) / 500 * abs(acc_b - conf_b)
    assert math.isclose(ece(probs, labels, n_bins), expected, rel_tol=1e-12, abs_tol=1e-14)


def test_perfectly_confident_right_predictions() -> None:
    probs = torch.eye(3, dtype=torch.float64)
    labels = torch.arange(3)
    report = calibration_report(probs, labels)
    close(report["accuracy"], 1.0)
    close(report["nll"], 0.0)
    close(report["brier"], 0.0)
    close(report["ece"], 0.0)
    assert math.isnan(report["auroc_entropy_error"])  # no errors to detect


def test_auroc_matches_brute_force_pair_count_with_ties() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (80,), generator=g).double()  # many ties
    positives = torch.rand(80, generator=g) < 0.4
    pos = scores[positives].tolist()
    neg = scores[~positives].tolist()
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert math.isclose(auroc(scores, positives), wins / (len(pos) * len(neg)), rel_tol=1e-12)


def test_auroc_by_hand() -> None:
    # positives scored 0.9, 0.4; negatives 0.4, 0.1. Pairs: (0.9>0.4)=1, (0.9>0.1)=1, (0.4=0.4)=½, (0.4>0.1)=1
    # -> 3.5 / 4
    scores = torch.tensor([0.9, 0.4, 0.4, 0.1])
    positives = torch.tensor([True, True, False, False])
    close(auroc(scores, positives), 3.5 / 4)
    close(auroc(-scores, positives), 0.5 / 4)


def test_calibration_report_error_detection() -> None:
    # Entropies (nats): row 0 ≈ 0.802, row 1 (the wrong one) ≈ 0.898, row 2 ≈ 0.950, row 3 ≈ 0.394.
    # The wrong row outranks rows 0 and 3 but not row 2 -> AUROC = 2/3.
    report = calibration_report(PROBS, LABELS, n_bins=5)
    close(report["auroc_entropy_error"], 2 / 3)
    close(report["ece"], 0.15)
    close(report["n_bins"], 5.0)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        accuracy(PROBS, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.rand(4), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_bins"):
        ece(PROBS, LABELS, n_bins=0)
