"""Choosing what humans label next: the selection settings, targeted candidates, then a batch by a score.

Reads the Parquet written by `bayescurate embed` (with `--activations`), narrows the pool to the nearest
neighbours of the target set (expected cosine or 2-Wasserstein over faiss), scores the candidates by the
method's scorer (`SCORERS`) and draws the batch: greedy with conditioning for EPIG and BALD (`select_batch`:
the image posterior is updated on each pick before re-scoring, so no labels are needed until the
annotators return), a stochastic power sample, or the top scores. `SelectionSettings` is the one section
of these choices that `select`, campaigns and `curate` share.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator
from torch import Tensor

from pipeline.bayes.acquisition import Method, epig, joint_seed, select_batch
from pipeline.bayes.batches import BatchMode, TopN, batch_keys, default_mode, drop_near_duplicates
from pipeline.bayes.head import Activations, BayesHead
from pipeline.bayes.metrics import entropy
from pipeline.bayes.neighbours import Metric, candidates, embed_for_search
from pipeline.bayes.scoring import Norm, RowScorer
from pipeline.config import Config
from pipeline.io import storage, vectors

VECTOR_COLUMNS = ("mean", "var", "acts")


class Acquisition(str, Enum):
    """The score that ranks pool rows."""

    EPIG = "epig"
    """Expected predictive information gain about the targets, from joint posterior draws."""
    BALD = "bald"
    """Mutual information between a point's label and the parameters, from joint posterior draws."""
    ENTROPY = "entropy"
    """The highest predictive entropy (probit), no conditioning: the classic uncertainty baseline."""
    RANDOM = "random"
    """Uniformly at random (seeded by sample id) among the candidates: the baseline every method must beat."""
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


class SelectionSettings(Config):
    """How a batch is chosen from a pool: one section shared by `select`, campaigns and `curate`."""

    budget: int = Field(20, ge=1)  # images to choose (a campaign: per round)
    method: Acquisition = Acquisition.EPIG  # acquisition function
    batch: BatchMode | None = (
        None  # how the batch is drawn (default: greedy up to 100 picks, stochastic beyond)
    )
    beta: float = Field(4.0, ge=0)  # stochastic batches: P(pick) ∝ score^beta (0: uniform; large: top-k;
    # 4 kept all of greedy EPIG's gain in `bench active-learning`, 1 kept 40%)
    neighbours: int = Field(20, ge=1)  # pool neighbours per target point (targeted selection)
    whole_pool: bool = False  # score the whole pool against the targets, without the neighbour step
    metric: Metric = Metric.WASSERSTEIN  # neighbour distance between Gaussian embeddings
    max_targets: int = Field(256, ge=1)  # targets EPIG averages over (a fixed random subset beyond)
    draws: int = Field(64, ge=1)  # joint posterior draws for BALD/EPIG
    picks_per_step: int = Field(1, ge=1)  # greedy batches: picks per scoring pass (1: exact; more: faster)
    precision: Precision | None = None  # arithmetic of the per-row scoring (default: float64 for greedy
    # batches, float32 for stochastic and top-k)
    norm: Norm | None = None  # norm of each joint draw's image embedding: exact, or expected (about 10x
    # faster at ViT sizes; default: exact for greedy batches, expected for stochastic and top-k)
    dedupe_cosine: float | None = Field(None, gt=0, le=1)  # drop a pick whose expected cosine to a better
    # pick exceeds this, refilled from the ranking (stochastic and top-k batches; none: keep all)
    seed: int = 0  # seed of the draws and samplers (a campaign's round r uses seed + r)


SELECTION_KEYS = frozenset(SelectionSettings.model_fields)


class SelectingConfig(Config):
    """A configuration with a selection section, whose keys also work at the top level (as before)."""

    selection: SelectionSettings = Field(
        default_factory=SelectionSettings, json_schema_extra={"flatten": True}
    )  # how the batch is chosen (flags without a prefix: --budget, --method, ...)

    @model_validator(mode="before")
    @classmethod
    def _top_level_selection_keys(cls, data: Any) -> Any:
        """`method: bald` at the top of a YAML file (or as a keyword) means `selection: {method: bald}`;
        a value already inside the section wins (flags are nested there)."""
        if not isinstance(data, dict) or not SELECTION_KEYS & data.keys():
            return data
        data = dict(data)
        section = data.get("selection") or {}
        if isinstance(section, SelectionSettings):
            section = section.model_dump(exclude_unset=True)
        section = dict(section)
        for key in SELECTION_KEYS & data.keys():
            value = data.pop(key)
            section.setdefault(key, value)
        data["selection"] = section
        return data


