"""TrainData checks and the held-back split: stable per sample id as labels accumulate."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.data import TrainData, holdout_score, split_holdout
from tests.train import problems


def test_split_is_stable_as_labels_arrive() -> None:
    data = problems.labelled(n=400)
    first = problems.labelled(n=400).take(list(range(150)))
    _, held_all = split_holdout(data, 0.1)
    _, held_first = split_holdout(first, 0.1)
    assert set(held_first.sample_ids) == set(held_all.sample_ids) & set(first.sample_ids)
    assert 20 <= len(held_all) <= 60  # about 10% of 400 (the share is a hash threshold, not a count)
    train, held = split_holdout(data, 0.1)
    assert sorted(train.sample_ids + held.sample_ids) == sorted(data.sample_ids)
    assert not set(train.sample_ids) & set(held.sample_ids)
    # rows keep their tensors
    i = data.sample_ids.index(held.sample_ids[0])
    assert torch.equal(held.acts[0], data.acts[i]) and int(held.labels[0]) == int(data.labels[i])
    # another salt, another split
    _, other = split_holdout(data, 0.1, salt=1)
    assert set(other.sample_ids) != set(held.sample_ids)


def test_small_sets_hold_back_nothing_then_at_least_one() -> None:
    data = problems.labelled(n=40)
    assert len(split_holdout(data.take(list(range(9))), 0.1)[1]) == 0
    assert len(split_holdout(data, 0.0)[1]) == 0
    tiny_share = 1e-9  # no score falls below it: the smallest-score row is held back
    for n in (10, 25, 40):
        rows = data.take(list(range(n)))
        _, held = split_holdout(rows, tiny_share)
        assert held.sample_ids == [min(rows.sample_ids, key=holdout_score)]
    # below min_held held-back rows there is no early stopping at all: every row trains
    _, few = split_holdout(data, 0.1)
    assert len(few) > 0 and len(split_holdout(data, 0.1, min_held=len(few) + 1)[1]) == 0
    assert len(split_holdout(data, 0.1, min_held=len(few))[1]) == len(few)
    with pytest.raises(ValueError, match=r"holdout must be in \[0, 1\), got 1.5"):
        split_holdout(data, 1.5)


def test_train_data_normalises_dtypes_and_names_bad_rows() -> None:
    rows = TrainData(
        torch.ones(3, 4, dtype=torch.float32),
        torch.tensor([0, 1, 2], dtype=torch.int32),
        None,
        ["a", "b", "c"],
    )
    assert rows.acts.dtype == torch.float64 and rows.labels.dtype == torch.long and len(rows) == 3
    with pytest.raises(ValueError, match=r"sample id 'b' appears more than once"):
        TrainData(torch.ones(3, 4), torch.zeros(3, dtype=torch.long), None, ["a", "b", "b"])
    with pytest.raises(ValueError, match=r"got 2 sample ids for 3 rows"):
        TrainData(torch.ones(3, 4), torch.zeros(3, dtype=torch.long), None, ["a", "b"])
    with pytest.raises(ValueError, match=r"labels must be integer class indices"):
        TrainData(torch.ones(3, 4), torch.zeros(3), None, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"offsets have shape \[2, 5\], expected \[3, D\]"):
        TrainData(torch.ones(3, 4), torch.zeros(3, dtype=torch.long), torch.ones(2, 5), ["a", "b", "c"])
    empty = TrainData.empty(4, 5)
    assert len(empty) == 0 and empty.offsets is not None and tuple(empty.offsets.shape) == (0, 5)
