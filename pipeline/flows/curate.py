"""Curation at scale: choose `budget` images out of a pool of millions, in bounded memory, on Ray.

    pool embeddings -> [tasks] exact kNN partials per shard, merged top-k per target -> candidates
                    -> [Ray Data] scores + batch keys per row (one RowScorer in the object store)
                    -> scores/part-<shard>.parquet (resumable, exactly once per shard)
                    -> streamed top-n by key (greedy: conditioning over the best rows)
                    -> near-duplicates dropped and refilled -> curated.parquet, curate.json (+ images)

The driver holds the targets, the kNN table (targets x neighbours) and the top n rows: never the pool. Each
row's stochastic key depends on its sample id and the seed only, so the batch does not depend on how the
pool is cut into shards or which worker scored it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import runtime
from pipeline.artifacts.posterior import load_posterior, projection_sha256, read_info
from pipeline.bayes.batches import BatchMode, TopN, drop_near_duplicates
from pipeline.bayes.head import Activations
from pipeline.bayes.neighbours import Metric, embed_for_search
from pipeline.bayes.scoring import RowScorer
from pipeline.classes import class_text_features, read_classes
from pipeline.config import TrackedConfig
from pipeline.data.materialize import MaterializeFormat, materialize
from pipeline.data.sources import Shard, plan_shards
from pipeline.io import storage, vectors
from pipeline.runtime import Executor
from pipeline.selection import (
    Acquisition,
    EmbeddingSet,
    SelectingConfig,
    choose,
    dtype_of,
    file_meta,
    read_embeddings,
    resolved_batch,
    resolved_norm,
    resolved_precision,
)
from pipeline.stages.base import Batch
from pipeline.stages.curate import (
    FILE,
    POOL_ROW,
    EmbeddingReadStage,
    Sampling,
    ScoreStage,
    global_rows,
    knn_partial,
    merge_knn,
    split_rows,
)
from pipeline.stages.embed import ModelSpec
from pipeline.stages.shards import Ledger, pending_shards

SCORES_DIR = "scores"
CURATED_FILE = "curated.parquet"
REPORT_FILE = "curate.json"
CANDIDATES_FILE = "candidates.parquet"
GREEDY_ROWS = 20  # a greedy batch conditions over the best GREEDY_ROWS x budget rows (at least 1,000)
CURATED_COLUMNS = ("sample_id", "source", "score", "rank", "predicted", "confidence", "entropy")


class CurateConfig(TrackedConfig, SelectingConfig):
    """What `curate` chooses from, how, and where the curated set goes."""

    pool: str  # embeddings of the pool (embed --activations): a folder or URI of Parquet files
    posterior: str  # posterior directory the pool was embedded with
    classes: str  # classes file (JSON from make-world, or one class a line)
    out: str  # output folder or URI: curated.parquet, curate.json, scores/, and the chosen images
    targets: str | None = None  # embeddings of the deployment domain: EPIG's targets and the neighbour step
    materialize: MaterializeFormat | None = None  # also write the chosen images (and captions) as a data set
    shard_size: int = 1000  # images per materialized shard
    rows_per_shard: int = 16384  # pool rows per scoring shard: the unit of resumable work
    batch_size: int = 4096  # rows per scoring call
    executor: Executor = Executor.RAY  # where the scoring runs
    address: str | None = None  # Ray cluster address (default: embedded local Ray, or $RAY_ADDRESS)
    num_cpus: int | None = None  # CPUs of the embedded local Ray (default: all)


@dataclass(frozen=True)
class CurateResult:
    """What a curation produced (also `curate.json` under `out`)."""

    out: str
    rows: int  # pool rows
    candidates: int  # rows scored (after the neighbour step)
    picks: int
    removed_duplicates: int
    floored: int  # scores clamped at the floor of power sampling
    method: str
    batch: str
    norm: str
    precision: str
    seed: int
    posterior_id: str
    seconds: float
    stages: dict[str, float]  # seconds per stage
    shards: int  # scoring shards
    processed_shards: int  # scored now (the others were complete already)
    nodes: dict[str, list[str]]  # stage -> Ray nodes that ran it
    domains: dict[str, int] = field(default_factory=dict)  # picks per value of the pool's domain column
    materialized: dict[str, Any] | None = None
    message: str | None = None  # e.g. why fewer picks than the budget
    mlflow_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Clock:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- planning


def plan_pool(
    uri: str, rows_per_shard: int, expected_projection: str | None
) -> tuple[list[Shard], list[str]]:
    """Shards of an embeddings directory (quarantine excluded), each file checked to hold the vectors and to
    come from the posterior's projection; returns the shards and the scalar columns to carry."""
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


