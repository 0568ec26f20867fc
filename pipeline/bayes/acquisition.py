"""Acquisition functions over Monte Carlo class probabilities, and greedy batch selection (MATH.md §7).

The scores are pure functions of probability tensors `p_k(y|x)` with shape [N, K, C] (points, joint
posterior draws, classes), as in Bickford Smith et al. (2023), "Prediction-oriented Bayesian active
learning", AISTATS. Logs are taken with `xlogy`, so `0 log 0 = 0` and zero probabilities are safe.

Pool scoring streams: the pool goes through the joint draws `chunk_size` rows at a time and only its
[Np] scores are kept, so memory does not grow with the pool beyond the scores and the inputs. Greedy
selection keeps everything that does not change between its steps (the noise of the joint draws, the
text class embeddings under the text draws) and conditions the image posterior on each pick by exact
low-rank updates (`KronPosterior.update_low_rank`); `select_batch_reference` is the plain loop it
reproduces.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from pipeline.bayes.curvature import Likelihood, ggn
from pipeline.bayes.head import BayesHead
from pipeline.bayes.kron import KronDraws, KronFactors, KronPosterior
from pipeline.bayes.metrics import entropy

# Entries of one block of the EPIG joint `p(y, y*)` when the pool chunk is chosen automatically: 2 MiB in
# float64, so the log pass over it stays in a core's L2 cache (4-5x faster than 50 MiB blocks on 2 cores).
_JOINT_BLOCK = 1 << 18


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


@dataclass(frozen=True)
class _EpigTargets:
    """The target side of EPIG, computed once for any number of pool blocks."""

    flat: Tensor  # p_k(y*|x*) as one [K, Nt·C'] matrix (target-major columns)
    entropy: Tensor  # E_{x*} H[p̄(y*|x*)], a scalar
    n: int  # Nt
    classes: int  # C'

    @classmethod
    def of(cls, probs_target: Tensor) -> _EpigTargets:
        n_target, k, c_t = probs_target.shape
        if n_target == 0:
            raise ValueError("probs_target is empty: EPIG needs at least one target point")
        flat = probs_target.permute(1, 0, 2).reshape(k, n_target * c_t)  # [K, Nt·C']
        return cls(flat, entropy(probs_target.mean(dim=1)).mean(), n_target, c_t)


def _epig(
    probs_pool: Tensor, targets: _EpigTargets, chunk_size: int | None, target_chunk_size: int
) -> Tensor:
    """EPIG of pool probs [Np, K, C] against prepared targets -> [Np] (see `epig`)."""
    n_pool, k, c = probs_pool.shape
    if k != targets.flat.shape[0]:
        raise ValueError(
            f"pool has {k} draws but target has {targets.flat.shape[0]}: "
            "EPIG needs the same joint draws for both"
        )
    t_cols = min(targets.n, target_chunk_size) * targets.classes
    if chunk_size is None:
        chunk_size = max(1, _JOINT_BLOCK // (c * t_cols))
    h_pool = entropy(probs_pool.mean(dim=1))  # [Np]
    tiny = torch.finfo(probs_pool.dtype).tiny
    h_joint = torch.empty(n_pool, dtype=probs_pool.dtype, device=probs_pool.device)  # E_{x*} H[p(y,y*)]
    for start in range(0, n_pool, chunk_size):
        block = probs_pool[start : start + chunk_size]  # [b, K, C]
        b = block.shape[0]
        pool_flat = block.permute(0, 2, 1).reshape(b * c, k)  # [b·C, K]
        acc = torch.zeros(b, dtype=probs_pool.dtype, device=probs_pool.device)
        for t0 in range(0, targets.n * targets.classes, t_cols):
            joint = pool_flat @ targets.flat[:, t0 : t0 + t_cols] / k  # [b·C, t·C']
            # −Σ j log j in place (same as −xlogy(j, j): clamping keeps 0·log 0 = 0 and saves a buffer).
            log_joint = joint.clamp_min(tiny).log_().mul_(joint)
            acc -= log_joint.reshape(b, -1).sum(dim=1)  # [b]
        h_joint[start : start + b] = acc / targets.n
    return h_pool + targets.entropy - h_joint


def epig(
    probs_pool: Tensor,
    probs_target: Tensor,
    *,
    chunk_size: int | None = None,
    target_chunk_size: int = 1024,
) -> Tensor:
    """EPIG `I(y; y* | x, x*)` averaged over the target points x*.

    `EPIG(x) = H[p̄(y|x)] + E_{x*} H[p̄(y*|x*)] − E_{x*} H[p(y, y*)]`, with the joint predictive
    `p(y, y*) = (1/K) Σ_k p_k(y|x) p_k(y*|x*)`: draw k of the pool and of the target must be the SAME
    parameter draw, else the joint factorises and EPIG is only Monte Carlo noise.

    probs_pool [Np, K, C], probs_target [Nt, K, C'] -> [Np]. The joint is a matmul over k per block of
    `chunk_size` pool points and `target_chunk_size` targets, so memory is bounded by
    `chunk_size · C · target_chunk_size · C'` numbers whatever Np and Nt are; by default `chunk_size` makes
    a block about 2^18 numbers, which keeps the log pass in cache.
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
    if (chunk_size is not None and chunk_size < 1) or target_chunk_size < 1:
        raise ValueError(f"chunk sizes must be positive, got {chunk_size} and {target_chunk_size}")
    return _epig(probs_pool, _EpigTargets.of(probs_target), chunk_size, target_chunk_size)


@dataclass(frozen=True)
class Selection:
    """Greedily chosen pool indices, in pick order, with each one's score at the time it was picked."""

    indices: list[int]
    scores: list[float]


# ---- joint posterior draws, streamed over the pool ------------------------------------------------------


def _check_rows(x: Tensor | None, n: int, width: int, what: str) -> None:
    if x is not None and tuple(x.shape) != (n, width):
        raise ValueError(f"{what} has shape {list(x.shape)}, expected [{n}, {width}]")


@dataclass(frozen=True)
class HeadDraws:
    """The `k` joint draws of a head for one image posterior: class probabilities of any image rows.

    `p_k(c | a) = softmax_c(s · ⟨P_k a + o, t̂_kc⟩ / ‖P_k a + o‖ + b)` with the unit class text embeddings
    `t̂_kc = (Q_k t_c + o_c)/‖·‖`. The numerators are one product of the rows with `P_kᵀ t̂_kc` (`dual`,
    formed once per posterior); only the norms need the embeddings themselves (`KronDraws.embeddings`).
    """

    image: KronDraws  # P_k in factored form
    text: Tensor  # t̂_kc   [k, C, D]
    dual: Tensor  # P_kᵀ t̂_kc   [d, k·C]
    scale: float  # s
    bias: float  # b

    def probs(self, acts: Tensor, offset: Tensor | None = None, norms: Tensor | None = None) -> Tensor:
        """`p_k(c | a)` for rows acts [N, d] (offset [N, D]) -> [N, k, C].

        `norms` replaces the exact `‖P_k a + o‖` ([N, k], `O(k·D·d)` a row) by given ones, [N] or [N, k]:
        e.g. the expected norm `√E‖g‖²` (`scoring.Norm.EXPECTED`), shared by the draws (`O(d² + D·d)`).
        """
        k, n_text, dim = self.text.shape
        acts = acts.to(self.dual.dtype)
        numerators = acts @ self.dual  # ⟨P_k a, t̂_kc⟩   [N, k·C]
        if offset is not None:
            numerators = numerators + offset.to(acts.dtype) @ self.text.reshape(k * n_text, dim).T
        if norms is None:
            norms = torch.linalg.vector_norm(self.image.embeddings(acts, offset), dim=-1)  # ‖P_k a + o‖
        elif norms.ndim == 1:
            norms = norms[:, None].expand(-1, k)
        norms = norms.to(numerators.dtype)
        logits = self.scale * (numerators.view(-1, k, n_text) / norms[:, :, None]) + self.bias
        return torch.softmax(logits, dim=-1)  # [N, k, C]


class JointDraws:
    """`k` joint posterior draws of a head whose image posterior may still change (MATH.md §3, §7).

    Holds what a greedy selection keeps between steps: the noise `E` [k, D, d] of the image draws and the
    unit text class embeddings under the text draws `Q_k` [k, C, D] (the text posterior never changes).
    Both come from one generator in the order `BayesHead.sample_probs` uses (image noise, then text), so
    for any image posterior `draw(image).probs` gives the probabilities `sample_probs` would give with that
    seed.
    """

    def __init__(
        self,
        head: BayesHead,
        text_acts: Tensor,
        k: int,
        generator: torch.Generator | None = None,
        text_offset: Tensor | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"number of samples must be >= 1, got {k}")
        head.text.check_acts(text_acts)
        _check_rows(text_offset, text_acts.shape[0], head.dim, "text offset")
        self.scale, self.bias = head.scale, head.bias
        self.noise = head.image.noise(k, generator)  # E of the image draws   [k, D, d]
        text_draws = head.text.draws(head.text.noise(k, generator))
        text = text_draws.embeddings(text_acts, text_offset).transpose(0, 1)  # Q_k t_c + offset   [k, C, D]
        self.text = text / text.norm(dim=-1, keepdim=True)

    @property
    def k(self) -> int:
        """Number of joint draws."""
        return int(self.noise.shape[0])

    def draw(self, image: KronPosterior) -> HeadDraws:
        """The draws for this image posterior: `O(k·D²·d)` for `P_k` (paper), `O(k·C·D·d)` for `dual`."""
        draws = image.draws(self.noise)
        text = self.text.to(draws.left.dtype)
        k, n_text, _ = text.shape
        dual = draws.adjoint(text).reshape(k * n_text, -1).T  # [d, k·C]
        return HeadDraws(draws, text, dual, self.scale, self.bias)

    def scores(
        self,
        image: KronPosterior,
        pool_acts: Tensor,
        *,
        method: Method | str = Method.EPIG,
        target_acts: Tensor | None = None,
        pool_offsets: Tensor | None = None,
        target_offsets: Tensor | None = None,
        chunk_size: int = 256,
    ) -> Tensor:
        """BALD or EPIG of every pool row under these draws of `image` -> [Np], streamed over the pool.

        Target probabilities are computed once; the pool then goes through `chunk_size` rows at a time, so
        memory is `O(chunk_size · k · (D + C))` plus the [Nt, k, C] targets and the [Np] scores. EPIG
        without `target_acts` uses the pool as its own targets (their probabilities are then the pool's,
        [Np, k, C], which are reused rather than computed twice).
        """
        method = Method(method)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        image.check_acts(pool_acts)
        _check_rows(pool_offsets, pool_acts.shape[0], image.factors.D, "pool offsets")
        drawn = self.draw(image)
        scores = torch.empty(pool_acts.shape[0], dtype=drawn.dual.dtype, device=drawn.dual.device)
        if method is Method.BALD:
            for rows in range(0, pool_acts.shape[0], chunk_size):
                part = slice(rows, rows + chunk_size)
                offset = None if pool_offsets is None else pool_offsets[part]
                scores[part] = bald(drawn.probs(pool_acts[part], offset))
            return scores
        self_target = target_acts is None
        targets, target_offsets = (
            (pool_acts, pool_offsets) if target_acts is None else (target_acts, target_offsets)
        )
        image.check_acts(targets)
        _check_rows(target_offsets, targets.shape[0], image.factors.D, "target offsets")
        probs_target = torch.empty(
            targets.shape[0], self.k, self.text.shape[1], dtype=scores.dtype, device=scores.device
        )  # [Nt, k, C]
        for rows in range(0, targets.shape[0], chunk_size):
            part = slice(rows, rows + chunk_size)
            offset = None if target_offsets is None else target_offsets[part]
            probs_target[part] = drawn.probs(targets[part], offset)
        prepared = _EpigTargets.of(probs_target)
        for rows in range(0, pool_acts.shape[0], chunk_size):
            part = slice(rows, rows + chunk_size)
            if self_target:
                probs = probs_target[part]
            else:
                offset = None if pool_offsets is None else pool_offsets[part]
                probs = drawn.probs(pool_acts[part], offset)
            scores[part] = _epig(probs, prepared, None, 1024)
        return scores


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
    chunk_size: int = 256,
) -> Tensor:
    """BALD or EPIG of every pool point from `k` joint posterior draws (generator seeded with `seed`).

    The draws are those of `head.sample_probs` with that seed, shared by pool and targets, so draw k is the
    same parameter draw for both (MATH.md §7). EPIG without `target_acts` uses the pool as its own target
    set. Streamed over the pool `chunk_size` rows at a time (`JointDraws.scores`): memory does not grow
    with Np beyond the scores. pool_acts [Np, d], text_acts [C, dt], target_acts [Nt, d] -> [Np].
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    joint = JointDraws(head, text_acts, k, generator, text_offset)
    return joint.scores(
        head.image,
        pool_acts,
        method=method,
        target_acts=target_acts,
        pool_offsets=pool_offsets,
        target_offsets=target_offsets,
        chunk_size=chunk_size,
    )


# ---- conditioning on picks ------------------------------------------------------------------------------


def ggn_root(
    likelihood: Likelihood | str, sources: Tensor, targets: Tensor, scale: float, bias: float = 0.0
) -> Tensor:
    """A root `L` [D, M·C] of the label-free GGN sum, `L Lᵀ = Σ_b G(x_b)` (MATH.md §1), for a few sources.

    With `J_b = (I − x̂_b x̂_bᵀ)/‖x_b‖`: InfoNCE `G_b = s² J_b Ŷᵀ (diag p_b − p_b p_bᵀ) Ŷ J_b`, and
    `diag p − p pᵀ = R Rᵀ` with `R = diag(√p) − p √pᵀ` (because `I − √p √pᵀ` is a projector when Σp = 1),
    so `L_b = s J_b Ŷᵀ R_b`; SigLIP `L_b = s J_b Ŷᵀ diag(√w_b)`. Column block b is source b's [D, C].
    sources [M, D] (unnormalised), targets [C, D] -> [D, M·C]; memory `O(M·C·(C + D))`, so for the few
    points of a greedy step, where it feeds `KronPosterior.update_low_rank`.
    """
    kind = Likelihood(likelihood)
    if sources.ndim != 2 or targets.ndim != 2 or sources.shape[1] != targets.shape[1]:
        raise ValueError(
            f"sources and targets must be [M, D] and [C, D], got {list(sources.shape)} "
            f"and {list(targets.shape)}"
        )
    norms = sources.norm(dim=1)  # [M]
    if bool((norms == 0).any()):
        raise ValueError(f"source row {int(torch.nonzero(norms == 0)[0, 0])} has zero norm")
    y_hat = targets.to(sources.dtype)
    y_hat = y_hat / y_hat.norm(dim=1, keepdim=True)  # [C, D]
    u = sources / norms[:, None]  # [M, D]
    logits = scale * (u @ y_hat.T)  # [M, C]
    if kind is Likelihood.INFONCE:
        p = torch.softmax(logits, dim=1)
        sqrt_p = p.sqrt()
        root = torch.diag_embed(sqrt_p) - p[:, :, None] * sqrt_p[:, None, :]  # R_b   [M, C, C]
        y_root = torch.einsum("cd,mce->mde", y_hat, root)  # Ŷᵀ R_b   [M, D, C]
    else:
        z = logits + bias
        w = torch.sigmoid(z) * torch.sigmoid(-z)  # [M, C]
        y_root = y_hat.T[None] * w.sqrt()[:, None, :]  # Ŷᵀ diag(√w_b)   [M, D, C]
    j_root = (y_root - u[:, :, None] * (u[:, None, :] @ y_root)) / norms[:, None, None]  # J_b Ŷᵀ R_b
    return scale * j_root.permute(1, 0, 2).reshape(sources.shape[1], -1)  # [D, M·C]


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
    M to n, then rebuilds the head (eigh of both merged factors). No label is needed: the GGN does not
    depend on it.
    """
    text_mean, _ = head.text_embeddings(text_acts, offset=text_offset)  # [C, D]
    embedding, _ = head.image_embeddings(acts, offset=offsets)  # [M, D]
    posterior = head.image
    curvature = ggn(head.likelihood, embedding, text_mean, head.scale, head.bias)  # [D, D]
    # Same model and tower as the posterior's factors: copy their meta so the merge's check passes.
    extra = KronFactors.from_batch(acts, curvature, meta=posterior.factors.meta)
    return head.with_image(posterior.update(extra))


