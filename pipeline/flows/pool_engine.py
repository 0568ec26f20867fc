"""The pool engine: score and choose from an embeddings directory of any size without holding it.

    pool embeddings -> [tasks] exact kNN partials per shard, merged top-k per target -> candidates
                    -> [Ray Data] scores + batch keys per row (one RowScorer in the object store)
                    -> <out>/scores/part-<shard>.parquet (resumable, exactly once per shard)
                    -> streamed top-n by key (greedy: conditioning over the best rows)
                    -> near-duplicates dropped and refilled -> the picks, as score rows

`curate` runs it under the posterior the pool was embedded with; a campaign round runs it under the round's
posterior, re-scoring the stored activations (`PoolScoring.reference`: the projection the stored means were
made under, so each row's offset is recovered against it) and leaving out earlier rounds' picks. The driver
holds the targets, the kNN table (targets x neighbours) and the top n rows: never the pool. Each row's
stochastic key depends on its sample id and the seed only, so the batch does not depend on how the pool is
cut into shards or which worker scored it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from pipeline import runtime
from pipeline.bayes.batches import BatchMode, TopN, drop_near_duplicates
from pipeline.bayes.head import Activations, BayesHead
from pipeline.bayes.neighbours import Metric, embed_for_search
from pipeline.bayes.scoring import RowScorer
from pipeline.data.sources import Shard, plan_shards
from pipeline.io import storage, vectors
from pipeline.runtime import Executor
from pipeline.selection import (
    Acquisition,
    EmbeddingSet,
    SelectionSettings,
    check_batch,
    choose,
    dtype_of,
    file_meta,
    resolved_norm,
    resolved_precision,
)
from pipeline.stages.base import Batch
from pipeline.stages.curate import Rescore, Sampling, ScoreStage, knn_partial, merge_knn
from pipeline.stages.embedding_read import FILE, POOL_ROW, EmbeddingReadStage, global_rows, split_rows
from pipeline.stages.shards import Ledger, pending_shards

SCORES_DIR = "scores"
CANDIDATES_FILE = "candidates.parquet"
GREEDY_ROWS = 20  # a greedy batch conditions over the best GREEDY_ROWS x budget rows (at least 1,000)
GREEDY_MIN_ROWS = 1000


class Clock:
    """Seconds per named stage."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class PoolScoring:
    """What the pool is scored under, and what is left out."""

    head: BayesHead
    text: Activations  # class text rows
    classes: list[str]
    posterior_id: str  # of `head`: a scoring directory belongs to one posterior
    targets: EmbeddingSet | None  # EPIG's targets with Gaussians and offsets under `head`
    reference: Tensor | None = None  # [D, d] projection the stored means were made under (None: the head's)
    exclude: frozenset[str] = frozenset()  # sample ids never chosen (an earlier round's picks)

    def rescore(self) -> Rescore | None:
        """How a worker re-computes stored rows under `head` (None: the stored Gaussians are the head's)."""
        if self.reference is None:
            return None
        return Rescore(self.head.computing_in(torch.float32), self.reference.float())


@dataclass(frozen=True)
class PoolChoice:
    """The picks (score rows in rank order) and what the engine saw on the way."""

    picks: pa.Table  # sample_id, score, key, predicted, confidence, entropy, _file, _pool_row, scalars
    candidates: int  # rows scored
    removed_duplicates: int
    floored: int  # scores clamped at the floor of power sampling
    shards: int  # scoring shards
    processed_shards: int  # scored now (the others were complete already)
    nodes: dict[str, set[str]] = field(default_factory=dict)  # stage -> Ray nodes that ran it


# ---------------------------------------------------------------------------------------------- planning