# ------------------------------------------------------------------------------------- candidates (kNN)


def knn_candidates(
    executor: Executor, shards: list[Shard], targets: EmbeddingSet, k: int, metric: Metric
) -> tuple[dict[str, np.ndarray], set[str]]:
    """The `k` nearest pool rows of every target, by exact per-shard search merged by a top-k reduction;
    returns shard id -> sorted local rows of the candidates, and the nodes that searched."""
    queries = embed_for_search(targets.mean.float(), targets.var.float().clamp_min(0), metric)  # [Nt, D']
    shared = runtime.share(executor, queries)
    tasks = runtime.tasks(executor)
    merged: tuple[np.ndarray, np.ndarray] | None = None
    handles = [tasks.submit(knn_partial, shard, shared, k, metric) for shard in shards]
    nodes: set[str] = set()
    for partial, node in tasks.gather(handles):
        merged = merge_knn(merged, partial, k)
        nodes.add(node)
    assert merged is not None
    files, rows = split_rows(np.unique(merged[1]))
    by_shard: dict[str, list[int]] = {}
    for shard in shards:
        index = file_index_of(shard)
        inside = (files == index) & (rows >= shard.start) & (rows < shard.stop)
        if inside.any():
            by_shard[shard.shard_id] = (rows[inside] - shard.start).tolist()
    return {sid: np.asarray(sorted(r), dtype=np.int64) for sid, r in by_shard.items()}, nodes


def file_index_of(shard: Shard) -> int:
    return int(shard.shard_id.split("-", 1)[0])


# ---------------------------------------------------------------------------------------------- scoring


class ScoreSink:
    """Writes one score part per complete shard, then its marker (min/max score for the histogram)."""

    def __init__(self, out: str) -> None:
        self.out = out.rstrip("/")
        self.ledger = Ledger(self.out)

    def __call__(self, shard_id: str, rows: Batch) -> dict[str, Any]:
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


def pool_rows(shards: list[Shard], picks: pa.Table, columns: list[str]) -> pa.Table:
    """Columns of the pool rows that `picks` name (`_file`, `_pool_row`), in the order of `picks`, reading
    only the row groups that hold them."""
    paths = {file_index_of(s): s.path for s in shards}
    files = picks.column(FILE).to_numpy()
    rows = picks.column(POOL_ROW).to_numpy()
    pieces, order = [], []
    for index in np.unique(files):
        at = np.flatnonzero(files == index)
        fs, path = storage.resolve(paths[int(index)])
        pf = pq.ParquetFile(path, filesystem=fs)
        starts = np.cumsum(
            [0] + [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        )
        wanted = rows[at]
        groups = sorted(set(np.searchsorted(starts, wanted, side="right") - 1))
        table = pf.read_row_groups(groups, columns=columns)
        local = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups])
        position = {int(r): i for i, r in enumerate(local)}
        pieces.append(table.take(pa.array([position[int(r)] for r in wanted])))
        order.append(at)
    table = pa.concat_tables(pieces)
    return table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))


# ---------------------------------------------------------------------------------------------- the flow


@dataclass
class _Inputs:
    head: Any
    text: Activations
    classes: list[str]
    posterior_id: str
    targets: EmbeddingSet | None


