"""`bayescurate fit-posterior`: KFAC factors on image–text pairs -> Laplace posterior directory."""

from __future__ import annotations

from jobs._app import ConfigCommand
from pipeline.data import quarantine
from pipeline.flows.fit import FitConfig, fit_posterior

CONFIG = FitConfig


def run(cfg: FitConfig) -> int:
    """Estimate KFAC factors on image-text pairs and fit the Laplace posterior."""
    r = fit_posterior(cfg)
    print(
        f"posterior {r.posterior_id} -> {cfg.out}: {r.pairs_used} pairs of {r.rows} rows, "
        f"{r.shards} shards ({r.processed_shards} processed, {r.skipped_shards} already complete), "
        f"λ image={r.prior_precision['image']:.4g} text={r.prior_precision['text']:.4g}, {r.seconds:.1f}s"
    )
    print(quarantine.format_counts(r.quarantined))
    return 0


main = ConfigCommand(FitConfig, run, "bayescurate fit-posterior")

if __name__ == "__main__":
    raise SystemExit(main())
