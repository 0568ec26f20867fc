"""Acquisition functions over Monte Carlo class probabilities, and greedy batch selection (MATH.md §7).

The scores are pure functions of probability tensors `p_k(y|x)` with shape [N, K, C] (points, joint
posterior draws, classes), as in Bickford Smith et al. (2023), "Prediction-oriented Bayesian active
learning", AISTATS. Logs are taken with `xlogy`, so `0 log 0 = 0` and zero probabilities are safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from pipeline.bayes.curvature import ggn
from pipeline.bayes.head import BayesHead
from pipeline.bayes.kron import KronFactors
from pipeline.bayes.metrics import entropy


class Method(str, Enum):
    """Score used by `select_batch`."""

    EPIG = "epig"
    """Expected predictive information gain about predictions on target inputs (needs targets)."""
    BALD = "bald"
    """Mutual information between the label of the point and the parameters."""


def bald(probs: Tensor) -> Tensor:
    """BALD `I(y; θ | x) = H[p̄(y|x)] − (1/K) Σ_k H[p_k(y|x)]` with `p̄ = (1/K) Σ_k p_k`.

    probs [N, K, C] -> [N]. Reference: MATH.md §7; Houlsby et al. (2011); Bickford Smith et al. (2023) eq. 2.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must have shape [N, K, C], got {list(probs.shape)}")
    return entropy(probs.mean(dim=1)) - entropy(probs).mean(dim=1)


def epig(
    probs_pool: Tensor, probs_target: Tensor, *, chunk_size: int = 256, target_chunk_size: int = 1024
) -> Tensor:
    """EPIG `I(y; y* | x, x*)` averaged over the target points x*.

    `EPIG(x) = H[p̄(y|x)] + E_{x*} H[p̄(y*|x*)] − E_{x*} H[p(y, y*)]`, with the joint predictive
    `p(y, y*) = (1/K) Σ_k p_k(y|x) p_k(y*|x*)`: draw k of the pool and of the target must be the SAME
    parameter draw, else the joint factorises and EPIG is only Monte Carlo noise.

    probs_pool [Np, K, C], probs_target [Nt, K, C'] -> [Np]. The joint is a matmul over k per block of
    `chunk_size` pool points and `target_chunk_size` targets, so memory is bounded by
    `chunk_size · C · target_chunk_size · C'` numbers whatever Np and Nt are.
    Reference: MATH.md §7; Bickford Smith et al. (2023), eq. 9 and their `epig_from_probs`.
    """
    if probs_pool.ndim != 3 or probs_target.ndim != 3:
        raise ValueError(
            f"probs_pool and probs_target must be [N, K, C], got {list(probs_pool.shape)} "
            f"and {list(probs_target.shape)}"
        )
    if probs_pool.shape[1] != probs_target.shape[1]:
        raise ValueError(
            f"pool has {probs_pool.shape[1]} draws but target has {probs_target.shape[1]}: "
            "EPIG needs the same joint draws for both"
        )
    if chunk_size < 1 or target_chunk_size < 1:
        raise ValueError(f"chunk sizes must be positive, got {chunk_size} and {target_chunk_size}")
    n_pool, k, c = probs_pool.shape
    n_target, _, c_t = probs_target.shape
    if n_target == 0:
        raise ValueError("probs_target is empty: EPIG needs at least one target point")

    h_pool = entropy(probs_pool.mean(dim=1))  # [Np]
    h_target = entropy(probs_target.mean(dim=1)).mean()  # scalar: E_{x*} H[p̄(y*|x*)]
    # Targets as one [K, Nt·C'] matrix, so that the joint of a pool block is a single matmul.
    target_flat = probs_target.permute(1, 0, 2).reshape(k, n_target * c_t)  # [K, Nt·C']

    tiny = torch.finfo(probs_pool.dtype).tiny
    h_joint = torch.empty(n_pool, dtype=probs_pool.dtype, device=probs_pool.device)  # E_{x*} H[p(y,y*)]
    for start in range(0, n_pool, chunk_size):
        block = probs_pool[start : start + chunk_size]  # [b, K, C]
        b = block.shape[0]
        pool_flat = block.permute(0, 2, 1).reshape(b * c, k)  # [b·C, K]
        acc = torch.zeros(b, dtype=probs_pool.dtype, device=probs_pool.device)
        for t0 in range(0, n_target * c_t, target_chunk_size * c_t):
            joint = pool_flat @ target_flat[:, t0 : t0 + target_chunk_size * c_t] / k  # [b·C, t·C']
            # −Σ j log j in place (same as −xlogy(j, j): clamping keeps 0·log 0 = 0 and saves a buffer).
            log_joint = joint.clamp_min(tiny).log_().mul_(joint)
            acc -= log_joint.reshape(b, -1).sum(dim=1)  # [b]
        h_joint[start : start + b] = acc / n_target
    return h_pool + h_target - h_joint


@dataclass(frozen=True)
class Selection:
    """Greedily chosen pool indices, in pick order, with each one's score at the time it was picked."""

    indices: list[int]
    scores: list[float]


