"""`bayescurate curate`: choose the most informative images of a large pool as a curated set, on Ray."""

from __future__ import annotations

from jobs._app import ConfigCommand
from pipeline.flows.curate import CurateConfig, curate

CONFIG = CurateConfig


def run(cfg: CurateConfig) -> int:
    """Score a pool of any size against the targets and write the chosen images as a curated set."""
    r = curate(cfg)
    print(
        f"curated {r.picks} of {r.candidates:,} candidates ({r.rows:,} pool rows) by {r.method}, "
        f"{r.batch} batch, in {r.seconds:.1f} s"
    )
    if r.removed_duplicates:
        print(f"near-duplicates dropped and refilled: {r.removed_duplicates}")
    if r.message:
        print(r.message)
    if r.materialized:
        m = r.materialized
        print(f"images: {m['rows']} written as {m['format']} ({len(m['missing'])} unreadable, left out)")
    print(f"curated set: {cfg.out.rstrip('/')}/curated.parquet; report: {cfg.out.rstrip('/')}/curate.json")
    return 0


main = ConfigCommand(CurateConfig, run, "bayescurate curate")

if __name__ == "__main__":
    raise SystemExit(main())
