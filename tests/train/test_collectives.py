"""run_refit over several workers: the collectives make them take a single process's steps. The coordinates
are the prior's cached eigenbases, which every worker receives with the prior (pickled from the driver, as
Ray Train does): no worker calls eigh, so one whose eigh would return other signs (as another device or
library may) still works in the driver's coordinates."""

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

    in_workers: list[str] = []

    def flipped_on_rank_1(matrix: Tensor) -> tuple[Tensor, Tensor]:
        values, vectors = eigh(matrix)
        if threading.current_thread().name.startswith("rank-"):
            in_workers.append(threading.current_thread().name)
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
    assert in_workers == []  # the workers used the prior's decomposition


@pytest.mark.parametrize("damping", ["paper", "exact"])
def test_a_pickled_prior_brings_its_eigenbases(damping: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Ray Train worker gets (the objective pickled in `train_loop_config`) has the driver's frame,
    bit for bit, and building the frame there calls no eigh: the workers need not broadcast eigenvectors."""
    import pickle

    from pipeline.train.loop import EigenFrame

    prior = problems.prior(damping=damping).to(torch.float32)  # `to` in the worker then moves it
    objective = Objective(prior, problems.world()[1], problems.SCALE, 0.0)
    driver = EigenFrame.of(objective.to(torch.device("cpu")))
    shipped = pickle.loads(pickle.dumps(objective))

    def no_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
        raise AssertionError("a worker called eigh")

    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    worker = EigenFrame.of(shipped.to(torch.device("cpu")))
    for name in ("U", "V", "S"):
        assert torch.equal(getattr(worker.whiten, name), getattr(driver.whiten, name))
    assert torch.equal(worker.text, driver.text)