def plan_pool(
    uri: str, rows_per_shard: int, expected_projection: str | None
) -> tuple[list[Shard], list[str]]:
    """Shards of an embeddings directory (quarantine excluded), each file checked to hold the vectors and to
    come from the expected projection; returns the shards and the scalar columns to carry."""
    files = [f for f in storage.list_files(uri, suffix=".parquet") if "/quarantine/" not in f]
    if not files:
        raise FileNotFoundError(f"no embedding Parquet files under {uri!r}")
    scalar: list[str] | None = None
    for path in files:
        fs, p = storage.resolve(path)
        try:
            schema = pq.read_schema(p, filesystem=fs)
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"pool file {path!r} is not readable Parquet ({exc}): re-embed it") from exc
        for needed in ("sample_id", "mean", "var", "acts"):
            if needed not in schema.names:
                hint = " (embed with --activations)" if needed == "acts" else ""
                raise ValueError(f"pool file {path!r} has no {needed!r} column{hint}")
        meta = file_meta(schema)
        if meta.get("projection_sha256") != expected_projection:
            raise ValueError(
                f"pool file {path!r} was embedded under another image projection than the posterior's "
                f"(it names posterior {meta.get('posterior_id')}): the pool is stale, re-embed it"
            )
        names = [
            f.name
            for f in schema
            if f.name not in ("sample_id", "mean", "var", "acts")
            and not (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type))
        ]
        scalar = names if scalar is None else [n for n in scalar if n in names]
    shards = [s for s in plan_shards(uri, "parquet", rows_per_shard) if "/quarantine/" not in s.path]
    return shards, scalar or []


def pool_size(uri: str) -> int:
    """Rows of an embeddings directory, from the Parquet footers alone."""
    total = 0
    for path in storage.list_files(uri, suffix=".parquet"):
        if "/quarantine/" not in path:
            fs, p = storage.resolve(path)
            total += pq.ParquetFile(p, filesystem=fs).metadata.num_rows
    return total


def file_index_of(shard: Shard) -> int:
    return int(shard.shard_id.split("-", 1)[0])


# ------------------------------------------------------------------------------------- candidates (kNN)


def knn_candidates(
    executor: Executor,
    shards: list[Shard],
    targets: EmbeddingSet,
    k: int,
    metric: Metric,
    *,
    rescore: Rescore | None = None,
    exclude: frozenset[str] = frozenset(),
) -> tuple[dict[str, np.ndarray], set[str]]:
    """The `k` nearest pool rows of every target, by exact per-shard search merged by a top-k reduction;
    returns shard id -> sorted local rows of the candidates, and the nodes that searched."""
    queries = embed_for_search(targets.mean.float(), targets.var.float().clamp_min(0), metric)  # [Nt, D']
    shared = runtime.share(executor, queries)
    shared_rescore = None if rescore is None else runtime.share(executor, rescore)
    tasks = runtime.tasks(executor, num_cpus=1.0, spread=True)  # compute-bound: one per core, every node
    merged: tuple[np.ndarray, np.ndarray] | None = None
    handles = [
        tasks.submit(knn_partial, shard, shared, k, metric, shared_rescore, exclude) for shard in shards
    ]
    nodes: set[str] = set()
    for partial, node in tasks.gather(handles):
        merged = merge_knn(merged, partial, k)
        nodes.add(node)
    if merged is None:
        raise ValueError("the pool has no shards to search: is the embeddings directory empty?")
    files, rows = split_rows(np.unique(merged[1][np.isfinite(merged[0])]))
    by_shard: dict[str, list[int]] = {}
    for shard in shards:
        index = file_index_of(shard)
        inside = (files == index) & (rows >= shard.start) & (rows < shard.stop)
        if inside.any():
            by_shard[shard.shard_id] = (rows[inside] - shard.start).tolist()
    return {sid: np.asarray(sorted(r), dtype=np.int64) for sid, r in by_shard.items()}, nodes


# ---------------------------------------------------------------------------------------------- scoring


class ScoreSink:
    """Writes one score part per complete shard, then its marker (min/max score for the histogram)."""

    def __init__(self, out: str) -> None:
        self.out = out.rstrip("/")
        self.ledger = Ledger(self.out)

    def __call__(self, shard_id: str, rows: Batch) -> dict[str, object]:
        columns: dict[str, pa.Array] = {}
        for name, values in rows.items():
            if name.startswith("_") and name not in (FILE, POOL_ROW):
                continue
            if values.dtype == object:
                columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
            else:
                columns[name] = pa.array(values)
        table = pa.table(columns)
        storage.write_parquet(table, f"{self.out}/part-{shard_id}.parquet")
        scores = np.asarray(rows["score"], dtype=np.float64)
        info = {
            "rows": int(table.num_rows),
            "floored": int(np.sum(rows["floored"])),
            "min": float(scores.min()) if len(scores) else None,
            "max": float(scores.max()) if len(scores) else None,
        }
        self.ledger.mark(shard_id, info)
        return info


def score_parts(out: str) -> list[str]:
    return storage.list_files(storage.join(out, SCORES_DIR), suffix=".parquet")