# ---- greedy batch selection -----------------------------------------------------------------------------


def _check_selection(n_pool: int, budget: int, k: int) -> None:
    if not 0 <= budget <= n_pool:
        raise ValueError(f"budget must lie in [0, {n_pool}] (the pool size), got {budget}")
    if k < 1:
        raise ValueError(f"k (number of posterior draws) must be positive, got {k}")


def joint_seed(generator: torch.Generator | None) -> int:
    """The seed of the joint draws that `select_batch` takes from `generator` (so `score_pool` with it
    scores as the greedy batch's first step)."""
    return 0 if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))


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
    chunk_size: int = 256,
    picks_per_step: int = 1,
) -> Selection:
    """Choose `budget` pool points for labelling, greedily, without needing any label (MATH.md §7).

    Each step scores all unpicked pool points (BALD, or EPIG against `target_acts`, or against the pool
    itself when no targets are given), picks the best, and conditions the image posterior on it as if it
    were labelled: its `a aᵀ` and its label-free GGN (§1, against the class text mean embeddings, with the
    head's likelihood, scale and bias) are added to the image-side Kronecker factors with `n += 1`. Points
    that carry the same information as a picked one then score lower, so the batch spreads out.

    The same generator seed is reused at every step, so scores of successive steps differ only through the
    posterior update, not through fresh Monte Carlo noise. What does not change between steps is computed
    once (`JointDraws`: the noise and the text side of the draws); a step draws the image side in factored
    form (`KronPosterior.draws`), streams the pool through it `chunk_size` rows at a time, and conditions by
    `KronPosterior.update_low_rank` (a rank-one eigen-update of A; B re-decomposed). Picks and scores are
    those of `select_batch_reference` (to rounding).

    `picks_per_step` > 1 takes that many of the best-scored points per step before conditioning on all of
    them in one update (A and B re-decomposed once): `picks_per_step` times fewer scoring passes, an
    approximation of the one-at-a-time greedy batch (1, the default, is exact).

    pool_acts [Np, d], text_acts [C, dt] (one row per class prompt), target_acts [Nt, d];
    offsets [N, D] as in `BayesHead`. Returns `Selection(indices, scores)` with `len == budget`.
    """
    return _joined(
        greedy_steps(
            head,
            pool_acts,
            text_acts,
            budget,
            method=method,
            target_acts=target_acts,
            k=k,
            generator=generator,
            pool_offsets=pool_offsets,
            text_offset=text_offset,
            target_offsets=target_offsets,
            chunk_size=chunk_size,
            picks_per_step=picks_per_step,
        )
    )


