"""`bayescurate embed`: Bayesian image embeddings (mean and diagonal variance) of a corpus, as Parquet.

Output: `part-<shard>.parquet` per input shard (`sample_id`, `mean` [D], `var` [D], optional `acts`, the
input's caption/label columns), key-value metadata `bayescurate` = {posterior_id, model, ...};
`quarantine/part-<shard>.parquet`; `_done/<shard>.json` markers. Rerunning skips completed shards.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from jobs._app import AddressOption, ConfigOption, ExecutorOption, NumCpusOption, run_command
from pipeline import runtime
from pipeline.artifacts.posterior import check_identity, read_info
from pipeline.config import Config, load_config
from pipeline.data import quarantine
from pipeline.data.sources import DEFAULT_ROWS_PER_SHARD, SourceFormat, plan_shards
from pipeline.stages.decode import DecodeStage
from pipeline.stages.embed import EmbedStage, ModelSpec
from pipeline.stages.shards import Ledger, pending_shards
from pipeline.stages.sinks import EmbeddingSink


class EmbedConfig(Config):
    images: str  # corpus URI (Parquet / image folder / WebDataset)
    posterior: str | None = None  # posterior directory (needed for the variance)
    out: str  # output directory
    model: str | None = None  # model name; default: the posterior's model
    pretrained: str | None = None  # weights path/tag; default: the posterior's
    format: SourceFormat | None = None  # input format; default: detected
    variance: bool = True  # False: deterministic embeddings only (benchmark baseline)
    activations: bool = False  # also store the pre-projection activations
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD  # shard size (unit of exactly-once work)
    batch_size: int = 256  # rows per decode/model call
    executor: str = "ray"  # "ray" or "local" (in-process, no Ray)
    address: str | None = None  # Ray cluster address; default: embedded local Ray
    num_cpus: int | None = None  # CPUs of the embedded local Ray (default: all)


def embed_corpus(cfg: EmbedConfig) -> dict[str, Any]:
    """Run the embedding pipeline; returns the run summary (also printed by the command)."""
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

    started = False
    if cfg.executor == "ray":
        started = runtime.init_ray(cfg.address, cfg.num_cpus)
    try:
        plan = runtime.plan_pool() if cfg.executor == "ray" else runtime.local_plan()
        adapter = ModelSpec(name, pretrained).load()
        if info is not None:
            check_identity(info["model"], adapter.identity())
        metadata = {
            "posterior_id": params["posterior_id"],
            "posterior_dir": cfg.posterior,
            "model": adapter.identity(),
            "variance": cfg.variance,
        }
        spec = ModelSpec(name, pretrained, plan.device)
        stages = [
            DecodeStage(
                adapter.preprocess,
                runtime.pixel_shape(adapter.preprocess),
                num_cpus=plan.decode_cpus,
                batch_size=cfg.batch_size,
            ),
            EmbedStage(
                spec,
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
    finally:
        if started:
            import ray

            ray.shutdown()
    markers = ledger.markers()
    quarantined: Counter[str] = Counter()
    for m in markers:
        quarantined.update(m["quarantined"])
    return {
        "shards": len(shards),
        "processed_shards": len(todo),
        "skipped_shards": len(shards) - len(todo),
        "rows": sum(m["rows"] for m in markers),
        "embedded": sum(m["ok"] for m in markers),
        "quarantined": dict(quarantined),
        "nodes": {k: sorted(v) for k, v in nodes.items()},
        "setup_s": setup_s,
        "seconds": time.perf_counter() - start,
    }


def command(
    images: Annotated[
        str, typer.Option(help="Corpus URI: Parquet files, an image folder or WebDataset tars.")
    ],
    out: Annotated[str, typer.Option(help="Output directory.")],
    posterior: Annotated[str | None, typer.Option(help="Posterior directory from fit-posterior.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name (default: the posterior's).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="Weights path or tag.")] = None,
    format: Annotated[SourceFormat | None, typer.Option(help="Input format (default: detected).")] = None,
    variance: Annotated[
        bool | None, typer.Option("--variance/--no-variance", help="Posterior variance.")
    ] = None,
    activations: Annotated[bool | None, typer.Option(help="Also store pre-projection activations.")] = None,
    rows_per_shard: Annotated[int | None, typer.Option(help="Rows per shard.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per model call.")] = None,
    executor: ExecutorOption = None,
    address: AddressOption = None,
    num_cpus: NumCpusOption = None,
    config: ConfigOption = None,
) -> int:
    """Compute Bayesian image embeddings (mean and variance) for a corpus."""
    cfg = load_config(
        EmbedConfig,
        config,
        images=images,
        out=out,
        posterior=posterior,
        model=model,
        pretrained=pretrained,
        format=format,
        variance=variance,
        activations=activations,
        rows_per_shard=rows_per_shard,
        batch_size=batch_size,
        executor=executor,
        address=address,
        num_cpus=num_cpus,
    )
    summary = embed_corpus(cfg)
    print(
        f"embedded {summary['embedded']} of {summary['rows']} rows in {summary['shards']} shards "
        f"({summary['processed_shards']} processed, {summary['skipped_shards']} already complete) "
        f"in {summary['seconds']:.1f}s -> {cfg.out}"
    )
    print(quarantine.format_counts(summary["quarantined"]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(command, argv, "bayescurate embed")


if __name__ == "__main__":
    raise SystemExit(main())
