"""Stages without Ray: shard reassembly is exactly-once, factors are exact and order-independent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.bayes.curvature import infonce_ggn
from pipeline.runtime import plan_pool
from pipeline.stages.base import ROW, SHARD, SHARD_ROWS, object_array
from pipeline.stages.decode import OK
from pipeline.stages.embed import IMAGE_ACTS, IMAGE_EMB, TEXT_ACTS, TEXT_EMB
from pipeline.stages.factors import shard_factors, sum_factors
from pipeline.stages.shards import ShardAssembler


def _batch(shard: str, rows: list[int], total: int) -> dict[str, np.ndarray]:
    return {
        SHARD: object_array([shard] * len(rows)),
        SHARD_ROWS: np.full(len(rows), total),
        ROW: np.array(rows),
        "x": np.array(rows, dtype=float) * 10,
    }


def test_assembler_releases_complete_shards_once_in_order() -> None:
    asm = ShardAssembler()
    assert asm.add(_batch("a", [2, 0], 4)) == []
    assert asm.add(_batch("b", [0], 1))[0][0] == "b"
    assert asm.add(_batch("a", [0, 2], 4)) == []  # a retried batch: duplicates dropped
    done = asm.add(_batch("a", [3, 1, 1], 4))
    assert [s for s, _ in done] == ["a"]
    np.testing.assert_array_equal(done[0][1][ROW], [0, 1, 2, 3])
    np.testing.assert_array_equal(done[0][1]["x"], [0.0, 10.0, 20.0, 30.0])
    assert asm.pending() == {}


def _pairs(n: int, d: int = 5, D: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {
        OK: np.ones(n, dtype=bool),
        ROW: np.arange(n),
        IMAGE_ACTS: g.normal(size=(n, d)),
        TEXT_ACTS: g.normal(size=(n, d + 1)),
        IMAGE_EMB: g.normal(size=(n, D)),
        TEXT_EMB: g.normal(size=(n, D)),
    }


def test_shard_factors_match_direct_computation() -> None:
    rows = _pairs(10)
    rows[OK][3] = False
    f = shard_factors(rows, block_size=4, likelihood="infonce", scale=10.0, bias=0.0, meta={})
    keep = np.flatnonzero(rows[OK])
    acts = torch.from_numpy(rows[IMAGE_ACTS][keep])
    x, y = torch.from_numpy(rows[IMAGE_EMB]), torch.from_numpy(rows[TEXT_EMB])
    blocks = [[0, 1, 2], [4, 5, 6, 7], [8, 9]]  # row 3 quarantined; blocks by input row // 4
    b_img = sum(infonce_ggn(x[b], y[b], 10.0) for b in blocks)
    b_txt = sum(infonce_ggn(y[b], x[b], 10.0) for b in blocks)
    torch.testing.assert_close(f["image"].A, acts.T @ acts, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f["image"].B, b_img, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f["text"].B, b_txt, rtol=1e-10, atol=1e-12)
    assert f["image"].n == 9 and f["text"].meta["tower"] == "text"
    # Row order inside the shard does not matter (ROW restores it).
    perm = np.random.default_rng(1).permutation(10)
    shuffled = {k: v[perm] for k, v in rows.items()}
    g = shard_factors(shuffled, block_size=4, likelihood="infonce", scale=10.0, bias=0.0, meta={})
    torch.testing.assert_close(g["image"].B, f["image"].B, rtol=1e-12, atol=1e-14)


def test_reduction_is_order_independent() -> None:
    parts = [
        shard_factors(_pairs(8, seed=s), block_size=4, likelihood="infonce", scale=5.0, bias=0.0, meta={})[
            "image"
        ]
        for s in range(5)
    ]
    a, b = sum_factors(parts), sum_factors(parts[::-1])
    torch.testing.assert_close(a.A, b.A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.B, b.B, rtol=1e-12, atol=1e-12)
    assert a.n == 40


@pytest.mark.parametrize(
    ("resources", "actors", "gpus"),
    [({"CPU": 2}, 1, 0.0), ({"CPU": 1}, 1, 0.0), ({"CPU": 8}, 6, 0.0), ({"CPU": 16, "GPU": 2}, 2, 1.0)],
)
def test_pool_leaves_room_for_reads(resources: dict[str, float], actors: int, gpus: float) -> None:
    plan = plan_pool(resources)
    assert plan.actors == actors and plan.actor_gpus == gpus
    cpu_left = resources["CPU"] - plan.actors * plan.actor_cpus
    assert cpu_left >= plan.read_cpus + plan.decode_cpus or resources["CPU"] < 2


@pytest.mark.parametrize(
    ("resources", "threads"),
    [({"CPU": 2}, 2), ({"CPU": 1}, 1), ({"CPU": 8}, 1), ({"CPU": 16, "GPU": 2}, 4)],
)
def test_actor_threads_share_the_cores(resources: dict[str, float], threads: int) -> None:
    """CPU actors split the node's cores (decode tasks time-share); GPU actors use their share."""
    plan = plan_pool(resources)
    assert plan.actor_threads == threads
    if "GPU" not in resources:
        assert plan.actors * plan.actor_threads <= resources["CPU"]