def greedy_steps(
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
    chunk_size: int = 256,
    picks_per_step: int = 1,
) -> Iterator[Selection]:
    """`select_batch` a step at a time: each step conditions on the previous step's picks, scores the pool
    and yields its own picks (`picks_per_step`, fewer at the end) with their scores, until `budget` are
    picked. The checks and what every step shares (`JointDraws`) are done at the call, so the steps alone
    can be timed (`bench select` times them against `greedy_steps_reference`'s)."""
    method = Method(method)
    _check_selection(pool_acts.shape[0], budget, k)
    if picks_per_step < 1:
        raise ValueError(f"picks_per_step must be >= 1, got {picks_per_step}")
    head.image.check_acts(pool_acts)
    _check_rows(pool_offsets, pool_acts.shape[0], head.dim, "pool offsets")
    joint = JointDraws(
        head, text_acts, k, torch.Generator(device="cpu").manual_seed(joint_seed(generator)), text_offset
    )
    text_mean, _ = head.text_embeddings(text_acts, offset=text_offset)  # GGN targets   [C, D]

    def steps() -> Iterator[Selection]:
        posterior = head.image
        picked: list[int] = []
        while len(picked) < budget:
            step_scores = joint.scores(
                posterior,
                pool_acts,
                method=method,
                target_acts=target_acts,
                pool_offsets=pool_offsets,
                target_offsets=target_offsets,
                chunk_size=chunk_size,
            )  # [Np]
            if picked:
                step_scores[torch.tensor(picked)] = -torch.inf
            take = min(picks_per_step, budget - len(picked))
            order = torch.argsort(step_scores, descending=True, stable=True)[:take]
            picked.extend(int(i) for i in order)
            yield Selection([int(i) for i in order], [float(step_scores[i]) for i in order])
            if len(picked) < budget:
                # Condition on the step's m picks at once: the factors gain Σ a aᵀ and Σ G either way, and
                # one update of rank m is cheaper than m of rank one.
                acts = pool_acts[order]  # [m, d]
                embedding, _ = head.image_embeddings(
                    acts, offset=None if pool_offsets is None else pool_offsets[order]
                )  # the picks' mean embeddings under P̂ (the posterior mean does not move)   [m, D]
                root = ggn_root(head.likelihood, embedding, text_mean, head.scale, head.bias)  # [D, m·C]
                posterior = posterior.update_low_rank(acts, root)

    return steps()


