"""Batch acquisition: Gumbel-top-k against the sequential sampler it replaces, keys that depend on (seed,
sample id) only, TopN against a full sort, and near-duplicate removal against a plain double loop."""

from __future__ import annotations

import functools
import hashlib
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.bayes.batches import (
    GREEDY_MAX_BUDGET,
    BatchMode,
    TopN,
    batch_keys,
    default_mode,
    drop_near_duplicates,
    row_gumbels,
    row_uniforms,
)
from pipeline.bayes.neighbours import embed_for_search

# ---- the sampler's distribution -------------------------------------------------------------------------

IDS = [f"row-{i}" for i in range(6)]
SCORES = np.array([0.4, 0.7, 1.0, 1.3, 1.9, 2.6])
PICKS = 3
N_SEEDS = 20_000
P_MIN = 1e-4  # chi-square p-value below which the sampler is rejected (deterministic seeds: no flakiness)
N_SE = 5.0  # each frequency within this many standard errors of its exact probability


def sequential_subset_probs(weights: np.ndarray, n: int) -> dict[frozenset[int], float]:
    """Exact law of the unordered set drawn by n sequential picks without replacement, P ∝ weight."""
    probs: dict[frozenset[int], float] = {}
    for order in itertools.permutations(range(len(weights)), n):
        p, left = 1.0, float(weights.sum())
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        probs[frozenset(order)] = probs.get(frozenset(order), 0.0) + p
    return probs


@functools.cache
def drawn_orders(beta: float) -> np.ndarray:
    """The batch of each seed 0..N_SEEDS-1, best key first. -> [N_SEEDS, PICKS]."""
    out = np.empty((N_SEEDS, PICKS), dtype=np.int64)
    for seed in range(N_SEEDS):
        keys, clamped = batch_keys(SCORES, IDS, BatchMode.STOCHASTIC, beta=beta, seed=seed)
        assert clamped == 0
        out[seed] = np.argsort(-keys, kind="stable")[:PICKS]
    return out


def check_frequencies(counts: np.ndarray, probs: np.ndarray) -> None:
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    total = counts.sum()
    assert stats.chisquare(counts, probs * total).pvalue > P_MIN
    se = np.sqrt(probs * (1 - probs) / total)
    assert np.all(np.abs(counts / total - probs) <= N_SE * se), (counts / total, probs)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_gumbel_top_k_draws_subsets_like_sequential_sampling_without_replacement(beta: float) -> None:
    exact = sequential_subset_probs(SCORES**beta, PICKS)
    assert len(exact) == math.comb(len(IDS), PICKS)
    subsets = list(exact)
    index = {s: i for i, s in enumerate(subsets)}
    counts = np.zeros(len(subsets))
    for row in drawn_orders(beta):
        counts[index[frozenset(row.tolist())]] += 1
    check_frequencies(counts, np.array([exact[s] for s in subsets]))


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_first_pick_is_drawn_proportional_to_score_to_the_beta(beta: float) -> None:
    counts = np.bincount(drawn_orders(beta)[:, 0], minlength=len(IDS))
    check_frequencies(counts, SCORES**beta / (SCORES**beta).sum())


def test_beta_zero_is_a_uniform_random_batch() -> None:
    orders = drawn_orders(0.0)
    check_frequencies(np.bincount(orders[:, 0], minlength=len(IDS)), np.full(len(IDS), 1 / len(IDS)))
    subsets = {frozenset(s): i for i, s in enumerate(itertools.combinations(range(len(IDS)), PICKS))}
    counts = np.bincount([subsets[frozenset(r.tolist())] for r in orders], minlength=len(subsets))
    check_frequencies(counts, np.full(len(subsets), 1 / len(subsets)))


def test_very_large_beta_is_top_k() -> None:
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.geomspace(0.1, 10.0, 50))  # log gaps 0.094: 940 at β = 1e4, Gumbels ≲ 40
    ids = [f"img-{i}" for i in range(50)]
    top, _ = batch_keys(scores, ids, BatchMode.TOP_K)
    expected = set(np.argsort(-top)[:10].tolist())
    for seed in range(50):
        keys, _ = batch_keys(scores, ids, BatchMode.STOCHASTIC, beta=1e4, seed=seed)
        assert set(np.argsort(-keys)[:10].tolist()) == expected


# ---- row randomness -------------------------------------------------------------------------------------