def _load(cfg: CurateConfig) -> tuple[_Inputs, dict[str, Any]]:
    info = read_info(cfg.posterior)
    adapter = ModelSpec(info["model"].get("name"), info["model"].get("pretrained")).load()
    head = load_posterior(cfg.posterior, adapter)
    spec = read_classes(cfg.classes)
    text_acts, text_offset = class_text_features(adapter, spec)
    targets = None
    if cfg.targets:
        targets = read_embeddings(cfg.targets)
        if targets.meta.get("projection_sha256") != projection_sha256(info):
            raise ValueError(
                f"the target embeddings {cfg.targets!r} were made under another image projection than "
                f"posterior {info['posterior_id']} uses: re-embed them"
            )
        targets = targets.with_offsets(head)
    return _Inputs(head, Activations(text_acts, text_offset), spec.names, info["posterior_id"], targets), info


def _check(cfg: CurateConfig, inputs: _Inputs) -> None:
    method = cfg.selection.method
    if method is Acquisition.EPIG_INDEPENDENT:
        raise ValueError("--method epig-independent is a comparison baseline of `select`, not of `curate`")
    if method is Acquisition.EPIG and inputs.targets is None:
        raise ValueError("--method epig needs --targets: embeddings of the domain the set is curated for")
    if cfg.selection.dedupe_cosine is not None and resolved_batch(cfg.selection) is BatchMode.GREEDY:
        raise ValueError(
            "--dedupe-cosine needs --batch stochastic or top-k: a greedy batch already conditions on "
            "each pick"
        )


def curate(cfg: CurateConfig) -> CurateResult:
    """Score the pool, draw the batch, drop near-duplicates, write the curated set (resumable)."""
    start = time.perf_counter()
    clock = _Clock()
    settings = cfg.selection
    mode = resolved_batch(settings)
    with clock.stage("load"):
        inputs, info = _load(cfg)
        _check(cfg, inputs)
        shards, scalar = plan_pool(cfg.pool, cfg.rows_per_shard, projection_sha256(info))
    rows_total = sum(s.rows for s in shards)
    gen = torch.Generator().manual_seed(settings.seed)
    targets = inputs.targets
    if targets is not None and len(targets) > settings.max_targets:  # the subset `choose` draws
        targets = targets.take(
            torch.randperm(len(targets), generator=gen)[: settings.max_targets].sort().values
        )
    nodes: dict[str, set[str]] = {}
    todo: list[Shard] = []
    with runtime.ray_session(cfg.executor, cfg.address, cfg.num_cpus):
        keep = None
        if inputs.targets is not None and not settings.whole_pool:
            with clock.stage("knn"):
                keep = _candidates(cfg, shards, inputs.targets, nodes)
        todo_shards = shards if keep is None else [s for s in shards if s.shard_id in keep]
        candidates = sum(s.rows for s in todo_shards) if keep is None else sum(len(v) for v in keep.values())
        with clock.stage("score"):
            ledger = Ledger(storage.join(cfg.out, SCORES_DIR))
            params = {
                "posterior_id": inputs.posterior_id,
                "selection": settings.model_dump(mode="json", exclude={"budget", "dedupe_cosine"}),
                "candidates": candidates,
            }
            ledger.check_plan(cfg.pool, todo_shards, params, scan=None)
            todo = pending_shards(ledger, todo_shards)
            if todo:
                nodes |= _score(cfg, inputs, targets, gen, mode, scalar, todo, keep)
    parts = score_parts(cfg.out)
    n_scored = sum(m["rows"] for m in ledger.markers())
    floored = sum(m["floored"] for m in ledger.markers())
    budget = min(settings.budget, n_scored)
    with clock.stage("select"):
        picks, removed = _select(cfg, inputs, shards, parts, mode, budget, n_scored)
    with clock.stage("write"):
        table = _curated_table(picks, shards)
        storage.write_parquet(table, storage.join(cfg.out, CURATED_FILE))
    materialized = None
    if cfg.materialize is not None:
        with clock.stage("materialize"):
            done = materialize(
                table.to_pylist(), storage.join(cfg.out, "images"), cfg.materialize, shard_size=cfg.shard_size
            )
            materialized = {
                "format": cfg.materialize.value,
                "files": len(done.files),
                "rows": done.rows,
                "missing": done.missing,
            }
    message = None
    if settings.budget > n_scored:
        message = (
            f"the budget ({settings.budget}) is above the {n_scored} candidates: all candidates were chosen"
        )
    domains = dict(Counter(table.column("domain").to_pylist())) if "domain" in table.column_names else {}
    result = CurateResult(
        out=cfg.out,
        rows=rows_total,
        candidates=n_scored,
        picks=table.num_rows,
        removed_duplicates=removed,
        floored=floored,
        method=settings.method.value,
        batch=mode.value,
        norm=resolved_norm(settings, mode).value,
        precision=resolved_precision(settings, mode).value,
        seed=settings.seed,
        posterior_id=inputs.posterior_id,
        seconds=time.perf_counter() - start,
        stages=clock.stages,
        shards=len(todo_shards),
        processed_shards=len(todo),
        nodes={k: sorted(v) for k, v in nodes.items()},
        domains={str(k): v for k, v in domains.items()},
        materialized=materialized,
        message=message,
    )
    if cfg.tracking:
        from pipeline.flows.curate_tracking import track

        with clock.stage("track"):
            run_id = track(cfg, result, table, parts, ledger.markers())
        result = replace(result, mlflow_run_id=run_id, stages=clock.stages)
    storage.write_json(storage.join(cfg.out, REPORT_FILE), result.to_json())
    return result


