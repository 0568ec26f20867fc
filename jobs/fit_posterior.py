"""`bayescurate fit-posterior`: KFAC factors on image–text pairs -> Laplace posterior directory.

Pairs stream through read -> decode (CPU tasks) -> both towers (actor pool); every complete shard's
factors are accumulated by a worker task in contrastive blocks of C and saved as their own files with a
marker; the reduction sums the completed shards (a tree of tasks, order-independent up to rounding), so a
crash or rerun never double-counts. λ per tower is fitted by marginal likelihood (MATH §4).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs._app import (
    AddressOption,
    ConfigOption,
    ExecutorOption,
    ExperimentOption,
    NumCpusOption,
    TrackingOption,
    TrackingUriOption,
    run_command,
)
from pipeline import runtime
from pipeline.artifacts.posterior import write_posterior
from pipeline.bayes.curvature import Likelihood
from pipeline.bayes.head import TOWERS
from pipeline.bayes.kron import Damping, KronFactors, KronPosterior
from pipeline.config import Config, load_config
from pipeline.data import quarantine
from pipeline.data.sources import SourceFormat, plan_shards
from pipeline.stages.decode import DecodeStage
from pipeline.stages.embed import ModelSpec, PairFeaturesStage
from pipeline.stages.factors import factor_path, load_and_sum, sum_factors
from pipeline.stages.shards import Ledger, pending_shards
from pipeline.stages.sinks import FactorSink, write_shard_factors


class FitConfig(Config):
    pairs: str  # image-text pairs URI
    model: str  # model name ("bayescurate-tiny", an open_clip config, a checkpoint)
    pretrained: str | None = None  # weights path or tag
    out: str  # posterior directory
    block_size: int = 256  # contrastive block size C
    likelihood: Likelihood | None = None  # default: the model's
    hessian_scale: float = 1.0  # tempering τ
    damping: Damping = Damping.PAPER  # "paper" or "exact"
    format: SourceFormat | None = None  # input format; default: detected
    rows_per_shard: int | None = None  # default: the multiple of block_size nearest 1024
    batch_size: int = 256  # rows per decode/model call
    executor: str = "ray"  # "ray" or "local"
    address: str | None = None  # Ray cluster address
    num_cpus: int | None = None  # CPUs of the embedded local Ray
    tracking: bool = True  # log to MLflow
    tracking_uri: str | None = None  # MLflow tracking URI (default: connectors.tracking resolution)
    experiment: str = "bayescurate"  # MLflow experiment


def _reduce(paths: list[str], executor: str, fan_in: int = 16) -> KronFactors:
    """Sum factor files; on Ray a tree of tasks, each summing up to `fan_in` files in sorted order."""
    paths = sorted(paths)
    if executor != "ray" or len(paths) <= fan_in:
        return load_and_sum(paths)
    import ray

    from pipeline.stages.ray_adapter import remote

    leaf = remote(load_and_sum)
    partials = ray.get([leaf.remote(paths[i : i + fan_in]) for i in range(0, len(paths), fan_in)])
    return sum_factors(partials)


def fit_posterior(cfg: FitConfig) -> dict[str, Any]:
    start = time.perf_counter()
    if cfg.block_size < 2:
        raise ValueError(f"--block-size must be >= 2 (a contrastive block), got {cfg.block_size}")
    rows_per_shard = cfg.rows_per_shard or cfg.block_size * max(1, round(1024 / cfg.block_size))
    if rows_per_shard % cfg.block_size:
        raise ValueError(
            f"rows per shard ({rows_per_shard}) must be a multiple of --block-size ({cfg.block_size})"
        )
    shards = plan_shards(cfg.pairs, cfg.format, rows_per_shard)
    spec = ModelSpec(cfg.model, cfg.pretrained)
    adapter = spec.load()
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
    work = f"{cfg.out.rstrip('/')}/shards"
    ledger = Ledger(work)
    ledger.check_plan(
        cfg.pairs, shards, {k: v for k, v in params.items() if k != "meta"} | {"model": identity}
    )
    todo = pending_shards(ledger, shards)

    started = runtime.init_ray(cfg.address, cfg.num_cpus) if cfg.executor == "ray" else False
    try:
        if cfg.executor == "ray":
            import ray

            from pipeline.stages.ray_adapter import remote

            plan = runtime.plan_pool()
            from pipeline.stages.ray_adapter import call_on_node

            task = remote(call_on_node)

            def submit(*args: Any) -> Any:
                return task.remote(write_shard_factors, *args)
        else:
            plan = runtime.local_plan()
            submit = write_shard_factors
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
        sink = FactorSink(work, params, submit)
        nodes = runtime.run_stages(
            cfg.executor, todo, stages, sink, pool_size=plan.actors, read_cpus=plan.read_cpus
        )
        if cfg.executor == "ray":
            import ray

            nodes["accumulate"] = {node for _, node in ray.get(sink.results)}
        done = sorted(ledger.completed())
        totals = {t: _reduce([factor_path(work, s, t) for s in done], cfg.executor) for t in TOWERS}
    finally:
        if started:
            import ray

            ray.shutdown()
    if any(totals[t].n == 0 for t in TOWERS):
        raise ValueError(f"no usable image-text pairs in {cfg.pairs!r} (all rows quarantined?)")
    posts = {
        "image": KronPosterior.fit(
            totals["image"], adapter.image_weight().detach().double().cpu(), cfg.hessian_scale, cfg.damping
        ),
        "text": KronPosterior.fit(
            totals["text"], adapter.text_weight().detach().double().cpu(), cfg.hessian_scale, cfg.damping
        ),
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
    summary = {
        "posterior_id": info["posterior_id"],
        "prior_precision": info["prior_precision"],
        "processed_shards": len(todo),
        "skipped_shards": len(shards) - len(todo),
        "seconds": time.perf_counter() - start,
        **provenance,
    }
    if cfg.tracking:
        _track(cfg, info, summary)
    return summary


def _track(cfg: FitConfig, info: dict[str, Any], summary: dict[str, Any]) -> None:
    from connectors.tracking import Tracker

    tracker = (
        Tracker(cfg.tracking_uri, cfg.experiment) if cfg.tracking_uri else Tracker.default(cfg.experiment)
    )
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
    with tracker.run("fit-posterior", params=params, tags={"command": "fit-posterior"}) as run:
        run.log_metrics(
            {
                "prior_precision_image": info["prior_precision"]["image"],
                "prior_precision_text": info["prior_precision"]["text"],
                "pairs_used": float(summary["pairs_used"]),
                "rows": float(summary["rows"]),
                "quarantined": float(sum(summary["quarantined"].values())),
                "seconds": float(summary["seconds"]),
            }
        )
        run.log_artifact(str(Path(cfg.out) / "posterior.json"))


def command(
    pairs: Annotated[
        str, typer.Option(help="Image-text pairs URI (Parquet, folder with captions, WebDataset).")
    ],
    model: Annotated[str, typer.Option(help="Model name, e.g. bayescurate-tiny.")],
    out: Annotated[str, typer.Option(help="Posterior directory to write.")],
    pretrained: Annotated[str | None, typer.Option(help="Weights path or tag.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Contrastive block size C.")] = None,
    likelihood: Annotated[
        Likelihood | None, typer.Option(help="infonce or siglip (default: the model's).")
    ] = None,
    hessian_scale: Annotated[float | None, typer.Option(help="Tempering τ.")] = None,
    damping: Annotated[Damping | None, typer.Option(help="paper or exact.")] = None,
    format: Annotated[SourceFormat | None, typer.Option(help="Input format (default: detected).")] = None,
    rows_per_shard: Annotated[int | None, typer.Option(help="Rows per shard (multiple of C).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per model call.")] = None,
    executor: ExecutorOption = None,
    address: AddressOption = None,
    num_cpus: NumCpusOption = None,
    tracking: TrackingOption = None,
    tracking_uri: TrackingUriOption = None,
    experiment: ExperimentOption = None,
    config: ConfigOption = None,
) -> int:
    """Estimate KFAC factors on image-text pairs and fit the Laplace posterior."""
    cfg = load_config(
        FitConfig,
        config,
        pairs=pairs,
        model=model,
        out=out,
        pretrained=pretrained,
        block_size=block_size,
        likelihood=likelihood,
        hessian_scale=hessian_scale,
        damping=damping,
        format=format,
        rows_per_shard=rows_per_shard,
        batch_size=batch_size,
        executor=executor,
        address=address,
        num_cpus=num_cpus,
        tracking=tracking,
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    s = fit_posterior(cfg)
    print(
        f"posterior {s['posterior_id']} -> {cfg.out}: {s['pairs_used']} pairs of {s['rows']} rows, "
        f"{s['shards']} shards ({s['processed_shards']} processed, {s['skipped_shards']} already complete), "
        f"λ image={s['prior_precision']['image']:.4g} text={s['prior_precision']['text']:.4g}, "
        f"{s['seconds']:.1f}s"
    )
    print(quarantine.format_counts(s["quarantined"]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(command, argv, "bayescurate fit-posterior")


if __name__ == "__main__":
    raise SystemExit(main())
