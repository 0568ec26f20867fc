"""Fit the Laplace posterior of both projections on image–text pairs: KFAC factors -> posterior directory.

Pairs stream through read -> decode (CPU tasks) -> both towers (actor pool); every complete shard's
factors are accumulated by a helper task in contrastive blocks of C and saved as their own files with a
marker; the reduction sums the completed shards (a tree of tasks, order-independent up to rounding), so a
crash or rerun never double-counts. λ per tower is fitted by marginal likelihood (MATH §4).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import runtime
from pipeline.artifacts.posterior import write_posterior
from pipeline.bayes.curvature import Likelihood
from pipeline.bayes.head import TOWERS
from pipeline.bayes.kron import Damping, KronFactors, KronPosterior
from pipeline.config import TrackedConfig
from pipeline.data.formats import CorpusFormat
from pipeline.data.sources import plan_shards
from pipeline.io import storage
from pipeline.runtime import Executor
from pipeline.stages.decode import DecodeStage
from pipeline.stages.embed import ModelSpec, PairFeaturesStage
from pipeline.stages.factors import factor_path, load_and_sum, sum_factors
from pipeline.stages.shards import Ledger, pending_shards
from pipeline.stages.sinks import FactorSink, write_shard_factors


class FitConfig(TrackedConfig):
    """What `fit_posterior` fits, on what, and where it writes."""

    pairs: str  # image-caption pairs URI (Parquet, folder with captions, WebDataset)
    model: str  # model name: bayescurate-tiny, an open_clip config, a checkpoint
    pretrained: str | None = None  # weights path or tag
    out: str  # posterior directory to write (local path or URI)
    block_size: int = 256  # contrastive block size C
    likelihood: Likelihood | None = None  # curvature of which loss (default: the model's)
    hessian_scale: float = 1.0  # tempering τ
    damping: Damping = Damping.PAPER  # how the prior enters the Kronecker precision
    format: CorpusFormat | None = None  # input layout (default: detected)
    rows_per_shard: int | None = None  # rows per shard, a multiple of C (default: the one nearest 1024)
    batch_size: int = 256  # rows per decode/model call
    executor: Executor = Executor.RAY  # where the stages run
    address: str | None = None  # Ray cluster address (default: embedded local Ray, or $RAY_ADDRESS)
    num_cpus: int | None = None  # CPUs of the embedded local Ray (default: all)


@dataclass(frozen=True)
class FitResult:
    """What a fit produced (also written to the posterior's `posterior.json`)."""

    posterior_id: str
    out: str
    prior_precision: dict[str, float]  # fitted λ per tower
    shards: int
    processed_shards: int  # shards run now (the others were complete already)
    rows: int
    pairs_used: int
    quarantined: dict[str, int]  # reason -> rows
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped_shards(self) -> int:
        return self.shards - self.processed_shards

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _reduce(tasks: runtime.Tasks, paths: list[str], fan_in: int = 16) -> KronFactors:
    """Sum factor files: leaves of up to `fan_in` files (sorted) as tasks, then their partial sums."""
    paths = sorted(paths)
    if len(paths) <= fan_in:
        return load_and_sum(paths)
    partials = tasks.map(load_and_sum, [paths[i : i + fan_in] for i in range(0, len(paths), fan_in)])
    return sum_factors(partials)


def fit_posterior(cfg: FitConfig) -> FitResult:
    """Estimate KFAC factors on image-text pairs and fit the Laplace posterior (resumable, exactly once)."""
    start = time.perf_counter()
    if cfg.block_size < 2:
        raise ValueError(f"--block-size must be >= 2 (a contrastive block), got {cfg.block_size}")
    rows_per_shard = cfg.rows_per_shard or cfg.block_size * max(1, round(1024 / cfg.block_size))
    if rows_per_shard % cfg.block_size:
        raise ValueError(
            f"rows per shard ({rows_per_shard}) must be a multiple of --block-size ({cfg.block_size})"
        )
    shards = plan_shards(cfg.pairs, cfg.format, rows_per_shard)
    adapter = ModelSpec(cfg.model, cfg.pretrained).load()
    likelihood = Likelihood(cfg.likelihood or adapter.likelihood)
    identity = adapter.identity()
    params: dict[str, Any] = {
        "block_size": cfg.block_size,
        "likelihood": likelihood.value,
        "scale": float(adapter.scale),
        "bias": float(adapter.bias),
        "meta": {
            "model": str(identity.get("name", cfg.model)),
            "likelihood": likelihood.value,
            "block_size": cfg.block_size,
        },
    }
    work = storage.join(cfg.out, "shards")
    ledger = Ledger(work)
    ledger.check_plan(
        cfg.pairs, shards, {k: v for k, v in params.items() if k != "meta"} | {"model": identity}
    )
    todo = pending_shards(ledger, shards)

    with runtime.ray_session(cfg.executor, cfg.address, cfg.num_cpus):
        plan = runtime.plan(cfg.executor)
        tasks = runtime.tasks(cfg.executor)
        stages = [
            DecodeStage(
                adapter.preprocess,
                runtime.pixel_shape(adapter.preprocess),
                require_caption=True,
                num_cpus=plan.decode_cpus,
                batch_size=cfg.batch_size,
            ),
            PairFeaturesStage(
                ModelSpec(cfg.model, cfg.pretrained, plan.device),
                num_cpus=plan.actor_cpus,
                num_gpus=plan.actor_gpus,
                threads=plan.actor_threads,
                batch_size=cfg.batch_size,
            ),
        ]
        sink = FactorSink(work, params, lambda *args: tasks.submit(write_shard_factors, *args))
        nodes = runtime.run_stages(
            cfg.executor, todo, stages, sink, pool_size=plan.actors, read_cpus=plan.read_cpus
        )
        nodes["accumulate"] = {node for _, node in tasks.gather(sink.results)}
        done = sorted(ledger.completed())
        totals = {t: _reduce(tasks, [factor_path(work, s, t) for s in done]) for t in TOWERS}
    if any(totals[t].n == 0 for t in TOWERS):
        raise ValueError(f"no usable image-text pairs in {cfg.pairs!r} (all rows quarantined?)")
    posts = {
        tower: KronPosterior.fit(
            totals[tower], weight.detach().double().cpu(), cfg.hessian_scale, cfg.damping
        )
        for tower, weight in (("image", adapter.image_weight()), ("text", adapter.text_weight()))
    }
    markers = ledger.markers()
    quarantined: Counter[str] = Counter()
    for m in markers:
        quarantined.update(m["quarantined"])
    provenance = {
        "pairs": cfg.pairs,
        "format": shards[0].format,
        "shards": len(shards),
        "rows": sum(m["rows"] for m in markers),
        "pairs_used": sum(m["ok"] for m in markers),
        "quarantined": dict(quarantined),
        "block_size": cfg.block_size,
        "rows_per_shard": rows_per_shard,
        "nodes": {k: sorted(v) for k, v in nodes.items()},
    }
    info = write_posterior(
        cfg.out,
        posts["image"],
        posts["text"],
        likelihood=likelihood.value,
        scale=adapter.scale,
        bias=adapter.bias,
        model=identity,
        provenance=provenance,
    )
    result = FitResult(
        posterior_id=info["posterior_id"],
        out=cfg.out,
        prior_precision=info["prior_precision"],
        shards=len(shards),
        processed_shards=len(todo),
        rows=provenance["rows"],
        pairs_used=provenance["pairs_used"],
        quarantined=provenance["quarantined"],
        seconds=time.perf_counter() - start,
        provenance=provenance,
    )
    if cfg.tracking:
        _track(cfg, info, result)
    return result


def _track(cfg: FitConfig, info: dict[str, Any], result: FitResult) -> None:
    params = {
        "pairs": cfg.pairs,
        "model": cfg.model,
        "pretrained": cfg.pretrained,
        "block_size": cfg.block_size,
        "likelihood": info["likelihood"],
        "damping": info["damping"],
        "hessian_scale": info["hessian_scale"],
        "posterior_id": info["posterior_id"],
    }
    tracker = cfg.tracker()
    with tracker.run("fit-posterior", params=params, tags={"command": "fit-posterior"}) as run:
        run.log_metrics(
            {
                "prior_precision_image": info["prior_precision"]["image"],
                "prior_precision_text": info["prior_precision"]["text"],
                "pairs_used": float(result.pairs_used),
                "rows": float(result.rows),
                "quarantined": float(sum(result.quarantined.values())),
                "seconds": float(result.seconds),
            }
        )
        run.log_dict(info, "posterior.json")
