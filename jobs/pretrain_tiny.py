"""`bayescurate pretrain-tiny`: pretrain the tiny CLIP shipped with the repo on the synthetic world."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import typer

from jobs._app import run_command


def command(
    config: Path | None = typer.Option(None, "--config", help="YAML file with PretrainConfig fields."),
    out_dir: str | None = typer.Option(None, help="Checkpoint directory (default: the shipped asset dir)."),
    steps: int | None = typer.Option(None, help="Optimiser steps."),
    batch_size: int | None = typer.Option(None, help="Image-caption pairs per step."),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    seed: int | None = typer.Option(None, help="Torch initialisation seed."),
    eval_n: int | None = typer.Option(None, help="Images per zero-shot evaluation set."),
    threads: int | None = typer.Option(None, help="Torch CPU threads."),
    data_seed: int | None = typer.Option(None, help="Seed of the synthetic training stream."),
    warmup_steps: int | None = typer.Option(None, help="Linear warmup steps."),
    shape_caption_p: float | None = typer.Option(None, help="Chance of a shape-only caption."),
    init_from: str | None = typer.Option(None, help="Warm start from this weights file."),
) -> int:
    """Train the tiny CLIP contrastively and write the checkpoint, tokenizer vocabulary and model card."""
    from pipeline.config import load_config
    from pipeline.models.pretrain import PretrainConfig, train_tiny

    cfg = load_config(
        PretrainConfig,
        config,
        out_dir=out_dir,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_n=eval_n,
        threads=threads,
        data_seed=data_seed,
        warmup_steps=warmup_steps,
        shape_caption_p=shape_caption_p,
        init_from=init_from,
    )
    train_tiny(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(command, argv, "bayescurate pretrain-tiny")


if __name__ == "__main__":
    raise SystemExit(main())
