"""Batch acquisition for any budget: per-row keys, a mergeable top-n, and near-duplicate removal.

A human batch of tens is chosen greedily, conditioning on each pick (`acquisition.select_batch`). A curated
set of thousands is chosen by power sampling (Kirsch et al., TMLR 2023, Stochastic Batch Acquisition):
draw `n` rows without replacement with probability proportional to `s_i^β`. By the Gumbel-top-k trick
that is the `n` largest keys `k_i = β log s_i + G_i`, `G_i` i.i.d. standard Gumbel. Each key depends on
its own row only, with the noise seeded by (seed, sample id), so any block order, partition or retry gives
the same keys, and the global top-n is an exact, associative reduction (`TopN`). Without conditioning a
batch may hold near-copies; `drop_near_duplicates` walks it in key order, drops a row whose expected
cosine to a kept row exceeds a threshold, and refills from the next keys.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from enum import Enum

import numpy as np

# Largest budget chosen greedily by default: each greedy pick rescores the pool under a conditioned
# posterior, which is right for a human batch of tens and far too slow for thousands of picks.
GREEDY_MAX_BUDGET = 100

# Candidates compared with the kept rows per matrix product in `drop_near_duplicates`.
_DEDUP_BLOCK = 256


class BatchMode(str, Enum):
    """How a batch of `n` rows is drawn from scored rows."""

    GREEDY = "greedy"
    """Pick the best, condition the posterior on it, rescore, repeat (`select_batch`): for a human batch."""
    STOCHASTIC = "stochastic"
    """Power sampling: without replacement, probability ∝ `s^β`, as the `n` largest Gumbel-perturbed keys."""
    TOP_K = "top-k"
    """The `n` highest scores: no conditioning and no noise, so near-copies of one good row all get in."""


def default_mode(budget: int) -> BatchMode:
    """Greedy up to `GREEDY_MAX_BUDGET` picks, stochastic beyond."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return BatchMode.GREEDY if budget <= GREEDY_MAX_BUDGET else BatchMode.STOCHASTIC


# ---- randomness keyed by (seed, sample id) --------------------------------------------------------------


def _seed_key(seed: int) -> bytes:
    try:
        return int(seed).to_bytes(16, "little", signed=True)
    except OverflowError:
        raise ValueError(f"seed must fit in a signed 128-bit integer, got {seed}") from None


def row_uniforms(sample_ids: Sequence[str], seed: int) -> np.ndarray:
    """One uniform number in the open interval (0, 1) per sample id, a function of (seed, id) alone.

    `x = blake2b(utf8(id), key=seed, 8 bytes)` read as a little-endian 64-bit integer; its top 52 bits
    `x' = ⌊x / 2^12⌋` give `u = (x' + 1/2) / 2^52`, which float64 holds exactly, so `2^-53 ≤ u ≤ 1 − 2^-53`
    (keeping all 64 bits would round the largest values to exactly 1). len N -> float64 [N].
    """
    key = _seed_key(seed)
    digests = b"".join([hashlib.blake2b(s.encode(), digest_size=8, key=key).digest() for s in sample_ids])
    x = np.frombuffer(digests, dtype="<u8")  # [N]
    return (2 * (x >> np.uint64(12)) + 1).astype(np.float64) / 2.0**53


def row_gumbels(sample_ids: Sequence[str], seed: int) -> np.ndarray:
    """Standard Gumbel noise `G = −log(−log u)` with `u = row_uniforms(sample_ids, seed)`. len N -> [N]."""
    return -np.log(-np.log(row_uniforms(sample_ids, seed)))


def batch_keys(
    scores: np.ndarray,
    sample_ids: Sequence[str],
    mode: BatchMode | str,
    *,
    beta: float = 1.0,
    seed: int = 0,
    floor: float = 1e-12,
) -> tuple[np.ndarray, int]:
    """Keys whose `n` largest are the batch, and the number of scores clamped at `floor`.

    STOCHASTIC: `k_i = β log max(s_i, floor) + G(seed, id_i)`, so the top-n is a draw without replacement
    with probability ∝ `max(s_i, floor)^β` (Gumbel-top-k; Kirsch et al., TMLR 2023, Stochastic Batch
    Acquisition): `β = 0` is a uniform random batch, `β → ∞` is top-k. Scores must be finite.
    TOP_K: `k_i = s_i` (nothing clamped; NaN is refused, it has no order). GREEDY has no per-row key.
    scores [N], sample_ids len N -> keys float64 [N], clamped count.
    """
    mode = BatchMode(mode)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.shape[0] != len(sample_ids):
        raise ValueError(
            f"scores must be [N] with one sample id per row, got shape {list(scores.shape)} "
            f"and {len(sample_ids)} ids"
        )
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    if not (math.isfinite(floor) and floor > 0):
        raise ValueError(f"floor must be finite and > 0, got {floor}")
    if mode is BatchMode.GREEDY:
        raise ValueError("greedy batches have no per-row key: each pick conditions the next (select_batch)")
    if mode is BatchMode.TOP_K:
        n_nan = int(np.isnan(scores).sum())
        if n_nan:
            raise ValueError(f"{n_nan} of {scores.shape[0]} scores are NaN")
        return scores.copy(), 0
    n_bad = int((~np.isfinite(scores)).sum())
    if n_bad:
        raise ValueError(f"{n_bad} of {scores.shape[0]} scores are not finite")
    clamped = scores < floor
    keys = beta * np.log(np.where(clamped, floor, scores)) + row_gumbels(sample_ids, seed)
    return keys, int(clamped.sum())


