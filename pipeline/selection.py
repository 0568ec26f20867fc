"""Choosing what humans label next: targeted candidates from the pool, then a batch by an acquisition score.

Reads the Parquet written by `bayescurate embed` (with `--activations`), narrows the pool to the nearest
neighbours of the target set (MATH.md §7, expected cosine or 2-Wasserstein over faiss), and picks a batch.
EPIG and BALD use `select_batch`, which conditions the image posterior on each pick before re-scoring, so
no labels are needed until the annotators return; entropy, random and the published code's EPIG with
independent per-logit noise are there as baselines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from pipeline.bayes.acquisition import Method, epig, select_batch
from pipeline.bayes.head import BayesHead
from pipeline.bayes.metrics import entropy
from pipeline.bayes.neighbours import Metric, candidates
from pipeline.io import storage, vectors

VECTOR_COLUMNS = ("mean", "var", "acts")


class Acquisition(str, Enum):
    """How a batch is chosen from the (targeted) candidates."""

    EPIG = "epig"
    """Expected predictive information gain about the targets, joint posterior draws, greedy (MATH §7)."""
    BALD = "bald"
    """Mutual information between a point's label and the parameters, greedy with conditioning."""
    ENTROPY = "entropy"
    """The highest predictive entropy (probit), no conditioning: the classic uncertainty baseline."""
    RANDOM = "random"
    """Uniformly at random (seeded) among the candidates: the baseline every method must beat."""
    EPIG_INDEPENDENT = "epig-independent"
    """EPIG from independent noise per logit, as the published BayesVLM code draws it; kept only for
    comparison: pool and target draws are unrelated, so it collapses towards Monte Carlo noise."""


class Precision(str, Enum):
    """Arithmetic of the per-row scoring in batch selection (the posterior's decompositions stay float64)."""

    FLOAT64 = "float64"
    """Double precision: the reference."""
    FLOAT32 = "float32"
    """Single precision: about twice as fast (`bench select`); a test checks it picks as float64 does
    and its scores agree to 1e-3 relative."""


@dataclass(frozen=True)
class EmbeddingSet:
    """Rows of an embeddings directory: ids, Gaussian embeddings and the pre-projection activations."""

    sample_ids: list[str]
    mean: Tensor  # [N, D]
    var: Tensor  # [N, D]
    acts: Tensor  # [N, d']
    columns: dict[str, list]  # the other scalar columns (source, caption, labels, ...)
    meta: dict[str, Any] = field(default_factory=dict)  # the `bayescurate` metadata of the files

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
            self.meta,
        )

    def with_embeddings(self, mean: Tensor, var: Tensor) -> EmbeddingSet:
        """The same rows with re-scored Gaussian embeddings (a new posterior, no encoder pass)."""
        return EmbeddingSet(self.sample_ids, mean, var, self.acts, self.columns, self.meta)


def file_meta(table: pa.Table) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(b"bayescurate")
    return json.loads(raw) if raw else {}


def read_embedding_table(uri: str, vector_columns: Sequence[str] = VECTOR_COLUMNS) -> tuple[pa.Table, dict]:
    """Every part file of an embeddings directory (quarantine excluded) as one table, and their metadata.

    Reads `sample_id`, the scalar columns and only the vector columns named (each must be there); checks
    that all files come from one posterior.
    """
    files = [f for f in storage.list_files(uri, suffix=".parquet") if "/quarantine/" not in f]
    if not files:
        raise FileNotFoundError(f"no embedding Parquet files under {uri!r}")
    tables, meta = [], None
    for path in files:
        fs, p = storage.resolve(path)
        schema = pq.read_schema(p, filesystem=fs)
        for needed in vector_columns:
            if needed not in schema.names:
                hint = " (embed with --activations)" if needed == "acts" else ""
                raise ValueError(f"{path!r} has no {needed!r} column{hint}")
        wanted = [f.name for f in schema if f.name == "sample_id" or f.name in vector_columns or _scalar(f)]
        table = pq.read_table(p, filesystem=fs, columns=wanted)
        this = file_meta(table)
        if meta is None:
            meta = this
        elif this.get("posterior_id") != meta.get("posterior_id"):
            raise ValueError(
                f"{uri!r} mixes embeddings of posteriors {meta.get('posterior_id')} and "
                f"{this.get('posterior_id')} ({path!r}): re-embed into a fresh directory"
            )
        tables.append(table)
    return pa.concat_tables(tables, promote_options="default"), meta or {}


def _scalar(f: pa.Field) -> bool:
    """A column other than `sample_id` and the vectors that holds one value per row (no lists)."""
    kind = f.type
    return f.name not in ("sample_id", *VECTOR_COLUMNS) and not (
        pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)
    )


def scalar_columns(table: pa.Table) -> dict[str, list]:
    """The scalar columns of `table` (source, caption, labels, ...) as Python lists."""
    return {f.name: table.column(f.name).to_pylist() for f in table.schema if _scalar(f)}


def read_embeddings(uri: str) -> EmbeddingSet:
    """Load every part file of an embeddings directory written by `bayescurate embed --activations`."""
    table, meta = read_embedding_table(uri)
    return EmbeddingSet(
        table.column("sample_id").to_pylist(),
        vectors.tensor(table, "mean"),
        vectors.tensor(table, "var"),
        vectors.tensor(table, "acts"),
        scalar_columns(table),
        meta,
    )