def score_pool(
    head: BayesHead,
    pool_acts: Tensor,
    text_acts: Tensor,
    *,
    method: Method | str = Method.EPIG,
    target_acts: Tensor | None = None,
    k: int = 64,
    seed: int = 0,
    pool_offsets: Tensor | None = None,
    text_offset: Tensor | None = None,
    target_offsets: Tensor | None = None,
) -> Tensor:
    """BALD or EPIG of every pool point from `k` joint posterior draws (generator seeded with `seed`).

    Pool and targets go through ONE `head.sample_probs` call, so draw k is the same parameter draw for
    both (MATH.md §7). EPIG without `target_acts` uses the pool as its own target set.
    pool_acts [Np, d], text_acts [C, dt], target_acts [Nt, d] -> [Np].
    """
    method = Method(method)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if method is Method.BALD:
        (probs_pool,) = head.sample_probs(
            [pool_acts],
            text_acts,
            k,
            generator=generator,
            image_offsets=[pool_offsets],
            text_offset=text_offset,
        )
        return bald(probs_pool)
    if target_acts is None:
        target_acts, target_offsets = pool_acts, pool_offsets
    probs_pool, probs_target = head.sample_probs(
        [pool_acts, target_acts],
        text_acts,
        k,
        generator=generator,
        image_offsets=[pool_offsets, target_offsets],
        text_offset=text_offset,
    )
    return epig(probs_pool, probs_target)


def condition_on_unlabelled(
    head: BayesHead,
    acts: Tensor,
    text_acts: Tensor,
    *,
    offsets: Tensor | None = None,
    text_offset: Tensor | None = None,
) -> BayesHead:
    """The head with the image posterior updated as if the points `acts` [M, d] had been labelled.

    Adds `Σ a aᵀ` to A, the label-free GGN `Σ G(g)` (MATH.md §1, sources = the points' mean image
    embeddings, targets = the class text mean embeddings, the head's likelihood, scale and bias) to B, and
    M to n, then rebuilds the head. No label is needed: the GGN does not depend on it.
    """
    text_mean, _ = head.text_embeddings(text_acts, offset=text_offset)  # [C, D]
    embedding, _ = head.image_embeddings(acts, offset=offsets)  # [M, D]
    posterior = head.image
    curvature = ggn(head.likelihood, embedding, text_mean, head.scale, head.bias)  # [D, D]
    # Same model and tower as the posterior's factors: copy their meta so the merge's check passes.
    extra = KronFactors.from_batch(acts, curvature, meta=posterior.factors.meta)
    return head.with_image(posterior.update(extra))


def select_batch(
    head: BayesHead,
    pool_acts: Tensor,
    text_acts: Tensor,
    budget: int,
    *,
    method: Method | str = Method.EPIG,
    target_acts: Tensor | None = None,
    k: int = 64,
    generator: torch.Generator | None = None,
    pool_offsets: Tensor | None = None,
    text_offset: Tensor | None = None,
    target_offsets: Tensor | None = None,
) -> Selection:
    """Choose `budget` pool points for labelling, greedily, without needing any label (MATH.md §7).

    Each step scores all unpicked pool points (BALD, or EPIG against `target_acts`, or against the pool
    itself when no targets are given), picks the best, and conditions the image posterior on it as if it
    were labelled: its `a aᵀ` and its label-free GGN (§1, against the class text mean embeddings, with the
    head's likelihood, scale and bias) are added to the image-side Kronecker factors with `n += 1`. Points
    that carry the same information as a picked one then score lower, so the batch spreads out.

    The same generator seed is reused at every step, so scores of successive steps differ only through the
    posterior update, not through fresh Monte Carlo noise.

    pool_acts [Np, d], text_acts [C, dt] (one row per class prompt), target_acts [Nt, d];
    offsets [N, D] as in `BayesHead`. Returns `Selection(indices, scores)` with `len == budget`.
    """
    method = Method(method)
    n_pool = pool_acts.shape[0]
    if not 0 <= budget <= n_pool:
        raise ValueError(f"budget must lie in [0, {n_pool}] (the pool size), got {budget}")
    if k < 1:
        raise ValueError(f"k (number of posterior draws) must be positive, got {k}")
    if method is Method.EPIG and target_acts is None:
        target_acts, target_offsets = pool_acts, pool_offsets
    seed = 0 if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))

    picked: list[int] = []
    scores: list[float] = []
    for _ in range(budget):
        step_scores = score_pool(
            head,
            pool_acts,
            text_acts,
            method=method,
            target_acts=target_acts,
            k=k,
            seed=seed,
            pool_offsets=pool_offsets,
            text_offset=text_offset,
            target_offsets=target_offsets,
        )  # [Np]
        if picked:
            step_scores[torch.tensor(picked)] = -torch.inf
        best = int(step_scores.argmax())
        picked.append(best)
        scores.append(float(step_scores[best]))
        if len(picked) < budget:
            offset = None if pool_offsets is None else pool_offsets[best : best + 1]
            head = condition_on_unlabelled(
                head, pool_acts[best : best + 1], text_acts, offsets=offset, text_offset=text_offset
            )
    return Selection(indices=picked, scores=scores)