def test_row_uniforms_are_the_documented_hash_and_uniform_in_the_open_interval() -> None:
    ids = [f"shard-{i % 7}/img-{i:06d}.jpg" for i in range(20_000)] + ["", "é-ünïcode-✓"]
    u = row_uniforms(ids, seed=3)
    assert u.dtype == np.float64 and u.shape == (len(ids),)
    assert np.all((u > 0) & (u < 1))
    for i in (0, 1, 17, len(ids) - 2, len(ids) - 1):  # the formula written out, exactly
        digest = hashlib.blake2b(ids[i].encode("utf-8"), digest_size=8, key=(3).to_bytes(16, "little"))
        assert u[i] == ((int.from_bytes(digest.digest(), "little") >> 12) + 0.5) / 2**52
    assert stats.kstest(u, "uniform").pvalue > P_MIN
    g = row_gumbels(ids, seed=3)
    np.testing.assert_array_equal(g, -np.log(-np.log(u)))
    # Standard Gumbel: mean is Euler's γ, standard deviation π/√6; within 5 standard errors.
    assert abs(g.mean() - np.euler_gamma) < N_SE * (math.pi / math.sqrt(6)) / math.sqrt(len(g))


def test_row_uniforms_depend_on_seed_and_id_only() -> None:
    ids = [f"img-{i}" for i in range(500)]
    u = row_uniforms(ids, seed=11)
    perm = np.random.default_rng(1).permutation(len(ids))
    np.testing.assert_array_equal(row_uniforms([ids[i] for i in perm], seed=11), u[perm])
    np.testing.assert_array_equal(row_uniforms(ids[100:200], seed=11), u[100:200])
    assert np.all(row_uniforms(ids, seed=12) != u)
    assert np.all(row_uniforms(ids, seed=-11) != u)
    with pytest.raises(ValueError, match="seed"):
        row_uniforms(ids, seed=2**200)


def test_batch_keys_are_power_sampling_keys_and_the_same_in_any_partition() -> None:
    rng = np.random.default_rng(2)
    n_rows, n = 1000, 50
    ids = [f"img/{i:05d}.jpg" for i in range(n_rows)]
    scores = rng.gamma(2.0, 1.0, n_rows)
    keys, _ = batch_keys(scores, ids, "stochastic", beta=1.5, seed=7)
    np.testing.assert_array_equal(keys, 1.5 * np.log(scores) + row_gumbels(ids, 7))
    whole = TopN(n)
    whole.add(keys, ids, np.arange(n_rows))
    reference = whole.result()
    for trial in range(5):
        perm = rng.permutation(n_rows)
        cuts = np.sort(rng.choice(np.arange(1, n_rows), size=trial + 3, replace=False))
        parts = []
        for block in np.split(perm, cuts):
            block_keys, _ = batch_keys(scores[block], [ids[i] for i in block], "stochastic", beta=1.5, seed=7)
            part = TopN(n)
            part.add(block_keys, [ids[i] for i in block], block)
            parts.append(part)
        merged = functools.reduce(TopN.merge, [parts[i] for i in rng.permutation(len(parts))])
        got = merged.result()
        np.testing.assert_array_equal(got[0], reference[0])
        assert got[1] == reference[1]
        np.testing.assert_array_equal(got[2], reference[2])
    other_keys, _ = batch_keys(scores, ids, "stochastic", beta=1.5, seed=8)
    other = TopN(n)
    other.add(other_keys, ids, np.arange(n_rows))
    assert set(other.result()[1]) != set(reference[1])


# ---- scores: floor, validation, modes -------------------------------------------------------------------


def test_floor_clamps_and_counts_non_positive_and_tiny_scores() -> None:
    scores = np.array([0.0, -1.0, 1e-15, 0.5, 2.0])
    ids = [f"r{i}" for i in range(5)]
    keys, clamped = batch_keys(scores, ids, BatchMode.STOCHASTIC, beta=2.0, seed=4, floor=1e-12)
    assert clamped == 3
    expected = 2.0 * np.log(np.array([1e-12, 1e-12, 1e-12, 0.5, 2.0])) + row_gumbels(ids, 4)
    np.testing.assert_array_equal(keys, expected)
    assert batch_keys(scores, ids, BatchMode.STOCHASTIC, floor=1e-16)[1] == 2
    top, clamped = batch_keys(scores, ids, BatchMode.TOP_K)
    np.testing.assert_array_equal(top, scores)
    assert clamped == 0