@dataclass(frozen=True)
class EmbeddingSet:
    """Rows of an embeddings directory: ids, Gaussian embeddings, the pre-projection activations, and the
    per-row offsets of the embeddings (None: none, or not recovered yet: see `with_offsets`)."""

    sample_ids: list[str]
    mean: Tensor  # [N, D]
    var: Tensor  # [N, D]
    acts: Tensor  # [N, d']
    columns: dict[str, list]  # the other scalar columns (source, caption, labels, ...)
    meta: dict[str, Any] = field(default_factory=dict)  # the `bayescurate` metadata of the files
    offsets: Tensor | None = None  # [N, D]

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def inputs(self) -> Activations:
        """The rows as a head takes them: activations and offsets."""
        return Activations(self.acts, self.offsets)

    def take(self, index: Tensor) -> EmbeddingSet:
        rows = index.tolist()
        return EmbeddingSet(
            [self.sample_ids[i] for i in rows],
            self.mean[index],
            self.var[index],
            self.acts[index],
            {k: [v[i] for i in rows] for k, v in self.columns.items()},
            self.meta,
            None if self.offsets is None else self.offsets[index],
        )

    def with_embeddings(self, mean: Tensor, var: Tensor) -> EmbeddingSet:
        """The same rows with re-scored Gaussian embeddings (a new posterior, no encoder pass)."""
        return replace(self, mean=mean, var=var)

    def with_offsets(self, head: BayesHead) -> EmbeddingSet:
        """The same rows with their offsets recovered against `head`'s projection (`offsets`)."""
        return replace(self, offsets=offsets(head, self))


def file_meta(table: pa.Table | pa.Schema) -> dict[str, Any]:
    """The `bayescurate` key-value metadata of an embeddings file (its table or schema)."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    raw = (schema.metadata or {}).get(b"bayescurate")
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
    score: float  # acquisition score (EPIG, BALD or entropy in nats; 0 for random); greedy: when picked
    predicted: str  # Bayesian (probit) prediction
    confidence: float  # its probability
    entropy: float  # predictive entropy (nats)


@dataclass(frozen=True)
class Choice:
    """What `choose` picked, and what it saw on the way."""

    picks: list[Pick]
    candidates: int  # pool rows scored (after the neighbour step)
    batch: BatchMode  # how the batch was drawn
    duplicates: int = 0  # near-duplicate picks dropped and refilled from the ranking
    floored: int = 0  # rows whose score was clamped at the floor of power sampling


@dataclass(frozen=True)
class Problem:
    """What a scorer sees: the head, the candidate rows, the targets and the class texts."""

    head: BayesHead
    text: Activations  # class text rows   [C, dt]
    pool: Activations  # candidates   [Np, d]
    targets: Activations | None  # EPIG's target rows (None: the candidates themselves)
    probs: Tensor  # probit predictive of the candidates   [Np, C]
    settings: SelectionSettings
    generator: torch.Generator  # Monte Carlo: the joint draws' seed comes from it (`joint_seed`)


def resolved_precision(settings: SelectionSettings, mode: BatchMode) -> Precision:
    """The settings' precision, else float64 for a greedy batch and float32 for one drawn by keys."""
    if settings.precision is not None:
        return settings.precision
    return Precision.FLOAT64 if mode is BatchMode.GREEDY else Precision.FLOAT32


def resolved_norm(settings: SelectionSettings, mode: BatchMode) -> Norm:
    """The settings' norm, else exact for a greedy batch and expected for one drawn by keys."""
    if settings.norm is not None:
        return settings.norm
    return Norm.EXACT if mode is BatchMode.GREEDY else Norm.EXPECTED


def dtype_of(precision: Precision) -> torch.dtype:
    return torch.float32 if precision is Precision.FLOAT32 else torch.float64


