"""run_refit over several workers: the collectives make them take a single process's steps, even when each
worker's eigh returns its eigenvectors with other signs (as another device or library may)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import Tensor

from pipeline.train import RefitConfig, refit_local
from pipeline.train.loop import Objective, run_refit
from tests.train import problems


class _Group:
    """`n` threads that meet at a barrier for every collective: a process group in one process."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list[Tensor | None] = [None] * n


class _Member:
    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.rank = group, rank

    def _exchange(self, t: Tensor) -> list[Tensor]:
        self.group.slots[self.rank] = t.clone()
        self.group.barrier.wait()
        seen = [s.clone() for s in self.group.slots]  # type: ignore[union-attr]
        self.group.barrier.wait()
        return seen

    def all_sum(self, t: Tensor) -> Tensor:
        return torch.stack(self._exchange(t)).sum(0)

    def broadcast(self, t: Tensor) -> Tensor:
        return self._exchange(t)[0]


def test_workers_whose_eigenvectors_differ_in_sign_take_the_single_process_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eigh = torch.linalg.eigh

    def flipped_on_rank_1(matrix: Tensor) -> tuple[Tensor, Tensor]:
        values, vectors = eigh(matrix)
        if threading.current_thread().name == "rank-1":  # every other eigenvector negated: still exact
            signs = torch.ones(vectors.shape[-1], dtype=vectors.dtype)
            signs[::2] = -1.0
            vectors = vectors * signs
        return values, vectors

    monkeypatch.setattr(torch.linalg, "eigh", flipped_on_rank_1)
    prior = problems.prior(damping="exact")
    data = problems.labelled(n=40, noise=0.2, offsets=True)
    text = problems.world()[1]
    cfg = RefitConfig(max_steps=200, holdout=0.0, tolerance=0.0)
    single = refit_local(prior, text, problems.SCALE, 0.0, data, cfg)

    group, results = _Group(2), [None, None]
    shards = [data.take(list(range(0, 25))), data.take(list(range(25, 40)))]

    def work(rank: int) -> None:
        objective = Objective(prior, text, problems.SCALE, 0.0)
        empty = data.take([])
        results[rank] = run_refit(objective, shards[rank], empty, cfg, _Member(group, rank))

    threads = [threading.Thread(target=work, args=(r,), name=f"rank-{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in results:
        assert result is not None and result.steps_run == single.steps_run == cfg.max_steps
        torch.testing.assert_close(result.weight, single.weight, rtol=0, atol=1e-10)
