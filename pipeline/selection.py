"""Choosing what humans label next: targeted candidates from the pool, then a greedy EPIG/BALD batch.

Reads the Parquet written by `bayescurate embed` (with `--activations`), narrows the pool to the nearest
neighbours of the target set (MATH.md §7, expected cosine or 2-Wasserstein over faiss), and picks a batch
with `select_batch`, which conditions the image posterior on each pick before re-scoring, so no labels
are needed until the annotators return.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from pipeline.bayes.acquisition import Method, select_batch
from pipeline.bayes.head import BayesHead
from pipeline.bayes.neighbours import Metric, candidates
from pipeline.io import storage


@dataclass(frozen=True)
class EmbeddingSet:
    """Rows of an embeddings directory: ids, Gaussian embeddings and the pre-projection activations."""

    sample_ids: list[str]
    mean: Tensor  # [N, D]
    var: Tensor  # [N, D]
    acts: Tensor  # [N, d']
    columns: dict[str, list]  # the other scalar columns (caption, labels, ...)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def take(self, index: Tensor) -> EmbeddingSet:
        rows = index.tolist()
        return EmbeddingSet(
            [self.sample_ids[i] for i in rows],
            self.mean[index],
            self.var[index],
            self.acts[index],
            {k: [v[i] for i in rows] for k, v in self.columns.items()},
        )


def _matrix(table: pa.Table, name: str) -> Tensor:
    column = table.column(name).combine_chunks()
    width = table.schema.field(name).type.list_size
    return torch.from_numpy(np.asarray(column.flatten()).reshape(-1, width).astype(np.float64))


def read_embeddings(uri: str) -> EmbeddingSet:
    """Load every part file of an embeddings directory written by `bayescurate embed --activations`."""
    files = [f for f in storage.list_files(uri, suffix=".parquet") if "/quarantine/" not in f]
    if not files:
        raise FileNotFoundError(f"no embedding Parquet files under {uri!r}")
    tables = []
    for path in files:
        fs, p = storage.resolve(path)
        table = pq.read_table(p, filesystem=fs)
        for needed in ("mean", "var", "acts"):
            if needed not in table.column_names:
                hint = " (embed with --activations)" if needed == "acts" else ""
                raise ValueError(f"{path!r} has no {needed!r} column{hint}")
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="default")
    scalar = [
        f.name
        for f in table.schema
        if f.name not in ("sample_id", "mean", "var", "acts")
        and not pa.types.is_list(f.type)
        and not pa.types.is_fixed_size_list(f.type)
    ]
    return EmbeddingSet(
        table.column("sample_id").to_pylist(),
        _matrix(table, "mean"),
        _matrix(table, "var"),
        _matrix(table, "acts"),
        {name: table.column(name).to_pylist() for name in scalar},
    )


def offsets(head: BayesHead, rows: EmbeddingSet, atol: float = 1e-6) -> Tensor | None:
    """The per-row constant of the image embedding that the projection does not explain, or None.

    `mean = acts @ Wᵀ + offset`: zero for CLIP, the attention-pool residual for SigLIP (see the adapter).
    Recovering it from the stored mean keeps the embeddings files free of a third [N, D] column.
    """
    offset = rows.mean - head.image.mean(rows.acts)  # [N, D]
    scale = rows.mean.abs().max().clamp_min(1.0)
    return None if bool((offset.abs() <= atol * scale).all()) else offset


@dataclass(frozen=True)
class Pick:
    """One chosen sample, with what annotators see next to it."""

    sample_id: str
    rank: int  # 0 = picked first
    score: float  # acquisition score when picked (EPIG or BALD, nats)
    predicted: str  # Bayesian (probit) prediction
    confidence: float  # its probability
    entropy: float  # predictive entropy (nats)


def choose(
    head: BayesHead,
    text_acts: Tensor,
    classes: list[str],
    pool: EmbeddingSet,
    budget: int,
    *,
    targets: EmbeddingSet | None = None,
    method: Method | str = Method.EPIG,
    neighbours: int = 20,
    metric: Metric | str = Metric.WASSERSTEIN,
    max_targets: int = 256,
    draws: int = 64,
    seed: int = 0,
    text_offset: Tensor | None = None,
) -> tuple[list[Pick], int]:
    """Pick `budget` pool rows for labelling; returns the picks and the number of candidates scored.

    With `targets`, the pool is first narrowed to each target's `neighbours` nearest pool points and EPIG
    measures information about predictions on (at most `max_targets` of) the targets; without, EPIG uses
    the candidates themselves as the target distribution.
    """
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    if len(pool) == 0:
        raise ValueError("the pool is empty")
    gen = torch.Generator().manual_seed(seed)
    target_acts = None
    if targets is not None and len(targets) > 0:
        k = min(neighbours, len(pool))
        index = candidates(pool.mean, pool.var, targets.mean, targets.var, k, metric=metric)
        pool = pool.take(index)
        if len(targets) > max_targets:
            targets = targets.take(torch.randperm(len(targets), generator=gen)[:max_targets].sort().values)
        target_acts = targets.acts
    budget = min(budget, len(pool))
    pool_offsets = offsets(head, pool)
    target_offsets = None if target_acts is None else offsets(head, targets)
    selection = select_batch(
        head,
        pool.acts,
        text_acts,
        budget,
        method=method,
        target_acts=target_acts,
        k=draws,
        generator=gen,
        pool_offsets=pool_offsets,
        text_offset=text_offset,
        target_offsets=target_offsets,
    )
    chosen = torch.tensor(selection.indices, dtype=torch.long)
    logits = head.logits(
        pool.acts[chosen],
        text_acts,
        image_offset=None if pool_offsets is None else pool_offsets[chosen],
        text_offset=text_offset,
    )
    probs = logits.probit()  # [budget, C]
    confidence, predicted = probs.max(dim=1)
    entropy = -torch.special.xlogy(probs, probs).sum(dim=1)
    picks = [
        Pick(pool.sample_ids[i], rank, score, classes[int(c)], float(p), float(h))
        for rank, (i, score, c, p, h) in enumerate(
            zip(selection.indices, selection.scores, predicted, confidence, entropy, strict=True)
        )
    ]
    return picks, len(pool)