def row_scorer(p: Problem, mode: BatchMode) -> RowScorer:
    """The scorer of `p`'s candidates; EPIG without targets takes the candidates as its targets."""
    return RowScorer(
        p.head,
        p.text,
        p.settings.method.value,
        targets=p.pool if p.targets is None else p.targets,
        draws=p.settings.draws,
        seed=joint_seed(p.generator),
        norm=resolved_norm(p.settings, mode),
        dtype=dtype_of(resolved_precision(p.settings, mode)),
    )


def _row_scores(p: Problem, mode: BatchMode) -> Tensor:
    return row_scorer(p, mode)(p.pool).scores


def _independent_epig(p: Problem, mode: BatchMode) -> Tensor:
    """The published code's EPIG: independent per-logit noise for the pool and the targets."""
    gen, head, pool, text = p.generator, p.head, p.pool, p.text
    logits = head.logits(pool.acts, text.acts, image_offset=pool.offsets, text_offset=text.offsets)
    target_logits = logits
    if p.targets is not None:
        target_logits = head.logits(
            p.targets.acts, text.acts, image_offset=p.targets.offsets, text_offset=text.offsets
        )
    draws = p.settings.draws
    return epig(logits.sample_probs(draws, gen), target_logits.sample_probs(draws, gen))


# method -> per-row scores of the candidates. EPIG and BALD also condition greedy batches (`select_batch`).
SCORERS: dict[Acquisition, Callable[[Problem, BatchMode], Tensor]] = {
    Acquisition.EPIG: _row_scores,
    Acquisition.BALD: _row_scores,
    Acquisition.ENTROPY: _row_scores,
    Acquisition.RANDOM: _row_scores,
    Acquisition.EPIG_INDEPENDENT: _independent_epig,
}
CONDITIONED = frozenset({Acquisition.EPIG, Acquisition.BALD})


def _greedy(p: Problem, budget: int) -> tuple[list[int], list[float]]:
    """The greedy batch that conditions the image posterior on each pick (`select_batch`, exact norms)."""
    if p.settings.norm is Norm.EXPECTED:
        raise ValueError(
            "--norm expected applies to stochastic and top-k batches; greedy ones use the exact norm"
        )
    dtype = dtype_of(resolved_precision(p.settings, BatchMode.GREEDY))
    head, pool, text = p.head.computing_in(dtype), p.pool.to(dtype), p.text.to(dtype)
    targets = None if p.targets is None else p.targets.to(dtype)
    selection = select_batch(
        head,
        pool.acts,
        text.acts,
        budget,
        method=Method(p.settings.method.value),
        target_acts=None if targets is None else targets.acts,
        k=p.settings.draws,
        generator=p.generator,
        pool_offsets=pool.offsets,
        text_offset=text.offsets,
        target_offsets=None if targets is None else targets.offsets,
        picks_per_step=p.settings.picks_per_step,
    )
    return selection.indices, selection.scores


def resolved_batch(settings: SelectionSettings) -> BatchMode:
    """The batch mode `settings` ask for: theirs, else greedy for small budgets and stochastic beyond.

    Random picks are always a uniform draw; methods that cannot condition take the top scores for "greedy".
    """
    mode = settings.batch or default_mode(settings.budget)
    if settings.method is Acquisition.RANDOM:
        return BatchMode.STOCHASTIC
    if mode is BatchMode.GREEDY and settings.method not in CONDITIONED:
        return BatchMode.TOP_K
    return mode


def check_batch(settings: SelectionSettings, mode: BatchMode) -> None:
    """Refuse settings that contradict the batch mode."""
    if settings.dedupe_cosine is not None and mode is BatchMode.GREEDY:
        raise ValueError(
            "--dedupe-cosine needs --batch stochastic or top-k: a greedy batch already conditions on "
            "each pick"
        )


