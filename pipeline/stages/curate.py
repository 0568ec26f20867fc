"""Curation stages, Ray-agnostic: read a shard of an embeddings directory, score its rows, and the exact
nearest-neighbour partial of one shard against the targets.

Rows carry their place in the pool (`_file`, `_pool_row`), so any chosen row can be read back later without
holding the pool. Every function here is a pure function of its inputs: a retried block gives the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from pipeline.bayes.batches import BatchMode, batch_keys
from pipeline.bayes.head import Activations, BayesHead
from pipeline.bayes.metrics import entropy
from pipeline.bayes.neighbours import Metric, embed_for_search
from pipeline.bayes.scoring import RowScorer
from pipeline.data.sources import Shard
from pipeline.io import faults, vectors
from pipeline.runtime import Shared
from pipeline.stages.base import Batch, Resources, Stage, object_array
from pipeline.stages.embedding_read import (
    FILE,
    POOL_ROW,
    file_index,
    global_rows,
    read_embedding_shard,
)

VECTORS = ("mean", "var", "acts")
# Output columns of the scoring stage (besides the pool's scalar columns and the bookkeeping).
SCORE_COLUMNS = ("sample_id", "score", "key", "floored", "predicted", "confidence", "entropy", FILE, POOL_ROW)


@dataclass(frozen=True)
class Rescore:
    """Stored rows re-computed under another posterior: `head` (computing in float32), and the projection
    [D, d] the stored means were made under, against which each row's offset is recovered."""

    head: BayesHead
    reference: torch.Tensor  # [D, d]

    def embeddings(self, acts: torch.Tensor, stored_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance [n, D] of rows (acts [n, d], stored means [n, D]) under `head`."""
        acts = acts.to(self.reference.dtype)
        offset = recovered_offsets(stored_mean, acts @ self.reference.T)
        return self.head.image_embeddings(acts, offset)


def recovered_offsets(
    stored_mean: torch.Tensor, projected: torch.Tensor, atol: float = 1e-5
) -> torch.Tensor | None:
    """`mean − P̂ a` of a block, or None when it is only the rounding of float32 means (CLIP: no offset)."""
    if stored_mean.numel() == 0:
        return None
    offset = stored_mean.to(projected.dtype) - projected  # [n, D]
    scale = max(1.0, float(stored_mean.abs().max()))
    return None if float(offset.abs().max()) <= atol * scale else offset


@dataclass(frozen=True)
class Sampling:
    """How the scoring stage turns scores into batch keys (`batch_keys`)."""

    mode: BatchMode  # STOCHASTIC or TOP_K (a greedy batch ranks by TOP_K, then conditions)
    beta: float
    seed: int


class ScoreStage(Stage):
    """Scores rows under one posterior (`RowScorer`, fetched once per worker process from `scorer`), with
    each row's batch key and the probit prediction shown next to a pick. Each row's offset is recovered
    against `reference`, the projection its stored mean was made under (None: the scorer's own).

    On a GPU the stage is stateful (an actor per device holds the scorer, moved there once). On CPU it runs
    as plain tasks on whichever workers are free: there is no model to load, and a new actor process
    importing torch was about 5 s of a 14 s scoring stage at 100k rows on 2 cores (`bench curate`)."""

    name: ClassVar[str] = "score"
    input_columns: ClassVar[tuple[str, ...]] = ("sample_id", "acts", "mean")

    def __init__(
        self,
        scorer: Shared,
        classes: Sequence[str],
        sampling: Sampling,
        *,
        reference: torch.Tensor | None = None,
        device: str = "cpu",
        threads: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        batch_size: int = 4096,
    ) -> None:
        self.shared = scorer
        self.classes = list(classes)
        self.sampling = sampling
        self.reference = reference  # [D, d] projection of the stored means (None: the scorer head's)
        self.device = device
        self.threads = threads  # torch threads in the process that scores
        self.resources = Resources(
            num_cpus=num_cpus, num_gpus=num_gpus, stateful=device != "cpu", batch_size=batch_size
        )
        self.scorer: RowScorer | None = None

    def __getstate__(self) -> dict[str, object]:
        state = super().__getstate__()
        state["scorer"] = None  # each worker fetches its own from the shared value
        return state

    def setup(self) -> None:
        torch.set_num_threads(max(1, self.threads))
        scorer = self.shared.get()
        self.scorer = scorer.to(self.device) if self.device != "cpu" else scorer

    def process(self, batch: Batch) -> Batch:
        if self.scorer is None:
            raise RuntimeError("ScoreStage.process before setup: the scorer is fetched in setup()")
        faults.kill_once("score")  # crash tests: a scoring worker dies mid-task
        acts = torch.from_numpy(np.ascontiguousarray(batch["acts"]))
        if self.reference is None:
            projected = self.scorer.head.image.mean(acts.to(self.scorer.dtype))
        else:
            projected = acts.to(self.scorer.dtype) @ self.reference.T.to(self.scorer.dtype)
        stored = torch.from_numpy(np.ascontiguousarray(batch["mean"]))
        out = self.scorer(Activations(acts, recovered_offsets(stored, projected)))
        ids = [str(s) for s in batch["sample_id"]]
        s = self.sampling
        keys, _ = batch_keys(out.scores.numpy(), ids, s.mode, beta=s.beta, seed=s.seed)
        floor = np.zeros(len(ids), dtype=bool)
        if s.mode is BatchMode.STOCHASTIC:
            floor = out.scores.numpy() < 1e-12
        confidence, predicted = out.probs.max(dim=1)
        result = {k: v for k, v in batch.items() if k not in VECTORS}
        result |= {
            "score": out.scores.numpy(),
            "key": keys,
            "floored": floor,
            "predicted": object_array([self.classes[int(c)] for c in predicted]),
            "confidence": confidence.numpy(),
            "entropy": entropy(out.probs).numpy(),
        }
        return result


def knn_partial(
    shard: Shard,
    queries: Shared,
    k: int,
    metric: Metric | str,
    rescore: Shared | None = None,
    exclude: frozenset[str] = frozenset(),
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest rows of `shard` for every query (exact): (similarities [Nt, k'], global rows [Nt, k']).

    `queries` holds the targets' search vectors (`embed_for_search`); similarities are inner products
    (cosine) or negated squared distances (wasserstein), so larger is always nearer and partials merge by
    `merge_knn`. k' = min(k, rows of the shard). With `rescore` (a `Rescore`) the rows' Gaussians are
    re-computed under its posterior; rows in `exclude` (sample ids) get similarity -inf.
    """
    metric = Metric(metric)
    columns = ("mean", "acts") if rescore is not None else ("mean", "var")
    table = read_embedding_shard(shard, (*columns, *(("sample_id",) if exclude else ())))
    mean = torch.tensor(vectors.matrix(table, "mean", np.float32))
    if rescore is None:
        var = torch.tensor(vectors.matrix(table, "var", np.float32))
    else:
        acts = torch.tensor(vectors.matrix(table, "acts", np.float32))
        mean, var = rescore.get().embeddings(acts, mean)
        mean, var = mean.float(), var.float()
    pool = embed_for_search(mean, var.clamp_min(0), metric)  # [n, D']
    q = torch.as_tensor(queries.get())  # [Nt, D']
    sims = q @ pool.T  # [Nt, n]
    if metric is Metric.WASSERSTEIN:
        sims = 2 * sims - (q * q).sum(1, keepdim=True) - (pool * pool).sum(1)[None, :]  # −‖q − x‖²
    if exclude:
        ids = table.column("sample_id").to_pylist()
        out = [i for i, sid in enumerate(ids) if sid in exclude]
        sims[:, out] = float("-inf")
    kk = min(k, pool.shape[0])
    top = sims.topk(kk, dim=1)
    rows = global_rows(file_index(shard), shard.start + top.indices.numpy())
    return top.values.numpy().astype(np.float64), rows


def merge_knn(
    a: tuple[np.ndarray, np.ndarray] | None, b: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of two kNN partials per query (associative; ties by the smaller global row)."""
    if a is None:
        values, rows = b
    else:
        values, rows = np.concatenate([a[0], b[0]], axis=1), np.concatenate([a[1], b[1]], axis=1)
    order = np.lexsort((rows, -values), axis=1)[:, :k]
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(rows, order, axis=1)