def _joined(steps: Iterator[Selection]) -> Selection:
    picked: list[int] = []
    scores: list[float] = []
    for step in steps:
        picked.extend(step.indices)
        scores.extend(step.scores)
    return Selection(indices=picked, scores=scores)


def select_batch_reference(
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
    """`select_batch` done the plain way: its dense twin, for tests and benchmarks.

    Every step draws `P_k` and `Q_k` in full (`BayesHead.sample_probs`), scores the whole pool at once
    (memory [Np, k, C]) and rebuilds the conditioned posterior by eigh (`condition_on_unlabelled`).
    """
    return _joined(
        greedy_steps_reference(
            head,
            pool_acts,
            text_acts,
            budget,
            method=method,
            target_acts=target_acts,
            k=k,
            generator=generator,
            pool_offsets=pool_offsets,
            text_offset=text_offset,
            target_offsets=target_offsets,
        )
    )


def greedy_steps_reference(
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
) -> Iterator[Selection]:
    """`select_batch_reference` a step at a time, as `greedy_steps` is `select_batch`'s."""
    method = Method(method)
    _check_selection(pool_acts.shape[0], budget, k)
    if target_acts is None:
        target_acts, target_offsets = pool_acts, pool_offsets
    seed = joint_seed(generator)

    def steps(head: BayesHead, target_acts: Tensor, target_offsets: Tensor | None) -> Iterator[Selection]:
        picked: list[int] = []
        for _ in range(budget):
            gen = torch.Generator(device="cpu").manual_seed(seed)
            if method is Method.BALD:
                (probs,) = head.sample_probs([pool_acts], text_acts, k, gen, [pool_offsets], text_offset)
                step_scores = bald(probs)
            else:
                probs, probs_target = head.sample_probs(
                    [pool_acts, target_acts], text_acts, k, gen, [pool_offsets, target_offsets], text_offset
                )
                step_scores = epig(probs, probs_target)
            if picked:
                step_scores[torch.tensor(picked)] = -torch.inf
            best = int(step_scores.argmax())
            picked.append(best)
            yield Selection([best], [float(step_scores[best])])
            if len(picked) < budget:
                offset = None if pool_offsets is None else pool_offsets[best : best + 1]
                head = condition_on_unlabelled(
                    head, pool_acts[best : best + 1], text_acts, offsets=offset, text_offset=text_offset
                )

    return steps(head, target_acts, target_offsets)
