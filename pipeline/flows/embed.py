"""Bayesian image embeddings (mean and diagonal variance) of a corpus, as Parquet.

Output: `part-<shard>.parquet` per input shard (`sample_id`, `mean` [D], `var` [D], optional `acts`, the
row's image location `source`, and the input's caption/label columns), with key-value metadata
`bayescurate` = {posterior_id, projection_sha256, model, ...}; `quarantine/part-<shard>.parquet`;
`_done/<shard>.json` markers. Rerunning skips completed shards. With tracking on, an MLflow run `embed`
holds the settings, the counts, the throughput and the summary.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipeline import runtime
from pipeline.artifacts.posterior import check_identity, projection_sha256, read_info
from pipeline.config import TrackedConfig
from pipeline.data.formats import CorpusFormat
from pipeline.data.sources import DEFAULT_ROWS_PER_SHARD, plan_shards
from pipeline.runtime import Executor
from pipeline.stages.decode import DecodeStage
from pipeline.stages.embed import EmbedStage, ModelSpec
from pipeline.stages.shards import Ledger, pending_shards
from pipeline.stages.sinks import EmbeddingSink


class EmbedConfig(TrackedConfig):
    """What `embed` reads, with which posterior, and where it writes."""

    images: str  # corpus URI: Parquet files, an image folder or WebDataset tars
    out: str  # output directory (local path or URI)
    posterior: str | None = None  # posterior directory from fit-posterior (needed for the variance)
    model: str | None = None  # model name (default: the posterior's)
    pretrained: str | None = None  # weights path or tag (default: the posterior's)
    format: CorpusFormat | None = None  # input layout (default: detected)
    variance: bool = True  # posterior variance (off: deterministic embeddings, the benchmark baseline)
    activations: bool = False  # also store the pre-projection activations (campaigns and select need them)
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD  # rows per shard, the unit of exactly-once work
    batch_size: int = 256  # rows per decode/model call
    executor: Executor = Executor.RAY  # where the stages run
    address: str | None = None  # Ray cluster address (default: embedded local Ray, or $RAY_ADDRESS)
    num_cpus: int | None = None  # CPUs of the embedded local Ray (default: all)


@dataclass(frozen=True)
class EmbedResult:
    """What an embedding run produced."""

    out: str
    posterior_id: str | None
    shards: int
    processed_shards: int  # shards run now (the others were complete already)
    rows: int
    embedded: int
    quarantined: dict[str, int]  # reason -> rows
    nodes: dict[str, list[str]]  # stage -> Ray nodes that ran it
    setup_s: float
    seconds: float
    processed_rows: int = 0  # input rows of the shards run now
    mlflow_run_id: str | None = None

    @property
    def skipped_shards(self) -> int:
        return self.shards - self.processed_shards

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def embed(cfg: EmbedConfig) -> EmbedResult:
    """Run the embedding pipeline (resumable, exactly once per shard)."""
    start = time.perf_counter()
    info = read_info(cfg.posterior) if cfg.posterior else None
    if cfg.variance and info is None:
        raise ValueError("--posterior is required for the variance (or pass --no-variance)")
    model_info = info["model"] if info else {}
    name = cfg.model or model_info.get("name")
    if not name:
        raise ValueError("no model given: pass --model or a --posterior that names one")
    pretrained = cfg.pretrained or (model_info.get("pretrained") if not cfg.model else None)
    shards = plan_shards(cfg.images, cfg.format, cfg.rows_per_shard)
    ledger = Ledger(cfg.out)
    params = {
        "posterior_id": info["posterior_id"] if info else None,
        "variance": cfg.variance,
        "activations": cfg.activations,
        "model": name,
    }
    ledger.check_plan(cfg.images, shards, params)
    todo = pending_shards(ledger, shards)

    with runtime.ray_session(cfg.executor, cfg.address, cfg.num_cpus):
        plan = runtime.plan(cfg.executor)
        adapter = ModelSpec(name, pretrained).load()
        if info is not None:
            check_identity(info["model"], adapter.identity())
        metadata = {
            "posterior_id": params["posterior_id"],
            "posterior_dir": cfg.posterior,
            "projection_sha256": projection_sha256(info) if info else None,
            "model": adapter.identity(),
            "variance": cfg.variance,
        }
        stages = [
            DecodeStage(
                adapter.preprocess,
                runtime.pixel_shape(adapter.preprocess),
                num_cpus=plan.decode_cpus,
                batch_size=cfg.batch_size,
            ),
            EmbedStage(
                ModelSpec(name, pretrained, plan.device),
                cfg.posterior,
                variance=cfg.variance,
                activations=cfg.activations,
                num_cpus=plan.actor_cpus,
                num_gpus=plan.actor_gpus,
                threads=plan.actor_threads,
                batch_size=cfg.batch_size,
            ),
        ]
        setup_s = time.perf_counter() - start
        nodes = runtime.run_stages(
            cfg.executor,
            todo,
            stages,
            EmbeddingSink(cfg.out, metadata),
            pool_size=plan.actors,
            read_cpus=plan.read_cpus,
        )
    markers = ledger.markers()
    quarantined: Counter[str] = Counter()
    for m in markers:
        quarantined.update(m["quarantined"])
    result = EmbedResult(
        out=cfg.out,
        posterior_id=params["posterior_id"],
        shards=len(shards),
        processed_shards=len(todo),
        rows=sum(m["rows"] for m in markers),
        embedded=sum(m["ok"] for m in markers),
        quarantined=dict(quarantined),
        nodes={k: sorted(v) for k, v in nodes.items()},
        setup_s=setup_s,
        seconds=time.perf_counter() - start,
        processed_rows=sum(s.rows for s in todo),
    )
    if cfg.tracking:
        result = replace(result, mlflow_run_id=track(cfg, result, name, pretrained))
    return result


def track(cfg: EmbedConfig, result: EmbedResult, model: str, pretrained: str | None) -> str:
    """Log the run to MLflow (settings, counts, throughput, the summary); returns the run id."""
    params = {
        "images": cfg.images,
        "out": cfg.out,
        "model": model,
        "pretrained": pretrained,
        "posterior_id": result.posterior_id,
        "format": cfg.format.value if cfg.format else None,
        "variance": cfg.variance,
        "activations": cfg.activations,
        "rows_per_shard": cfg.rows_per_shard,
        "batch_size": cfg.batch_size,
        "executor": cfg.executor.value,
    }
    with cfg.tracker().run("embed", params=params, tags={"command": "embed"}) as run:
        metrics = {
            "rows": result.rows,
            "embedded": result.embedded,
            "quarantined": sum(result.quarantined.values()),
            "shards": result.shards,
            "processed_shards": result.processed_shards,
            "processed_rows": result.processed_rows,
            "setup_s": result.setup_s,
            "seconds": result.seconds,
        }
        metrics |= {f"quarantined_{reason}": n for reason, n in result.quarantined.items()}
        if result.processed_rows:  # rows/s of the work done now (a rerun that skips everything has none)
            metrics["rows_per_s"] = result.processed_rows / max(result.seconds, 1e-9)
        run.log_metrics(metrics)
        run.log_dict(result.to_json(), "embed.json")
        return run.run_id
