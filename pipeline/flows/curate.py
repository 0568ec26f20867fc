"""Curation at scale: choose `budget` images out of a pool of millions, in bounded memory, on Ray.

The pool engine (`pipeline.flows.pool_engine`) finds the candidates, scores them and draws the batch; this
flow adds what makes the batch a data set: `curated.parquet` (the picks in rank order with their prediction
and the pool's scalar columns), `curate.json`, the chosen images when asked (`--materialize`), and the MLflow
run (`pipeline.flows.curate_tracking`). Resumable: scored shards are not redone after a crash.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import runtime
from pipeline.artifacts.posterior import load_posterior, projection_sha256, read_info
from pipeline.bayes.head import Activations
from pipeline.classes import class_text_features, read_classes
from pipeline.config import TrackedConfig
from pipeline.data.materialize import MaterializeFormat, materialize
from pipeline.flows.pool_engine import (
    SCORES_DIR,
    Clock,
    PoolScoring,
    choose_from_pool,
    plan_pool,
    score_parts,
)
from pipeline.io import storage
from pipeline.runtime import Executor
from pipeline.selection import (
    Acquisition,
    EmbeddingSet,
    SelectingConfig,
    check_batch,
    read_embeddings,
    resolved_batch,
    resolved_norm,
    resolved_precision,
)
from pipeline.stages.embed import ModelSpec
from pipeline.stages.shards import Ledger

CURATED_FILE = "curated.parquet"
REPORT_FILE = "curate.json"
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
    check_batch(cfg.selection, resolved_batch(cfg.selection))


def curate(cfg: CurateConfig) -> CurateResult:
    """Score the pool, draw the batch, drop near-duplicates, write the curated set (resumable)."""
    start = time.perf_counter()
    clock = Clock()
    settings = cfg.selection
    mode = resolved_batch(settings)
    with clock.stage("load"):
        inputs, info = _load(cfg)
        _check(cfg, inputs)
        shards, scalar = plan_pool(cfg.pool, cfg.rows_per_shard, projection_sha256(info))
    scoring = PoolScoring(inputs.head, inputs.text, inputs.classes, inputs.posterior_id, inputs.targets)
    with runtime.ray_session(cfg.executor, cfg.address, cfg.num_cpus):
        chosen = choose_from_pool(
            scoring,
            settings,
            mode,
            cfg.pool,
            shards,
            scalar,
            cfg.out,
            executor=cfg.executor,
            batch_size=cfg.batch_size,
            clock=clock,
        )
    n_scored = chosen.candidates
    with clock.stage("write"):
        table = _curated_table(chosen.picks)
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
        rows=sum(s.rows for s in shards),
        candidates=n_scored,
        picks=table.num_rows,
        removed_duplicates=chosen.removed_duplicates,
        floored=chosen.floored,
        method=settings.method.value,
        batch=mode.value,
        norm=resolved_norm(settings, mode).value,
        precision=resolved_precision(settings, mode).value,
        seed=settings.seed,
        posterior_id=inputs.posterior_id,
        seconds=time.perf_counter() - start,
        stages=clock.stages,
        shards=chosen.shards,
        processed_shards=chosen.processed_shards,
        nodes={k: sorted(v) for k, v in chosen.nodes.items()},
        domains={str(k): v for k, v in domains.items()},
        materialized=materialized,
        message=message,
    )
    if cfg.tracking:
        from pipeline.flows.curate_tracking import track

        with clock.stage("track"):
            ledger = Ledger(storage.join(cfg.out, SCORES_DIR))
            run_id = track(cfg, result, table, score_parts(cfg.out), ledger.markers())
        result = replace(result, mlflow_run_id=run_id, stages=clock.stages)
    storage.write_json(storage.join(cfg.out, REPORT_FILE), result.to_json())
    return result


def _curated_table(picks: pa.Table) -> pa.Table:
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
