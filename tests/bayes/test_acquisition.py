"""Acquisition scores against their plain formulas, and greedy batch selection on a small random BayesHead."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.bayes import kron
from pipeline.bayes.acquisition import (
    HeadDraws,
    Selection,
    bald,
    condition_on_unlabelled,
    entropy,
    epig,
    ggn_root,
    score_pool,
    select_batch,
    select_batch_reference,
)
from pipeline.bayes.curvature import ggn
from pipeline.bayes.head import BayesHead
from pipeline.bayes.kron import KronFactors, KronPosterior

TOL = {"rtol": 1e-12, "atol": 1e-13}


def random_probs(n: int, k: int, c: int, seed: int, sharpness: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(n, k, c, generator=g, dtype=torch.float64), dim=-1)


def plain_entropy(p: list[float]) -> float:
    return -sum(v * math.log(v) for v in p if v > 0)


def test_entropy_matches_formula_and_handles_zeros() -> None:
    probs = random_probs(6, 1, 5, seed=0)[:, 0]
    expected = torch.tensor([plain_entropy(row.tolist()) for row in probs], dtype=torch.float64)
    torch.testing.assert_close(entropy(probs), expected, **TOL)
    # One-hot rows have zero entropy (0 log 0 = 0), uniform rows log C.
    onehot_uniform = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(entropy(onehot_uniform), torch.tensor([0.0, math.log(4)], dtype=torch.float64))


def test_bald_matches_loop_over_draws() -> None:
    probs = random_probs(5, 7, 4, seed=1)
    expected = []
    for n in range(5):
        mean = [sum(float(probs[n, k, c]) for k in range(7)) / 7 for c in range(4)]
        expected_entropy = sum(plain_entropy(probs[n, k].tolist()) for k in range(7)) / 7
        expected.append(plain_entropy(mean) - expected_entropy)
    torch.testing.assert_close(bald(probs), torch.tensor(expected, dtype=torch.float64), **TOL)


def plain_epig(pool: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """EPIG(x) = (1/Nt) Σ_t (H[p̄(y|x)] + H[p̄(y*|x_t)] − H[p(y, y*)]), every sum written out."""
    n_pool, k, c = pool.shape
    n_target, _, c_t = target.shape
    out = []
    for n in range(n_pool):
        pool_mean = [sum(float(pool[n, j, y]) for j in range(k)) / k for y in range(c)]
        total = 0.0
        for t in range(n_target):
            target_mean = [sum(float(target[t, j, y]) for j in range(k)) / k for y in range(c_t)]
            joint = [
                sum(float(pool[n, j, y]) * float(target[t, j, z]) for j in range(k)) / k
                for y in range(c)
                for z in range(c_t)
            ]
            total += plain_entropy(pool_mean) + plain_entropy(target_mean) - plain_entropy(joint)
        out.append(total / n_target)
    return torch.tensor(out, dtype=torch.float64)


def test_epig_matches_plain_formula() -> None:
    pool = random_probs(4, 6, 3, seed=2)
    target = random_probs(5, 6, 3, seed=3)
    torch.testing.assert_close(epig(pool, target), plain_epig(pool, target), **TOL)


def test_epig_chunked_equals_unchunked_and_is_nonnegative() -> None:
    pool = random_probs(37, 16, 5, seed=4)
    target = random_probs(23, 16, 5, seed=5)
    whole = epig(pool, target, chunk_size=1000, target_chunk_size=1000)
    torch.testing.assert_close(epig(pool, target), whole, **TOL)  # automatic chunk size
    for chunk, target_chunk in [(1, 1), (5, 7), (8, 23), (36, 4)]:
        torch.testing.assert_close(
            epig(pool, target, chunk_size=chunk, target_chunk_size=target_chunk), whole, **TOL
        )
    # EPIG is the mutual information of the joint p(y, y*), whose marginals are p̄(y) and p̄(y*): ≥ 0.
    assert whole.min() > -1e-12


def test_epig_of_identical_draws_is_zero() -> None:
    # All draws equal: parameters carry no information, EPIG = 0 (up to rounding).
    pool = random_probs(6, 1, 4, seed=6).expand(6, 10, 4)
    target = random_probs(3, 1, 4, seed=7).expand(3, 10, 4)
    torch.testing.assert_close(epig(pool, target), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)


# ---- with a small BayesHead built from random Kronecker factors ------------------------------------------


def random_posterior(d: int, D: int, seed: int, prior_precision: float) -> KronPosterior:
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(40, d, generator=g, dtype=torch.float64)
    jac = torch.randn(40, D, generator=g, dtype=torch.float64)
    factors = KronFactors(A=acts.T @ acts, B=jac.T @ jac, n=40.0)
    weight = torch.randn(D, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return KronPosterior(factors, weight, prior_precision=prior_precision)


@pytest.fixture
def head() -> BayesHead:
    # Weak prior precision: wide posterior, so the parameters carry plenty of information about labels.
    d, dt, D = 32, 10, 6
    return BayesHead(
        random_posterior(d, D, seed=10, prior_precision=2.0),
        random_posterior(dt, D, seed=11, prior_precision=2.0),
        scale=8.0,
    )


def random_acts(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_joint_draws_make_self_epig_positive_and_independent_draws_do_not(head: BayesHead) -> None:
    acts = random_acts(30, 32, seed=20)
    text = random_acts(4, 10, seed=21)
    k = 64
    pool, target = head.sample_probs([acts, acts], text, k, generator=torch.Generator().manual_seed(0))
    joint = torch.stack([epig(pool[i : i + 1], target[i : i + 1]) for i in range(30)]).squeeze(1)  # [30]
    # Break the pairing: shuffle the draw axis of the target independently per point.
    g = torch.Generator().manual_seed(1)
    shuffled = torch.stack([target[i, torch.randperm(k, generator=g)] for i in range(30)])
    broken = torch.stack([epig(pool[i : i + 1], shuffled[i : i + 1]) for i in range(30)]).squeeze(1)
    # Independent noise per logit (what the published code does): two separate ProbLogits draws.
    logits = head.logits(acts, text)
    pool_ind = logits.sample_probs(k, generator=torch.Generator().manual_seed(2))
    target_ind = logits.sample_probs(k, generator=torch.Generator().manual_seed(3))
    independent = torch.stack([epig(pool_ind[i : i + 1], target_ind[i : i + 1]) for i in range(30)]).squeeze(
        1
    )
    # With shared draws self-EPIG equals the information two labels of x share through θ (≈ BALD scale).
    assert joint.mean() > 5 * broken.mean()
    assert joint.mean() > 5 * independent.mean()
    assert (joint > broken).float().mean() > 0.9


def test_select_batch_invariants(head: BayesHead) -> None:
    pool = random_acts(25, 32, seed=30)
    text = random_acts(4, 10, seed=31)
    targets = random_acts(10, 32, seed=32)
    for method in ("epig", "bald"):
        sel = select_batch(head, pool, text, 6, method=method, target_acts=targets, k=32)
        assert len(sel.indices) == len(sel.scores) == 6
        assert len(set(sel.indices)) == 6
        assert all(0 <= i < 25 for i in sel.indices)
    assert select_batch(head, pool, text, 0, k=8).indices == []
    with pytest.raises(ValueError, match="budget"):
        select_batch(head, pool, text, 26, k=8)


def test_select_batch_is_deterministic_given_the_generator(head: BayesHead) -> None:
    pool = random_acts(20, 32, seed=33)
    text = random_acts(4, 10, seed=34)
    a = select_batch(head, pool, text, 4, k=16, generator=torch.Generator().manual_seed(5))
    b = select_batch(head, pool, text, 4, k=16, generator=torch.Generator().manual_seed(5))
    assert a == b


@pytest.mark.parametrize("method", ["bald", "epig"])
def test_a_pick_lowers_its_near_duplicate_more_than_far_points(head: BayesHead, method: str) -> None:
    # Common random numbers: the same seed before and after the update. This compares like with like only
    # because posterior draws are a smooth function of the factors (symmetric matrix square roots).
    g = torch.Generator().manual_seed(40)
    far = torch.randn(15, 32, generator=g, dtype=torch.float64)
    pick = torch.randn(1, 32, generator=g, dtype=torch.float64)
    twin = pick + 1e-3 * torch.randn(1, 32, generator=g, dtype=torch.float64)
    pool = torch.cat([pick, twin, far])  # [17, 32]: 0 is picked, 1 its near duplicate
    text = random_acts(4, 10, seed=41)
    targets = random_acts(12, 32, seed=42)
    before = score_pool(head, pool, text, method=method, target_acts=targets, k=64, seed=7)
    after_head = condition_on_unlabelled(head, pool[:1], text)
    after = score_pool(after_head, pool, text, method=method, target_acts=targets, k=64, seed=7)
    relative_drop = (before - after) / before  # [17]
    assert relative_drop[1] > relative_drop[2:].max()
    assert relative_drop[1] > 3 * relative_drop[2:].mean().clamp_min(0.01)
    # The conditioned head's image factors grew by exactly one point.
    assert after_head.image.factors.n == head.image.factors.n + 1


# ---- the fast greedy path against the plain loop -----------------------------------------------------------

SCORE_TOL = {"rtol": 1e-10, "atol": 1e-13}  # float64, relative to the plain loop's scores


def small_head(damping: str, likelihood: str = "infonce") -> BayesHead:
    def posterior(d: int, D: int, seed: int) -> KronPosterior:
        post = random_posterior(d, D, seed, prior_precision=2.0)
        return KronPosterior(post.factors, post.weight, 2.0, hessian_scale=3.0, damping=damping)

    bias = -2.0 if likelihood == "siglip" else 0.0
    return BayesHead(posterior(32, 6, 10), posterior(10, 6, 11), scale=8.0, bias=bias, likelihood=likelihood)


def small_world(offsets: bool) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(50)
    return {
        "pool_acts": torch.randn(40, 32, generator=g, dtype=torch.float64),
        "text_acts": torch.randn(4, 10, generator=g, dtype=torch.float64),
        "target_acts": torch.randn(12, 32, generator=g, dtype=torch.float64),
        "pool_offsets": torch.randn(40, 6, generator=g, dtype=torch.float64) if offsets else None,
        "text_offset": torch.randn(4, 6, generator=g, dtype=torch.float64) if offsets else None,
        "target_offsets": torch.randn(12, 6, generator=g, dtype=torch.float64) if offsets else None,
    }


@pytest.mark.parametrize("likelihood", ["infonce", "siglip"])
def test_ggn_root_squares_to_the_ggn_sum(likelihood: str) -> None:
    g = torch.Generator().manual_seed(60)
    sources = 3.0 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    targets = torch.randn(5, 6, generator=g, dtype=torch.float64)
    root = ggn_root(likelihood, sources, targets, 7.0, -1.5)  # [D, M·C]
    assert root.shape == (6, 15)
    expected = ggn(likelihood, sources, targets, 7.0, -1.5)
    torch.testing.assert_close(root @ root.T, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="source row 1 has zero norm"):
        ggn_root(likelihood, torch.stack([sources[0], torch.zeros(6, dtype=torch.float64)]), targets, 7.0)


@pytest.mark.parametrize("offsets", [False, True], ids=["clip", "offsets"])
@pytest.mark.parametrize("method", ["epig", "bald"])
@pytest.mark.parametrize("damping", ["paper", "exact"])
def test_select_batch_reproduces_the_plain_loop(damping: str, method: str, offsets: bool) -> None:
    """Same picks, scores to 1e-10 relative (float64), with and without explicit targets and offsets."""
    head, world = small_head(damping), small_world(offsets)
    for targets in (True, False):
        kwargs = dict(world, method=method, k=16)
        if not targets:
            kwargs.update(target_acts=None, target_offsets=None)
        pool, text = kwargs.pop("pool_acts"), kwargs.pop("text_acts")
        fast = select_batch(
            head, pool, text, 7, generator=torch.Generator().manual_seed(3), chunk_size=9, **kwargs
        )
        ref = select_batch_reference(
            head, pool, text, 7, generator=torch.Generator().manual_seed(3), **kwargs
        )
        assert fast.indices == ref.indices
        torch.testing.assert_close(torch.tensor(fast.scores), torch.tensor(ref.scores), **SCORE_TOL)


@pytest.mark.parametrize("damping", ["paper", "exact"])
def test_select_batch_with_eigen_updates_of_both_factors(
    monkeypatch: pytest.MonkeyPatch, damping: str
) -> None:
    """With every factor carried by eigen-updates (B's rank-C update too), SigLIP: still the plain loop."""
    monkeypatch.setattr(kron, "EIGEN_UPDATE_MAX_RANK", 100)
    head, world = small_head(damping, "siglip"), small_world(offsets=True)
    pool, text = world.pop("pool_acts"), world.pop("text_acts")
    fast = select_batch(head, pool, text, 8, k=16, **world)
    ref = select_batch_reference(head, pool, text, 8, k=16, **world)
    assert fast.indices == ref.indices
    torch.testing.assert_close(torch.tensor(fast.scores), torch.tensor(ref.scores), **SCORE_TOL)


def plain_scores(head: BayesHead, world: dict, method: str, seed: int) -> torch.Tensor:
    """The unchunked scores: one `sample_probs` call for pool and targets, then BALD or EPIG."""
    gen = torch.Generator().manual_seed(seed)
    pool, text, offsets = world["pool_acts"], world["text_acts"], world["pool_offsets"]
    if method == "bald":
        (probs,) = head.sample_probs([pool], text, 16, gen, [offsets], world["text_offset"])
        return bald(probs)
    targets = world["target_acts"] if world["target_acts"] is not None else pool
    target_offsets = world["target_offsets"] if world["target_acts"] is not None else offsets
    probs, probs_target = head.sample_probs(
        [pool, targets], text, 16, gen, [offsets, target_offsets], world["text_offset"]
    )
    return epig(probs, probs_target)


@pytest.mark.parametrize("method", ["epig", "self-epig", "bald"])
@pytest.mark.parametrize("damping", ["paper", "exact"])
def test_score_pool_streams_in_chunks_with_the_unchunked_result(
    monkeypatch: pytest.MonkeyPatch, damping: str, method: str
) -> None:
    head, world = small_head(damping), small_world(offsets=True)
    if method == "self-epig":
        world.update(target_acts=None, target_offsets=None)
    method = method.removeprefix("self-")
    expected = plain_scores(head, world, method, seed=11)
    rows_seen: list[int] = []
    probs = HeadDraws.probs

    def spy(self: HeadDraws, acts: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        rows_seen.append(acts.shape[0])
        return probs(self, acts, offset)

    monkeypatch.setattr(HeadDraws, "probs", spy)
    pool, text = world["pool_acts"], world["text_acts"]
    kwargs = {key: world[key] for key in ("target_acts", "pool_offsets", "text_offset", "target_offsets")}
    for chunk in (1, 7, 1000):
        rows_seen.clear()
        got = score_pool(head, pool, text, method=method, k=16, seed=11, chunk_size=chunk, **kwargs)
        torch.testing.assert_close(got, expected, **SCORE_TOL)
        # the pool (and the targets) never go through the draws more than `chunk` rows at a time
        assert max(rows_seen) == min(chunk, 40)


def test_score_pool_in_float32_agrees_with_the_plain_float32_scores() -> None:
    """float32 weights draw float32 noise (another stream than float64): compare like with like, to 1e-4."""
    head64, world = small_head("paper"), small_world(offsets=True)

    def to32(post: KronPosterior) -> KronPosterior:
        return KronPosterior(post.factors, post.weight.float(), post.prior_precision, post.hessian_scale)

    head = BayesHead(to32(head64.image), to32(head64.text), scale=head64.scale)
    world = {key: None if x is None else x.float() for key, x in world.items()}
    expected = plain_scores(head, world, "epig", seed=2)
    kwargs = {key: world[key] for key in ("target_acts", "pool_offsets", "text_offset", "target_offsets")}
    got = score_pool(head, world["pool_acts"], world["text_acts"], k=16, seed=2, chunk_size=8, **kwargs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_score_pool_and_select_batch_reject_bad_shapes(head: BayesHead) -> None:
    pool, text = random_acts(10, 32, seed=70), random_acts(4, 10, seed=71)
    with pytest.raises(ValueError, match=r"pool offsets has shape \[10, 5\], expected \[10, 6\]"):
        score_pool(head, pool, text, pool_offsets=torch.zeros(10, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"text offset has shape"):
        select_batch(head, pool, text, 2, text_offset=torch.zeros(3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expects \[N, 32\]"):
        score_pool(head, pool[:, :31], text)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        score_pool(head, pool, text, chunk_size=0)


def test_several_picks_per_step_condition_on_all_of_them_before_scoring_again() -> None:
    """`picks_per_step` = m: each step takes the m best, then conditions on all m (an approximation of the
    greedy batch, exact when m = 1); m = budget is the top-`budget` of the first scores."""
    head, world = small_head("paper"), small_world(False)
    pool, text = world["pool_acts"], world["text_acts"]
    kwargs = {"target_acts": world["target_acts"], "k": 16}

    def run(m: int, budget: int = 6) -> Selection:
        gen = torch.Generator().manual_seed(3)
        return select_batch(head, pool, text, budget, generator=gen, picks_per_step=m, **kwargs)

    greedy = select_batch_reference(head, pool, text, 6, generator=torch.Generator().manual_seed(3), **kwargs)
    assert run(1).indices == greedy.indices
    first = run(6)
    scores = score_pool(head, pool, text, seed=_first_seed(3), **kwargs)
    assert first.indices == torch.argsort(scores, descending=True, stable=True)[:6].tolist()
    torch.testing.assert_close(
        torch.tensor(first.scores, dtype=torch.float64), scores[first.indices], **SCORE_TOL
    )
    two = run(2)
    assert two.indices[:2] == first.indices[:2] and len(set(two.indices)) == 6
    # its second step scores under the posterior conditioned on both first picks, merged the dense way
    a = pool[two.indices[:2]]
    emb, _ = head.image_embeddings(a)
    text_mean, _ = head.text_embeddings(text)
    labelled = KronFactors(a.T @ a, ggn(head.likelihood, emb, text_mean, head.scale, head.bias), 2.0)
    conditioned = BayesHead(head.image.update(labelled), head.text, head.scale, head.bias, head.likelihood)
    rescored = score_pool(conditioned, pool, text, seed=_first_seed(3), **kwargs)
    rescored[two.indices[:2]] = -torch.inf
    assert two.indices[2:4] == torch.argsort(rescored, descending=True, stable=True)[:2].tolist()
    torch.testing.assert_close(
        torch.tensor(two.scores[2:4], dtype=torch.float64), rescored[two.indices[2:4]], **SCORE_TOL
    )
    with pytest.raises(ValueError, match="picks_per_step must be >= 1"):
        run(0)


def _first_seed(seed: int) -> int:
    """The seed `select_batch` derives from a generator seeded with `seed` (its draws' seed)."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))


def test_a_float32_head_picks_as_the_float64_one() -> None:
    """`computing_in(float32)`: per-row products in float32 (eigendecompositions stay float64)."""
    world, head64 = small_world(True), small_head("paper")
    pool, text = world.pop("pool_acts"), world.pop("text_acts")
    a = select_batch(head64, pool, text, 5, generator=torch.Generator().manual_seed(1), **world)
    b = select_batch(
        head64.computing_in(torch.float32), pool.float(), text.float(), 5,
        generator=torch.Generator().manual_seed(1),
        **{k: None if v is None else v.float() for k, v in world.items()},
    )  # fmt: skip
    assert a.indices == b.indices
    torch.testing.assert_close(torch.tensor(b.scores), torch.tensor(a.scores), rtol=1e-3, atol=1e-6)
