"""`bayescurate embed`: Bayesian image embeddings (mean and diagonal variance) of a corpus, as Parquet."""

from __future__ import annotations

from jobs._app import ConfigCommand
from pipeline.data import quarantine
from pipeline.flows.embed import EmbedConfig, embed

CONFIG = EmbedConfig


def run(cfg: EmbedConfig) -> int:
    """Compute Bayesian image embeddings (mean and variance) for a corpus."""
    r = embed(cfg)
    print(
        f"embedded {r.embedded} of {r.rows} rows in {r.shards} shards "
        f"({r.processed_shards} processed, {r.skipped_shards} already complete) "
        f"in {r.seconds:.1f}s -> {cfg.out}"
    )
    print(quarantine.format_counts(r.quarantined))
    if r.mlflow_run_id:
        print(f"MLflow run {r.mlflow_run_id} (experiment {cfg.experiment!r})")
    return 0


main = ConfigCommand(EmbedConfig, run, "bayescurate embed")

if __name__ == "__main__":
    raise SystemExit(main())