def _candidates(
    cfg: CurateConfig, shards: list[Shard], targets: EmbeddingSet, nodes: dict[str, set[str]]
) -> dict[str, np.ndarray]:
    """The neighbour step, computed once and kept in `candidates.parquet` so a rerun reuses it."""
    path = storage.join(cfg.out, CANDIDATES_FILE)
    settings = cfg.selection
    stamp = f"{settings.neighbours}:{settings.metric.value}:{len(targets)}"
    if storage.is_file(path):
        table = storage.read_parquet(path)
        if (table.schema.metadata or {}).get(b"stamp", b"").decode() == stamp:
            found: dict[str, list[int]] = {}
            for sid, row in zip(
                table.column("shard").to_pylist(), table.column("row").to_pylist(), strict=True
            ):
                found.setdefault(sid, []).append(row)
            return {k: np.asarray(v, dtype=np.int64) for k, v in found.items()}
    keep, nodes["knn"] = knn_candidates(cfg.executor, shards, targets, settings.neighbours, settings.metric)
    table = pa.table(
        {
            "shard": [sid for sid, rows in keep.items() for _ in rows],
            "row": pa.array(np.concatenate(list(keep.values())) if keep else [], pa.int64()),
        }
    ).replace_schema_metadata({b"stamp": stamp.encode()})
    storage.write_parquet(table, path)
    return keep


def _score(
    cfg: CurateConfig,
    inputs: _Inputs,
    targets: EmbeddingSet | None,
    gen: torch.Generator,
    mode: BatchMode,
    scalar: list[str],
    todo: list[Shard],
    keep: dict[str, np.ndarray] | None,
) -> dict[str, set[str]]:
    from pipeline.bayes.acquisition import joint_seed

    settings = cfg.selection
    scorer = RowScorer(
        inputs.head,
        inputs.text,
        settings.method.value,
        targets=None if targets is None else targets.inputs,
        draws=settings.draws,
        seed=joint_seed(gen),
        norm=resolved_norm(settings, mode),
        dtype=dtype_of(resolved_precision(settings, mode)),
    )
    plan = runtime.plan(cfg.executor)
    random = settings.method is Acquisition.RANDOM
    sampling = Sampling(
        BatchMode.STOCHASTIC if random else (BatchMode.TOP_K if mode is BatchMode.GREEDY else mode),
        0.0 if random else settings.beta,
        settings.seed,
    )
    stage = ScoreStage(
        runtime.share(cfg.executor, scorer),
        inputs.classes,
        sampling,
        device=plan.device,
        threads=plan.actor_threads,
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
        batch_size=cfg.batch_size,
    )
    read = EmbeddingReadStage(("acts", "mean"), scalar, keep, num_cpus=plan.read_cpus)
    return runtime.run_stages(
        cfg.executor,
        todo,
        [stage],
        ScoreSink(storage.join(cfg.out, SCORES_DIR)),
        pool_size=plan.actors,
        read=read,
    )


