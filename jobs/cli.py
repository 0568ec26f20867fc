"""The `bayescurate` console script: dispatches `bayescurate COMMAND ...` to `jobs.<module>.main(argv)`.

Commands are imported lazily, so `bayescurate --help` and `bayescurate services status` do not pay for
importing torch or Ray.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

# OpenMP threads that spin while idle burn the cores a busy 2-core machine shares between torch, Ray and the
# servers: a campaign's small re-fit ran 3-10x slower with them (measured). Must be set before torch loads;
# a user's own OMP_WAIT_POLICY wins. Ray workers get the same through `runtime.worker_env`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jobs.demo", "Run the main job end to end on the embedded defaults."),
    "services": ("jobs.services", "Start, stop or check the local Label Studio and MLflow servers."),
    "make-world": ("jobs.make_world", "Write a synthetic image-caption corpus."),
    "pretrain-tiny": ("jobs.pretrain_tiny", "Pretrain the tiny CLIP shipped with the repo."),
    "fit-posterior": ("jobs.fit_posterior", "Fit the Laplace posterior (KFAC) on image-text pairs."),
    "embed": ("jobs.embed", "Compute Bayesian image embeddings (mean and variance) for a corpus."),
    "zeroshot": ("jobs.zeroshot", "Calibrated zero-shot classification with ProbCosine."),
    "select": ("jobs.select", "Choose what annotators label next (EPIG/BALD) and send it to Label Studio."),
    "curate": ("jobs.curate", "Curate a fine-tuning set: the most informative images of a pool of millions."),
    "campaign": ("jobs.campaign", "Annotation campaigns: init, step, run, status, serve (webhooks)."),
    "annotate-bot": (
        "jobs.annotate_bot",
        "A simulated annotator answering Label Studio tasks from ground truth.",
    ),
    "bench": (
        "jobs.bench",
        "Benchmarks: core, calibration, pipeline, select, active-learning, round, curate.",
    ),
}


def config_commands() -> dict[str, Any]:
    """Every leaf command generated from a config model: "bench core" -> its `ConfigCommand` (imports all)."""
    from jobs._app import ConfigCommand, resolve_target

    found: dict[str, Any] = {}
    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        if isinstance(getattr(module, "main", None), ConfigCommand):
            found[name] = module.main
        for sub, (target, _) in getattr(module, "SUBCOMMANDS", {}).items():
            command = resolve_target(target)
            if isinstance(command, ConfigCommand):
                found[f"{name} {sub}"] = command
    return found


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: bayescurate [--version] COMMAND [ARGS]...", "", "Commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run `bayescurate COMMAND -h` for the options of one command."]
    return "\n".join(lines)


def version() -> str:
    """The installed package's version, as pip knows it."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("bayescurate")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"bayescurate {version()}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest))


class _Lowercase(logging.Formatter):
    """`warning: ...`, `error: ...`: the library's log lines read like the CLI's own messages."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def entrypoint() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Lowercase())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
