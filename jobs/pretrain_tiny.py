"""`bayescurate pretrain-tiny`: pretrain the tiny CLIP shipped with the repo on the synthetic world."""

from __future__ import annotations

from jobs._app import ConfigCommand
from pipeline.models.pretrain import PretrainConfig


def run(cfg: PretrainConfig) -> int:
    """Train the tiny CLIP (CLIP's hard-target loss, learned clamped temperature) and write the checkpoint.

    Without --out it replaces the shipped model, which it refuses unless --overwrite is given.
    """
    from pipeline.models.pretrain import train_tiny

    train_tiny(cfg)
    return 0


CONFIG = PretrainConfig
main = ConfigCommand(PretrainConfig, run, "bayescurate pretrain-tiny")

if __name__ == "__main__":
    raise SystemExit(main())