def top_rows(parts: list[str], n: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The `n` best rows by key over every score part, streamed one part at a time: (keys, ids, rows) with
    rows = part index << 32 | row in the part."""
    best = TopN(n)
    for i, path in enumerate(parts):
        table = storage.read_parquet(path, columns=["sample_id", "key"])
        keys = table.column("key").to_numpy()
        best.add(keys, table.column("sample_id").to_pylist(), global_rows(i, np.arange(len(keys))))
    return best.result()


def records(parts: list[str], rows: np.ndarray) -> pa.Table:
    """The score-part rows named by `top_rows`' row numbers, in that order."""
    part_of, row_of = split_rows(rows)
    pieces, order = [], []
    for part in np.unique(part_of):
        at = np.flatnonzero(part_of == part)
        table = storage.read_parquet(parts[int(part)])
        pieces.append(table.take(pa.array(row_of[at])))
        order.append(at)
    if not pieces:
        return pa.table({})
    table = pa.concat_tables(pieces, promote_options="default")
    return table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))


def _read_rows(path: str, wanted: np.ndarray, columns: Sequence[str]) -> pa.Table:
    """Rows `wanted` of one Parquet file, in that order, reading only the row groups that hold them."""
    fs, p = storage.resolve(path)
    pf = pq.ParquetFile(p, filesystem=fs)
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
    starts = np.cumsum([0, *sizes])
    groups = sorted(set(np.searchsorted(starts, wanted, side="right") - 1))
    table = pf.read_row_groups(groups, columns=list(columns))
    local = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups])
    position = {int(r): i for i, r in enumerate(local)}
    return table.take(pa.array([position[int(r)] for r in wanted]))


def pool_rows(shards: list[Shard], picks: pa.Table, columns: Sequence[str]) -> pa.Table:
    """Columns of the pool rows that `picks` name (`_file`, `_pool_row`), in the order of `picks`."""
    paths = {file_index_of(s): s.path for s in shards}
    files = picks.column(FILE).to_numpy()
    rows = picks.column(POOL_ROW).to_numpy()
    pieces, order = [], []
    for index in np.unique(files):
        at = np.flatnonzero(files == index)
        pieces.append(_read_rows(paths[int(index)], rows[at], columns))
        order.append(at)
    table = pa.concat_tables(pieces)
    return table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))


def rows_by_id(uri: str, sample_ids: Sequence[str], columns: Sequence[str]) -> pa.Table:
    """The rows of an embeddings directory with these sample ids, in that order, one file at a time (only
    the id column is read whole); a missing id raises, naming a few."""
    wanted = {sid: i for i, sid in enumerate(sample_ids)}
    pieces, order = [], []
    for path in storage.list_files(uri, suffix=".parquet"):
        if "/quarantine/" in path:
            continue
        fs, p = storage.resolve(path)
        ids = pq.read_table(p, columns=["sample_id"], filesystem=fs).column("sample_id").to_pylist()
        hits = [(row, wanted[sid]) for row, sid in enumerate(ids) if sid in wanted]
        if hits:
            pieces.append(_read_rows(path, np.asarray([r for r, _ in hits], dtype=np.int64), columns))
            order.extend(at for _, at in hits)
    found = {int(at) for at in order}
    missing = [sid for sid, at in wanted.items() if at not in found]
    if missing:
        raise ValueError(f"{len(missing)} samples are not in the pool {uri!r}: {missing[:5]}")
    table = pa.concat_tables(pieces)
    return table.take(pa.array(np.argsort(np.asarray(order), kind="stable")))


def read_back(scoring: PoolScoring, shards: list[Shard], ranked: pa.Table) -> EmbeddingSet:
    """The pool rows that `ranked` names as the head sees them: activations, offsets and Gaussians."""
    pool = pool_rows(shards, ranked, ["mean", "var", "acts"])
    rows = EmbeddingSet(
        ranked.column("sample_id").to_pylist(),
        vectors.tensor(pool, "mean"),
        vectors.tensor(pool, "var"),
        vectors.tensor(pool, "acts"),
        {},
    )
    if scoring.reference is None:
        return rows.with_offsets(scoring.head)
    offset = rows.mean - rows.acts @ scoring.reference.T.to(rows.acts.dtype)  # [n, D]
    scale = max(1.0, float(rows.mean.abs().max())) if len(rows) else 1.0
    offset = None if not len(rows) or float(offset.abs().max()) <= 1e-5 * scale else offset
    mean, var = scoring.head.image_embeddings(rows.acts, offset)
    return EmbeddingSet(rows.sample_ids, mean, var, rows.acts, {}, offsets=offset)