def _select(
    cfg: CurateConfig,
    inputs: _Inputs,
    shards: list[Shard],
    parts: list[str],
    mode: BatchMode,
    budget: int,
    total: int,
) -> tuple[pa.Table, int]:
    """The batch from the scored rows: by key (near-duplicates dropped and refilled), or greedy."""
    settings = cfg.selection
    if budget == 0:
        return pa.table({"sample_id": pa.array([], pa.string())}), 0
    if mode is BatchMode.GREEDY:
        return _greedy(cfg, inputs, shards, parts, budget), 0
    if settings.dedupe_cosine is None:
        _, _, rows = top_rows(parts, budget)
        return records(parts, rows), 0
    n = min(total, 2 * budget + 64)
    while True:
        _, _, rows = top_rows(parts, n)
        ranked = records(parts, rows)
        moments = pool_rows(shards, ranked, ["mean", "var"])
        search = embed_for_search(
            torch.tensor(vectors.matrix(moments, "mean", np.float32)),
            torch.tensor(vectors.matrix(moments, "var", np.float32)).clamp_min(0),
            Metric.COSINE,
        ).numpy()
        kept, removed = drop_near_duplicates(search, budget, settings.dedupe_cosine)
        if len(kept) == budget or n == total:
            return ranked.take(pa.array(kept)), len(removed)
        n = min(total, 2 * n)


def _greedy(
    cfg: CurateConfig,
    inputs: _Inputs,
    shards: list[Shard],
    parts: list[str],
    budget: int,
) -> pa.Table:
    """Conditioning greedy batch (`choose`) over the best-scored rows, whose activations are read back."""
    _, _, rows = top_rows(parts, max(1000, GREEDY_ROWS * budget))
    ranked = records(parts, rows)
    pool = pool_rows(shards, ranked, ["mean", "var", "acts"])
    rows_set = EmbeddingSet(
        ranked.column("sample_id").to_pylist(),
        vectors.tensor(pool, "mean"),
        vectors.tensor(pool, "var"),
        vectors.tensor(pool, "acts"),
        {},
    ).with_offsets(inputs.head)
    settings = cfg.selection.model_copy(update={"whole_pool": True, "budget": budget})
    choice = choose(inputs.head, inputs.text, inputs.classes, rows_set, settings, targets=inputs.targets)
    position = {sid: i for i, sid in enumerate(rows_set.sample_ids)}
    chosen = ranked.take(pa.array([position[p.sample_id] for p in choice.picks]))
    return chosen.set_column(
        chosen.column_names.index("score"), "score", pa.array([p.score for p in choice.picks], pa.float64())
    )


def _curated_table(picks: pa.Table, shards: list[Shard]) -> pa.Table:
    """`curated.parquet`: the picks in rank order with what a trainer and a reviewer need."""
    n = picks.num_rows
    if n == 0:
        return pa.table({name: pa.array([], pa.string()) for name in ("sample_id", "source")})
    out = {
        "sample_id": picks.column("sample_id"),
        "source": picks.column("source")
        if "source" in picks.column_names
        else pa.array([None] * n, pa.string()),
        "score": picks.column("score"),
        "rank": pa.array(np.arange(n, dtype=np.int32)),
        "predicted": picks.column("predicted"),
        "confidence": picks.column("confidence"),
        "entropy": picks.column("entropy"),
    }
    for name in picks.column_names:
        if name not in out and name not in ("key", "floored") and not name.startswith("_"):
            out[name] = picks.column(name)
    return pa.table(out)
