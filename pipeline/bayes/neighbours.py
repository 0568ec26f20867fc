"""Targeted pool selection: the k nearest pool points of each target point under a probabilistic metric.

MATH.md §7 (the paper's kNN step). Both metrics reduce to an ordinary nearest-neighbour search after a
per-point transform, so an exact faiss flat index answers them at scale:
- expected cosine: `⟨μ₁/√E‖x₁‖², μ₂/√E‖x₂‖²⟩` with `E‖x‖² = ‖μ‖² + Σ σ²` — inner product, largest first;
- squared 2-Wasserstein between diagonal Gaussians: `‖μ₁ − μ₂‖² + ‖σ₁ − σ₂‖²` — squared L2 of `[μ, σ]`,
  smallest first.
Small pools use a chunked torch brute force; pools of at least `exact_threshold` points use faiss
(IndexFlatIP / IndexFlatL2, float32). Both are exact and agree up to float32 rounding.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch
from torch import Tensor

# Pool size from which faiss is used; torch brute force below (no index to build, any dtype).
EXACT_THRESHOLD = 20_000


class Metric(str, Enum):
    """Distance between two diagonal Gaussian embeddings."""

    COSINE = "cosine"
    """Expected cosine similarity: inner product of `μ / √(‖μ‖² + Σσ²)` (larger is nearer)."""
    WASSERSTEIN = "wasserstein"
    """Squared 2-Wasserstein distance `‖μ₁ − μ₂‖² + ‖σ₁ − σ₂‖²` (smaller is nearer)."""


def _check(mean: Tensor, var: Tensor, name: str) -> None:
    if mean.ndim != 2 or var.shape != mean.shape:
        raise ValueError(
            f"{name} mean and var must both be [N, D], got {list(mean.shape)} and {list(var.shape)}"
        )
    if (var < 0).any():
        raise ValueError(f"{name} var has negative entries (min {float(var.min()):.3g})")


def embed_for_search(mean: Tensor, var: Tensor, metric: Metric | str) -> Tensor:
    """Map Gaussians to vectors whose inner product (cosine) or squared L2 (wasserstein) is the metric.

    mean [N, D], var [N, D] -> [N, D] for cosine, [N, 2D] for wasserstein.
    """
    metric = Metric(metric)
    if metric is Metric.COSINE:
        second_moment = (mean * mean).sum(dim=1, keepdim=True) + var.sum(dim=1, keepdim=True)  # [N, 1]
        return mean / second_moment.clamp_min(torch.finfo(mean.dtype).tiny).sqrt()
    return torch.cat([mean, var.sqrt()], dim=1)


def _brute_force(pool: Tensor, queries: Tensor, k: int, metric: Metric, chunk_size: int) -> Tensor:
    """Exact top-k over all pool rows, `chunk_size` queries at a time. -> [Nt, k]."""
    out = []
    pool_sq = (pool * pool).sum(dim=1)  # [Np]
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start : start + chunk_size]  # [b, D']
        dots = q @ pool.T  # [b, Np]
        if metric is Metric.COSINE:
            out.append(dots.topk(k, dim=1, largest=True).indices)
        else:
            dist = (q * q).sum(dim=1, keepdim=True) + pool_sq[None, :] - 2.0 * dots  # [b, Np]
            out.append(dist.topk(k, dim=1, largest=False).indices)
    return torch.cat(out, dim=0)


def _faiss(pool: Tensor, queries: Tensor, k: int, metric: Metric) -> Tensor:
    import faiss  # imported here: only large pools need it

    index = faiss.IndexFlatIP(pool.shape[1]) if metric is Metric.COSINE else faiss.IndexFlatL2(pool.shape[1])
    index.add(np.ascontiguousarray(pool.detach().cpu().numpy(), dtype=np.float32))
    _, found = index.search(np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32), k)
    return torch.from_numpy(found).to(torch.long)


def nearest(
    pool_mean: Tensor,
    pool_var: Tensor,
    target_mean: Tensor,
    target_var: Tensor,
    k: int,
    metric: Metric | str = Metric.COSINE,
    exact_threshold: int = EXACT_THRESHOLD,
    chunk_size: int = 1024,
) -> Tensor:
    """Indices of the `k` nearest pool points of each target, nearest first.

    pool_mean, pool_var [Np, D]; target_mean, target_var [Nt, D] -> LongTensor [Nt, k].
    Torch brute force when `Np < exact_threshold`, faiss flat index otherwise.
    """
    metric = Metric(metric)
    _check(pool_mean, pool_var, "pool")
    _check(target_mean, target_var, "target")
    if pool_mean.shape[1] != target_mean.shape[1]:
        raise ValueError(f"pool has dimension {pool_mean.shape[1]} but target has {target_mean.shape[1]}")
    if not 1 <= k <= pool_mean.shape[0]:
        raise ValueError(f"k must lie in [1, {pool_mean.shape[0]}] (the pool size), got {k}")
    pool = embed_for_search(pool_mean, pool_var, metric)  # [Np, D']
    queries = embed_for_search(target_mean, target_var, metric)  # [Nt, D']
    if pool.shape[0] >= exact_threshold:
        return _faiss(pool, queries, k, metric)
    return _brute_force(pool, queries, k, metric, chunk_size)


def candidates(
    pool_mean: Tensor,
    pool_var: Tensor,
    target_mean: Tensor,
    target_var: Tensor,
    k: int,
    metric: Metric | str = Metric.COSINE,
    exact_threshold: int = EXACT_THRESHOLD,
    chunk_size: int = 1024,
) -> Tensor:
    """Sorted unique pool indices that are among the `k` nearest of at least one target. -> LongTensor [M]."""
    found = nearest(pool_mean, pool_var, target_mean, target_var, k, metric, exact_threshold, chunk_size)
    return torch.unique(found.flatten(), sorted=True)
