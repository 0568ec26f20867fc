"""`bayescurate make-world`: write a synthetic image–caption corpus, optionally with bad inputs mixed in."""

from __future__ import annotations

from jobs._app import ConfigCommand
from pipeline.flows.world import MakeWorldConfig, make_world

CONFIG = MakeWorldConfig


def run(cfg: MakeWorldConfig) -> int:
    """Write a synthetic image-caption corpus (Parquet, folder or WebDataset) and its class files."""
    r = make_world(cfg)
    print(f"wrote {r.written} samples ({r.format}) to {r.out}")
    return 0


main = ConfigCommand(MakeWorldConfig, run, "bayescurate make-world")

if __name__ == "__main__":
    raise SystemExit(main())