# ---------------------------------------------------------------------------------------------- the engine


def choose_from_pool(
    scoring: PoolScoring,
    settings: SelectionSettings,
    mode: BatchMode,
    pool: str,
    shards: list[Shard],
    scalar: list[str],
    out: str,
    *,
    executor: Executor,
    batch_size: int = 4096,
    clock: Clock | None = None,
) -> PoolChoice:
    """Candidates, scores and the batch of `settings.budget` rows (resumable under `out`).

    Runs inside `runtime.ray_session` when `executor` is ray. With targets (and not `whole_pool`) the pool
    is first narrowed to every target's `neighbours` nearest rows, as `choose` does in one process.
    """
    check_batch(settings, mode)
    clock = clock or Clock()
    gen = torch.Generator().manual_seed(settings.seed)
    targets = scoring.targets
    if targets is not None and len(targets) > settings.max_targets:  # the subset `choose` draws
        targets = targets.take(
            torch.randperm(len(targets), generator=gen)[: settings.max_targets].sort().values
        )
    nodes: dict[str, set[str]] = {}
    keep = None
    if scoring.targets is not None and not settings.whole_pool:
        with clock.stage("knn"):
            keep = _candidates(scoring, settings, shards, out, executor, nodes)
    todo_shards = shards if keep is None else [s for s in shards if s.shard_id in keep]
    with clock.stage("score"):
        ledger = Ledger(storage.join(out, SCORES_DIR))
        params = {
            "posterior_id": scoring.posterior_id,
            "selection": settings.model_dump(mode="json", exclude={"budget", "dedupe_cosine"}),
            "candidates": None if keep is None else sum(len(v) for v in keep.values()),
            "excluded": len(scoring.exclude),
        }
        ledger.check_plan(pool, todo_shards, params, scan=None)
        todo = pending_shards(ledger, todo_shards)
        if todo:
            nodes |= _score(
                scoring, settings, targets, gen, mode, scalar, todo, keep, out, executor, batch_size
            )
    parts = score_parts(out)
    markers = ledger.markers()
    scored = sum(m["rows"] for m in markers)
    budget = min(settings.budget, scored)
    with clock.stage("select"):
        picks, removed = _select(scoring, settings, shards, parts, mode, budget, scored)
    return PoolChoice(
        picks=picks,
        candidates=scored,
        removed_duplicates=removed,
        floored=sum(m["floored"] for m in markers),
        shards=len(todo_shards),
        processed_shards=len(todo),
        nodes=nodes,
    )


def _candidates(
    scoring: PoolScoring,
    settings: SelectionSettings,
    shards: list[Shard],
    out: str,
    executor: Executor,
    nodes: dict[str, set[str]],
) -> dict[str, np.ndarray]:
    """The neighbour step, computed once and kept in `candidates.parquet` so a rerun reuses it."""
    if scoring.targets is None:
        raise ValueError("the neighbour step needs targets: give --targets, or --whole-pool")
    path = storage.join(out, CANDIDATES_FILE)
    stamp = (
        f"{settings.neighbours}:{settings.metric.value}:{len(scoring.targets)}:{scoring.posterior_id}:"
        f"{len(scoring.exclude)}"
    )
    if storage.is_file(path):
        table = storage.read_parquet(path)
        if (table.schema.metadata or {}).get(b"stamp", b"").decode() == stamp:
            found: dict[str, list[int]] = {}
            for sid, row in zip(
                table.column("shard").to_pylist(), table.column("row").to_pylist(), strict=True
            ):
                found.setdefault(sid, []).append(row)
            return {k: np.asarray(v, dtype=np.int64) for k, v in found.items()}
    keep, nodes["knn"] = knn_candidates(
        executor,
        shards,
        scoring.targets,
        settings.neighbours,
        settings.metric,
        rescore=scoring.rescore(),
        exclude=scoring.exclude,
    )
    table = pa.table(
        {
            "shard": [sid for sid, rows in keep.items() for _ in rows],
            "row": pa.array(np.concatenate(list(keep.values())) if keep else [], pa.int64()),
        }
    ).replace_schema_metadata({b"stamp": stamp.encode()})
    storage.write_parquet(table, path)
    return keep