def _ranked(
    p: Problem, sample_ids: list[str], mode: BatchMode, budget: int, mean: Tensor, var: Tensor
) -> tuple[list[int], list[float], int, int]:
    """A batch drawn by keys (`batch_keys`), near-duplicates dropped and refilled: (rows, scores, dropped,
    floored)."""
    settings = p.settings
    scores = SCORERS[settings.method](p, mode).double()  # [Np]
    beta = 0.0 if settings.method is Acquisition.RANDOM else settings.beta
    keys, floored = batch_keys(scores.numpy(), sample_ids, mode, beta=beta, seed=settings.seed)
    ranking = TopN(len(sample_ids))
    ranking.add(keys, sample_ids, np.arange(len(sample_ids)))
    _, _, order = ranking.result()
    order = [int(i) for i in order]
    dropped = 0
    if settings.dedupe_cosine is not None:
        vectors = embed_for_search(mean[order], var[order], Metric.COSINE).numpy()
        kept, removed = drop_near_duplicates(vectors, budget, settings.dedupe_cosine)
        order, dropped = [order[i] for i in kept], len(removed)
    order = order[:budget]
    if settings.method is Acquisition.RANDOM:
        return order, [0.0] * len(order), dropped, 0
    return order, [float(scores[i]) for i in order], dropped, floored


def candidate_problem(
    head: BayesHead,
    text: Activations,
    pool: EmbeddingSet,
    settings: SelectionSettings,
    *,
    targets: EmbeddingSet | None = None,
) -> tuple[Problem, EmbeddingSet]:
    """What `choose` scores, and the candidate rows: with `targets`, the pool narrowed to each target's
    `neighbours` nearest rows (unless `whole_pool`) and at most `max_targets` of the targets (a subset drawn
    with `settings.seed`); the candidates' probit predictive; the generator the scorers draw from.

    `SCORERS[settings.method](problem, mode)` then gives the scores a batch of `mode` ranks by.
    """
    gen = torch.Generator().manual_seed(settings.seed)
    target_rows = None
    if targets is not None and len(targets) > 0:
        if not settings.whole_pool:
            k = min(settings.neighbours, len(pool))
            pool = pool.take(candidates(pool.mean, pool.var, targets.mean, targets.var, k, settings.metric))
        if len(targets) > settings.max_targets:
            targets = targets.take(
                torch.randperm(len(targets), generator=gen)[: settings.max_targets].sort().values
            )
        target_rows = targets.inputs
    logits = head.logits(pool.acts, text.acts, image_offset=pool.offsets, text_offset=text.offsets)
    return Problem(head, text, pool.inputs, target_rows, logits.probit(), settings, gen), pool


def choose(
    head: BayesHead,
    text: Activations,
    classes: list[str],
    pool: EmbeddingSet,
    settings: SelectionSettings,
    *,
    targets: EmbeddingSet | None = None,
    seed: int | None = None,
) -> Choice:
    """Pick `settings.budget` pool rows for labelling.

    With `targets`, the pool is first narrowed to each target's `neighbours` nearest pool points (unless
    `whole_pool`) and EPIG measures information about predictions on (at most `max_targets` of) the
    targets; without, EPIG uses the candidates themselves as the target distribution. The rows' offsets
    are theirs (`EmbeddingSet.offsets`, see `with_offsets`). The batch is greedy with conditioning, a
    stochastic (power) sample or the top scores (`resolved_batch`); `seed` overrides `settings.seed`.
    """
    if len(pool) == 0:
        raise ValueError("the pool is empty")
    settings = settings if seed is None else settings.model_copy(update={"seed": seed})
    mode = resolved_batch(settings)
    check_batch(settings, mode)
    problem, pool = candidate_problem(head, text, pool, settings, targets=targets)
    budget = min(settings.budget, len(pool))
    duplicates = floored = 0
    if mode is BatchMode.GREEDY:
        indices, scores = _greedy(problem, budget)
    else:
        indices, scores, duplicates, floored = _ranked(
            problem, pool.sample_ids, mode, budget, pool.mean, pool.var
        )
    chosen = torch.tensor(indices, dtype=torch.long)
    confidence, predicted = problem.probs[chosen].max(dim=1)
    uncertainty = entropy(problem.probs[chosen])
    picks = [
        Pick(pool.sample_ids[i], rank, score, classes[int(c)], float(p), float(h))
        for rank, (i, score, c, p, h) in enumerate(
            zip(indices, scores, predicted, confidence, uncertainty, strict=True)
        )
    ]
    return Choice(picks, len(pool), mode, duplicates, floored)
