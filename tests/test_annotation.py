"""The numbers a task carries for people: informativeness as a share of the round's best pick."""

from __future__ import annotations

from pipeline.annotation import TaskRow, informativeness, tab_title


def _row(sid: str, score: float, round_: int = 0) -> TaskRow:
    return TaskRow(sid, round_, 0, "cat", 0.5, {"epig": score, "entropy": 9.0})


def test_informativeness_is_the_score_in_percent_of_the_rounds_best_pick() -> None:
    rows = [_row("a", 0.0002125), _row("b", 0.0001), _row("c", 0.00002125), _row("d", 2e-9)]
    assert informativeness(rows) == {"a": 100.0, "b": 47.1, "c": 10.0, "d": 0.0}
    # It orders the picks exactly as the raw score does (the entropy, a second score, plays no part).
    shares = informativeness(rows)
    assert sorted(shares, key=shares.__getitem__, reverse=True) == ["a", "b", "c", "d"]


def test_each_round_is_measured_against_its_own_best() -> None:
    rows = [_row("a", 0.4, 0), _row("b", 0.1, 0), _row("c", 0.02, 1), _row("d", 0.01, 1)]
    assert informativeness(rows) == {"a": 100.0, "b": 25.0, "c": 100.0, "d": 50.0}


def test_negative_and_all_zero_scores_read_as_zero() -> None:
    # Monte Carlo EPIG can dip below zero; the random baseline scores every pick 0.
    assert informativeness([_row("a", 0.5), _row("b", -0.01)]) == {"a": 100.0, "b": 0.0}
    assert informativeness([_row("a", 0.0), _row("b", 0.0)]) == {"a": 0.0, "b": 0.0}
    assert informativeness([]) == {}


def test_the_tab_is_named_after_the_methods_score() -> None:
    assert tab_title("epig") == "most informative first (epig)"