# ---- the global top-n, as a mergeable reduction ---------------------------------------------------------


class TopN:
    """The `n` entries with the largest keys among all entries added or merged in, in O(n + block) memory.

    An entry is (key float64, sample id str, row int64: the caller's handle on the row). Entries are
    ordered by key descending, then sample id ascending, then row ascending: a total order, so the kept set
    and `result()` never depend on the order blocks arrive in, and `merge` is associative and commutative.
    """

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = n
        self._keys = np.empty(0, dtype=np.float64)  # [≤ n]
        self._ids = np.empty(0, dtype=np.str_)  # [≤ n]
        self._rows = np.empty(0, dtype=np.int64)  # [≤ n]

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def _keep(self, keys: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
        """Keep the top `n` of these entries (in no particular order): argpartition, ties resolved by id."""
        if keys.shape[0] > self.n:
            if self.n == 0:
                keep = np.empty(0, dtype=np.int64)
            else:
                kth = keys[np.argpartition(-keys, self.n - 1)[self.n - 1]]  # the n-th largest key
                above = np.flatnonzero(keys > kth)
                tied = np.flatnonzero(keys == kth)
                tied = tied[np.lexsort((rows[tied], ids[tied]))][: self.n - above.shape[0]]
                keep = np.concatenate([above, tied])
            keys, ids, rows = keys[keep], ids[keep], rows[keep]
        self._keys, self._ids, self._rows = keys, ids, rows

    def add(self, keys: np.ndarray, sample_ids: Sequence[str], rows: np.ndarray) -> None:
        """Add a block of entries: keys [B], sample_ids len B, rows [B]."""
        keys = np.asarray(keys, dtype=np.float64)
        ids = np.asarray(sample_ids, dtype=np.str_)
        rows = np.asarray(rows, dtype=np.int64)
        if keys.ndim != 1 or ids.shape != keys.shape or rows.shape != keys.shape:
            raise ValueError(
                f"keys, sample_ids and rows must be [B] alike, got {list(keys.shape)}, {list(ids.shape)} "
                f"and {list(rows.shape)}"
            )
        n_nan = int(np.isnan(keys).sum())
        if n_nan:
            raise ValueError(f"{n_nan} of {keys.shape[0]} keys are NaN")
        self._keep(
            np.concatenate([self._keys, keys]),
            np.concatenate([self._ids, ids]),
            np.concatenate([self._rows, rows]),
        )

    def merge(self, other: TopN) -> TopN:
        """A new `TopN` holding the top `n` of both (neither operand changes)."""
        if other.n != self.n:
            raise ValueError(f"cannot merge a top-{other.n} into a top-{self.n}")
        merged = TopN(self.n)
        merged._keep(
            np.concatenate([self._keys, other._keys]),
            np.concatenate([self._ids, other._ids]),
            np.concatenate([self._rows, other._rows]),
        )
        return merged

    def result(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(keys float64 [m], sample ids, rows int64 [m]), best first, `m = min(n, entries seen)`."""
        order = np.lexsort((self._rows, self._ids, -self._keys))
        return self._keys[order], self._ids[order].tolist(), self._rows[order]


# ---- near-duplicates ------------------------------------------------------------------------------------


def drop_near_duplicates(
    vectors: np.ndarray, n: int, threshold: float, *, block_size: int = _DEDUP_BLOCK
) -> tuple[list[int], list[int]]:
    """Walk rows best first; keep a row unless its inner product with a kept row exceeds `threshold`.

    `vectors` [m, D] are the candidates in key order, as expected-cosine vectors `μ / √(‖μ‖² + Σσ²)`
    (`neighbours.embed_for_search(..., "cosine")`), whose inner products are expected cosines. The walk
    stops once `n` rows are kept, so a dropped row is refilled by the next one in key order. Each block of
    `block_size` candidates meets the rows kept before it in one matrix product and its own undecided rows
    in another; the walk through the block is then sequential. At most `n·m` inner products against kept
    rows, plus `block_size·m` within blocks.
    Returns (kept indices, removed indices): the removed are those dropped before the `n`-th keep.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [m, D], got shape {list(vectors.shape)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    m, dim = vectors.shape
    kept_vectors = np.empty((min(n, m), dim), dtype=vectors.dtype)  # rows kept so far   [≤ n, D]
    kept: list[int] = []
    removed: list[int] = []
    for start in range(0, m, block_size):
        if len(kept) >= n:
            break
        block = vectors[start : start + block_size]  # [b, D]
        blocked = np.zeros(block.shape[0], dtype=bool)  # near a kept row   [b]
        if kept:
            blocked = (block @ kept_vectors[: len(kept)].T > threshold).any(axis=1)
        open_rows = np.flatnonzero(~blocked)  # [o]
        near = block[open_rows] @ block[open_rows].T > threshold  # among the still-open rows   [o, o]
        blocked_open = np.zeros(open_rows.shape[0], dtype=bool)  # [o]
        j = 0
        for i in range(block.shape[0]):
            if len(kept) >= n:
                break
            if blocked[i]:
                removed.append(start + i)
                continue
            if blocked_open[j]:
                removed.append(start + i)
            else:
                kept_vectors[len(kept)] = block[i]
                kept.append(start + i)
                blocked_open |= near[j]
            j += 1
    return kept, removed