def test_non_finite_scores_and_bad_arguments_raise() -> None:
    ids = [f"r{i}" for i in range(4)]
    with pytest.raises(ValueError, match="2 of 4 scores are not finite"):
        batch_keys(np.array([1.0, np.nan, np.inf, 0.5]), ids, BatchMode.STOCHASTIC)
    with pytest.raises(ValueError, match="1 of 4 scores are NaN"):
        batch_keys(np.array([1.0, np.nan, 2.0, 0.5]), ids, BatchMode.TOP_K)
    good = np.ones(4)
    with pytest.raises(ValueError, match="greedy"):
        batch_keys(good, ids, BatchMode.GREEDY)
    for beta in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="beta"):
            batch_keys(good, ids, BatchMode.STOCHASTIC, beta=beta)
    with pytest.raises(ValueError, match="floor"):
        batch_keys(good, ids, BatchMode.STOCHASTIC, floor=0.0)
    with pytest.raises(ValueError, match="one sample id per row"):
        batch_keys(good, ids[:3], BatchMode.STOCHASTIC)
    with pytest.raises(ValueError):
        batch_keys(good, ids, "softmax")


def test_default_mode_is_greedy_up_to_the_limit_then_stochastic() -> None:
    assert default_mode(1) is BatchMode.GREEDY
    assert default_mode(GREEDY_MAX_BUDGET) is BatchMode.GREEDY
    assert default_mode(GREEDY_MAX_BUDGET + 1) is BatchMode.STOCHASTIC
    assert BatchMode("top-k") is BatchMode.TOP_K
    with pytest.raises(ValueError, match="budget"):
        default_mode(-1)


# ---- TopN -----------------------------------------------------------------------------------------------


def full_sort(keys: np.ndarray, ids: list[str], rows: np.ndarray, n: int) -> list[int]:
    return sorted(range(len(keys)), key=lambda i: (-keys[i], ids[i], rows[i]))[:n]


def assert_result(top: TopN, keys: np.ndarray, ids: list[str], rows: np.ndarray, n: int) -> None:
    expected = full_sort(keys, ids, rows, n)
    got_keys, got_ids, got_rows = top.result()
    assert len(top) == len(expected)
    np.testing.assert_array_equal(got_keys, keys[expected])
    assert got_ids == [ids[i] for i in expected]
    np.testing.assert_array_equal(got_rows, rows[expected])


@pytest.mark.parametrize("n", [0, 1, 7, 60, 300, 500])
def test_top_n_matches_a_full_sort_with_ties_in_any_blocking_and_merge_order(n: int) -> None:
    rng = np.random.default_rng(n)
    m = 300
    keys = rng.integers(-2, 3, size=m).astype(np.float64)  # 5 values: many ties, broken by sample id
    keys[rng.choice(m, 4, replace=False)] = [np.inf, -np.inf, np.inf, -np.inf]
    ids = [f"{rng.integers(10**6):06d}-{i}" for i in range(m)]
    rows = rng.permutation(m).astype(np.int64) + 10**9
    top = TopN(n)
    starts = np.sort(rng.choice(np.arange(1, m), size=12, replace=False))
    for block in np.split(rng.permutation(m), starts):
        top.add(keys[block], [ids[i] for i in block], rows[block])
        assert len(top) <= n
    assert_result(top, keys, ids, rows, n)

    thirds = np.split(rng.permutation(m), [90, 200])
    a, b, c = TopN(n), TopN(n), TopN(n)
    for part, block in zip((a, b, c), thirds, strict=True):
        part.add(keys[block], [ids[i] for i in block], rows[block])
    before = a.result()
    for merged in (a.merge(b).merge(c), a.merge(b.merge(c)), c.merge(a).merge(b), b.merge(c.merge(a))):
        assert_result(merged, keys, ids, rows, n)
    np.testing.assert_array_equal(a.result()[2], before[2])  # merge leaves its operands alone
    assert_result(a.merge(TopN(n)), keys[thirds[0]], [ids[i] for i in thirds[0]], rows[thirds[0]], n)


def test_top_n_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="n must be"):
        TopN(-1)
    with pytest.raises(ValueError, match="cannot merge"):
        TopN(3).merge(TopN(4))
    with pytest.raises(ValueError, match="1 of 2 keys are NaN"):
        TopN(3).add(np.array([1.0, np.nan]), ["a", "b"], np.array([0, 1]))
    with pytest.raises(ValueError, match="alike"):
        TopN(3).add(np.array([1.0, 2.0]), ["a"], np.array([0, 1]))
    empty = TopN(5).result()
    assert empty[0].shape == (0,) and empty[1] == [] and empty[2].shape == (0,)