def _score(
    scoring: PoolScoring,
    settings: SelectionSettings,
    targets: EmbeddingSet | None,
    gen: torch.Generator,
    mode: BatchMode,
    scalar: list[str],
    todo: list[Shard],
    keep: dict[str, np.ndarray] | None,
    out: str,
    executor: Executor,
    batch_size: int,
) -> dict[str, set[str]]:
    from pipeline.bayes.acquisition import joint_seed

    scorer = RowScorer(
        scoring.head,
        scoring.text,
        settings.method.value,
        targets=None if targets is None else targets.inputs,
        draws=settings.draws,
        seed=joint_seed(gen),
        norm=resolved_norm(settings, mode),
        dtype=dtype_of(resolved_precision(settings, mode)),
    )
    plan = runtime.plan(executor)
    # CPU scoring on Ray runs as tasks (`ScoreStage`), each using the CPUs it reserved; in-process and GPU
    # actors use the plan's threads.
    tasks_on_cpu = Executor(executor) is Executor.RAY and plan.device == "cpu"
    threads = max(1, round(plan.actor_cpus)) if tasks_on_cpu else plan.actor_threads
    random = settings.method is Acquisition.RANDOM
    sampling = Sampling(
        BatchMode.STOCHASTIC if random else (BatchMode.TOP_K if mode is BatchMode.GREEDY else mode),
        0.0 if random else settings.beta,
        settings.seed,
    )
    stage = ScoreStage(
        runtime.share(executor, scorer),
        scoring.classes,
        sampling,
        reference=scoring.reference,
        device=plan.device,
        threads=threads,
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
        batch_size=batch_size,
    )
    read = EmbeddingReadStage(
        ("acts", "mean"), scalar, keep, exclude=scoring.exclude, num_cpus=plan.read_cpus
    )
    return runtime.run_stages(
        executor,
        todo,
        [stage],
        ScoreSink(storage.join(out, SCORES_DIR)),
        pool_size=plan.actors,
        read=read,
        total=None if keep is None else sum(len(keep.get(s.shard_id, ())) for s in todo),
    )


def _select(
    scoring: PoolScoring,
    settings: SelectionSettings,
    shards: list[Shard],
    parts: list[str],
    mode: BatchMode,
    budget: int,
    total: int,
) -> tuple[pa.Table, int]:
    """The batch from the scored rows: by key (near-duplicates dropped and refilled), or greedy."""
    if budget == 0:
        return pa.table({"sample_id": pa.array([], pa.string())}), 0
    if mode is BatchMode.GREEDY:
        return _greedy(scoring, settings, shards, parts, budget), 0
    if settings.dedupe_cosine is None:
        _, _, rows = top_rows(parts, budget)
        return records(parts, rows), 0
    n = min(total, 2 * budget + 64)
    while True:
        _, _, rows = top_rows(parts, n)
        ranked = records(parts, rows)
        found = read_back(scoring, shards, ranked)
        search = embed_for_search(found.mean.float(), found.var.float().clamp_min(0), Metric.COSINE)
        kept, removed = drop_near_duplicates(search.numpy(), budget, settings.dedupe_cosine)
        if len(kept) == budget or n == total:
            return ranked.take(pa.array(kept)), len(removed)
        n = min(total, 2 * n)


def _greedy(
    scoring: PoolScoring,
    settings: SelectionSettings,
    shards: list[Shard],
    parts: list[str],
    budget: int,
) -> pa.Table:
    """Conditioning greedy batch (`choose`) over the best-scored rows, whose activations are read back."""
    _, _, rows = top_rows(parts, max(GREEDY_MIN_ROWS, GREEDY_ROWS * budget))
    ranked = records(parts, rows)
    found = read_back(scoring, shards, ranked)
    whole = settings.model_copy(update={"whole_pool": True, "budget": budget})
    choice = choose(scoring.head, scoring.text, scoring.classes, found, whole, targets=scoring.targets)
    position = {sid: i for i, sid in enumerate(found.sample_ids)}
    chosen = ranked.take(pa.array([position[p.sample_id] for p in choice.picks]))
    return chosen.set_column(
        chosen.column_names.index("score"), "score", pa.array([p.score for p in choice.picks], pa.float64())
    )
