"""Targeted pool selection: torch brute force, faiss and the plain per-pair formulas must agree."""

from __future__ import annotations

import pytest
import torch

from pipeline.bayes.neighbours import candidates, nearest


def gaussians(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, d, generator=g, dtype=torch.float64)
    var = torch.rand(n, d, generator=g, dtype=torch.float64) * 0.5 + 0.01
    return mean, var


def brute_force(pool_mean, pool_var, target_mean, target_var, k: int, metric: str) -> torch.Tensor:
    """The per-pair formulas of MATH.md §7 written out, one target and one pool point at a time."""
    rows = []
    for t in range(target_mean.shape[0]):
        mt, vt = target_mean[t], target_var[t]
        dist = []
        for p in range(pool_mean.shape[0]):
            mp, vp = pool_mean[p], pool_var[p]
            if metric == "cosine":
                e_t = (mt @ mt + vt.sum()).sqrt()
                e_p = (mp @ mp + vp.sum()).sqrt()
                dist.append(-float(mt @ mp / (e_t * e_p)))  # larger cosine = nearer
            else:
                dist.append(float(((mt - mp) ** 2).sum() + ((vt.sqrt() - vp.sqrt()) ** 2).sum()))
        rows.append(torch.tensor(dist).argsort()[:k])
    return torch.stack(rows)


@pytest.mark.parametrize("metric", ["cosine", "wasserstein"])
def test_torch_matches_per_pair_formula(metric: str) -> None:
    pool_mean, pool_var = gaussians(120, 6, seed=0)
    target_mean, target_var = gaussians(7, 6, seed=1)
    found = nearest(pool_mean, pool_var, target_mean, target_var, k=5, metric=metric, chunk_size=3)
    assert found.dtype == torch.long and found.shape == (7, 5)
    assert torch.equal(found, brute_force(pool_mean, pool_var, target_mean, target_var, 5, metric))


@pytest.mark.parametrize("metric", ["cosine", "wasserstein"])
def test_faiss_matches_torch(metric: str) -> None:
    pool_mean, pool_var = gaussians(3000, 16, seed=2)
    target_mean, target_var = gaussians(40, 16, seed=3)
    exact = nearest(pool_mean, pool_var, target_mean, target_var, k=8, metric=metric, exact_threshold=10**9)
    index = nearest(pool_mean, pool_var, target_mean, target_var, k=8, metric=metric, exact_threshold=0)
    # Random continuous data: no near-ties at float32 resolution, so the orders agree exactly.
    assert torch.equal(exact, index)


def test_wasserstein_uses_the_variance() -> None:
    # Two pool points with the target's mean: the one with the target's variance is nearer under W2,
    # while expected cosine prefers the smaller variance (larger normalised mean).
    target_mean = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    target_var = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    pool_mean = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    pool_var = torch.tensor([[0.01, 0.01], [0.5, 0.5]], dtype=torch.float64)
    assert nearest(pool_mean, pool_var, target_mean, target_var, 1, "wasserstein").item() == 1
    assert nearest(pool_mean, pool_var, target_mean, target_var, 1, "cosine").item() == 0


def test_candidates_are_the_sorted_union() -> None:
    pool_mean, pool_var = gaussians(200, 5, seed=4)
    target_mean, target_var = gaussians(9, 5, seed=5)
    found = nearest(pool_mean, pool_var, target_mean, target_var, k=4)
    union = candidates(pool_mean, pool_var, target_mean, target_var, k=4)
    assert union.tolist() == sorted(set(found.flatten().tolist()))


def test_bad_inputs_raise() -> None:
    pool_mean, pool_var = gaussians(10, 3, seed=6)
    with pytest.raises(ValueError, match="k must lie"):
        nearest(pool_mean, pool_var, pool_mean, pool_var, k=11)
    with pytest.raises(ValueError, match="dimension"):
        nearest(pool_mean, pool_var, pool_mean[:, :2], pool_var[:, :2], k=1)
    with pytest.raises(ValueError, match="'manhattan'"):
        nearest(pool_mean, pool_var, pool_mean, pool_var, k=1, metric="manhattan")
