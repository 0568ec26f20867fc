"""KFAC accumulation of one shard of image–text pairs, and the exact, order-independent reduction.

Per contrastive block of `C` consecutive input rows (MATH §1–2): image tower sources = the block's image
embeddings, targets = its text embeddings; text tower the reverse. `A = Σ a aᵀ` over the shard's rows,
`B = Σ_blocks ggn(...)`, `N` = rows. Blocks never straddle shards (a shard holds whole blocks when
`rows_per_shard` is a multiple of `C`), so the factors do not depend on how shards are spread over workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts.factors import load_factors
from pipeline.bayes.contrastive import contrastive_factors
from pipeline.bayes.kron import KronFactors
from pipeline.stages.base import ROW, Batch
from pipeline.stages.decode import OK
from pipeline.stages.embed import IMAGE_ACTS, IMAGE_EMB, TEXT_ACTS, TEXT_EMB


def shard_factors(
    batch: Batch,
    *,
    block_size: int,
    likelihood: str,
    scale: float,
    bias: float,
    meta: dict[str, str | int | float],
) -> dict[str, KronFactors]:
    """Factors {"image", "text"} of one complete shard (rows in any order; `ROW` orders them), float64."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    ok = np.asarray(batch[OK], dtype=bool)
    rows = np.asarray(batch[ROW])[ok]
    order = np.argsort(rows, kind="stable")
    rows = rows[order]

    def col(name: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(batch[name][ok][order], dtype=np.float64))

    image, text = contrastive_factors(
        col(IMAGE_ACTS),
        col(IMAGE_EMB),
        col(TEXT_ACTS),
        col(TEXT_EMB),
        likelihood,
        scale,
        bias,
        blocks=torch.from_numpy(rows // block_size),
        meta=meta,
    )
    return {"image": image, "text": text}


def sum_factors(factors: Iterable[KronFactors]) -> KronFactors:
    """Exact merge (`A + A'`, `B + B'`, `N + N'`) of factors from disjoint shards."""
    items = list(factors)
    if not items:
        raise ValueError("no factors to merge")
    total = items[0]
    for f in items[1:]:
        total = total + f
    return total


def load_and_sum(paths: list[str]) -> KronFactors:
    """Sum of the factor files `paths`, in sorted path order (one leaf of the reduction tree)."""
    return sum_factors(load_factors(p) for p in sorted(paths))


def factor_path(directory: str | Path, shard_id: str, tower: str) -> str:
    return f"{directory}/part-{shard_id}.{tower}.safetensors"