def offsets(head: BayesHead, rows: EmbeddingSet, atol: float = 1e-6) -> Tensor | None:
    """The per-row constant of the image embedding that the projection does not explain, or None.

    `mean = acts @ Wᵀ + offset`: zero for CLIP, the attention-pool residual for SigLIP (see the adapter).
    Recovering it from the stored mean keeps the embeddings files free of a third [N, D] column; `head`
    must use the projection the rows were embedded with.
    """
    offset = rows.mean - head.image.mean(rows.acts)  # [N, D]
    scale = rows.mean.abs().max().clamp_min(1.0)
    return None if bool((offset.abs() <= atol * scale).all()) else offset


@dataclass(frozen=True)
class Pick:
    """One chosen sample, with what annotators see next to it."""

    sample_id: str
    rank: int  # 0 = picked first
    score: float  # acquisition score when picked (EPIG, BALD or entropy in nats; 0 for random)
    predicted: str  # Bayesian (probit) prediction
    confidence: float  # its probability
    entropy: float  # predictive entropy (nats)


def _top(scores: Tensor, budget: int) -> tuple[list[int], list[float]]:
    order = torch.argsort(scores, descending=True, stable=True)[:budget]
    return order.tolist(), [float(scores[i]) for i in order]


def choose(
    head: BayesHead,
    text_acts: Tensor,
    classes: list[str],
    pool: EmbeddingSet,
    budget: int,
    *,
    targets: EmbeddingSet | None = None,
    method: Acquisition | Method | str = Acquisition.EPIG,
    neighbours: int = 20,
    metric: Metric | str = Metric.WASSERSTEIN,
    max_targets: int = 256,
    draws: int = 64,
    seed: int = 0,
    text_offset: Tensor | None = None,
    pool_offsets: Tensor | None = None,
    target_offsets: Tensor | None = None,
    picks_per_step: int = 1,
    precision: Precision | str = Precision.FLOAT64,
) -> tuple[list[Pick], int]:
    """Pick `budget` pool rows for labelling; returns the picks and the number of candidates scored.

    With `targets`, the pool is first narrowed to each target's `neighbours` nearest pool points and EPIG
    measures information about predictions on (at most `max_targets` of) the targets; without, EPIG uses
    the candidates themselves as the target distribution. Offsets default to what `offsets` recovers
    from the stored means; a caller that re-scored the rows under another projection passes them.
    `picks_per_step` and `precision` trade exactness of the greedy EPIG/BALD batch for speed
    (`select_batch`, `Precision`).
    """
    method = Acquisition(getattr(method, "value", method))
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    if len(pool) == 0:
        raise ValueError("the pool is empty")
    gen = torch.Generator().manual_seed(seed)
    if pool_offsets is None:
        pool_offsets = offsets(head, pool)
    if targets is not None and len(targets) > 0 and target_offsets is None:
        target_offsets = offsets(head, targets)
    target_acts = None
    if targets is not None and len(targets) > 0:
        k = min(neighbours, len(pool))
        index = candidates(pool.mean, pool.var, targets.mean, targets.var, k, metric=metric)
        pool = pool.take(index)
        pool_offsets = None if pool_offsets is None else pool_offsets[index]
        if len(targets) > max_targets:
            keep = torch.randperm(len(targets), generator=gen)[:max_targets].sort().values
            targets = targets.take(keep)
            target_offsets = None if target_offsets is None else target_offsets[keep]
        target_acts = targets.acts
    budget = min(budget, len(pool))
    logits = head.logits(pool.acts, text_acts, image_offset=pool_offsets, text_offset=text_offset)
    probs = logits.probit()  # [Np, C]
    if method in (Acquisition.EPIG, Acquisition.BALD):
        dtype = torch.float32 if Precision(precision) is Precision.FLOAT32 else torch.float64

        def cast(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(dtype)

        selection = select_batch(
            head.computing_in(dtype),
            pool.acts.to(dtype),
            text_acts.to(dtype),
            budget,
            method=Method(method.value),
            target_acts=cast(target_acts),
            k=draws,
            generator=gen,
            pool_offsets=cast(pool_offsets),
            text_offset=cast(text_offset),
            target_offsets=cast(target_offsets),
            picks_per_step=picks_per_step,
        )
        indices, scores = selection.indices, selection.scores
    elif method is Acquisition.ENTROPY:
        indices, scores = _top(entropy(probs), budget)
    elif method is Acquisition.RANDOM:
        indices = torch.randperm(len(pool), generator=gen)[:budget].tolist()
        scores = [0.0] * len(indices)
    else:  # the published code's EPIG: independent per-logit noise for the pool and the targets
        if target_acts is None:
            target_logits = logits
        else:
            target_logits = head.logits(
                target_acts, text_acts, image_offset=target_offsets, text_offset=text_offset
            )
        indices, scores = _top(
            epig(logits.sample_probs(draws, gen), target_logits.sample_probs(draws, gen)), budget
        )
    chosen = torch.tensor(indices, dtype=torch.long)
    confidence, predicted = probs[chosen].max(dim=1)
    uncertainty = entropy(probs[chosen])
    picks = [
        Pick(pool.sample_ids[i], rank, score, classes[int(c)], float(p), float(h))
        for rank, (i, score, c, p, h) in enumerate(
            zip(indices, scores, predicted, confidence, uncertainty, strict=True)
        )
    ]
    return picks, len(pool)