# ---- near-duplicates ------------------------------------------------------------------------------------


def planted(m: int, dim: int, copies: int, seed: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Expected-cosine vectors [m, dim] of random Gaussians, with `copies` near-copies placed right after
    their source (so they fall inside any prefix the walk reaches). Returns the vectors and (source, copy)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(m, dim, generator=g, dtype=torch.float64)
    var = torch.rand(m, dim, generator=g, dtype=torch.float64) * 0.01
    sources = torch.randperm(m - 1, generator=g)[:copies].sort().values
    pairs = []
    for s in sources.tolist():
        if s - 1 in [p for p, _ in pairs]:  # the row after s is already a copy of s - 1
            continue
        mean[s + 1] = mean[s] + 0.02 * torch.randn(dim, generator=g, dtype=torch.float64)
        pairs.append((s, s + 1))
    return embed_for_search(mean, var, "cosine").numpy(), pairs


def brute_force(vectors: np.ndarray, n: int, threshold: float) -> tuple[list[int], list[int]]:
    """The walk written out with Python floats, one pair at a time."""
    rows = vectors.tolist()
    kept: list[int] = []
    removed: list[int] = []
    for i, v in enumerate(rows):
        if len(kept) == n:
            break
        if any(sum(x * y for x, y in zip(v, rows[j], strict=True)) > threshold for j in kept):
            removed.append(i)
        else:
            kept.append(i)
    return kept, removed


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("n", [1, 10, 40, 150])
def test_drop_near_duplicates_matches_the_plain_walk(threshold: float, n: int) -> None:
    vectors, pairs = planted(150, 8, copies=25, seed=int(threshold * 100) + n)
    expected = brute_force(vectors, n, threshold)
    for block_size in (1, 7, 256):
        assert drop_near_duplicates(vectors, n, threshold, block_size=block_size) == expected
    kept, removed = expected
    kept_set = set(kept)
    for i in removed:  # each dropped row has a kept row before it above the threshold
        assert any(float(vectors[i] @ vectors[j]) > threshold for j in kept if j < i)
    for i, j in itertools.combinations(kept, 2):  # kept rows are pairwise at most the threshold
        assert float(vectors[i] @ vectors[j]) <= threshold
    if len(kept) == n:  # refill: the walk took rows in order up to the n-th keep, and no further
        assert sorted(kept + removed) == list(range(kept[-1] + 1))
    else:  # not enough distinct rows: every row was walked
        assert sorted(kept + removed) == list(range(len(vectors)))
    if threshold == 0.9:  # planted copies (expected cosine ≈ 0.999) of a kept source reached by the walk
        walked = kept[-1] if kept else -1
        assert all(c in removed for s, c in pairs if s in kept_set and c <= walked)
        assert n == 1 or any(s in kept_set and c in removed for s, c in pairs)  # n = 1 stops at row 0


def test_refill_keeps_n_when_enough_rows_exist() -> None:
    vectors, _ = planted(400, 16, copies=60, seed=5)
    kept, removed = drop_near_duplicates(vectors, 100, 0.9)
    assert len(kept) == 100 and len(removed) > 0
    assert kept == brute_force(vectors, 100, 0.9)[0]
    # The same walk on float32 at a size where blocks meet many kept rows.
    rng = np.random.default_rng(0)
    big = rng.standard_normal((3000, 32)).astype(np.float32)
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    big[1::3] = big[0::3] + 0.01 * rng.standard_normal((1000, 32)).astype(np.float32)  # a copy after each
    kept, removed = drop_near_duplicates(big, 800, 0.95)
    assert (kept, removed) == drop_near_duplicates(big, 800, 0.95, block_size=1)
    assert len(kept) == 800


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5, math.nan])
def test_threshold_must_lie_in_zero_one(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        drop_near_duplicates(np.eye(3), 2, threshold)


def test_threshold_one_drops_nothing_and_zero_n_keeps_nothing() -> None:
    vectors = np.eye(4)[[0, 1, 0, 2]]  # an exact copy has inner product 1, which does not exceed 1
    assert drop_near_duplicates(vectors, 4, 1.0) == ([0, 1, 2, 3], [])
    assert drop_near_duplicates(vectors, 0, 0.5) == ([], [])
    with pytest.raises(ValueError, match=r"\[m, D\]"):
        drop_near_duplicates(np.ones(3), 1, 0.5)
