"""`bayescurate campaign init|step|run|status`: annotation campaigns, round after round.

    bayescurate campaign init   DIR --config campaign.yaml     # or flags
    bayescurate campaign step   DIR                            # advance as far as possible; idempotent
    bayescurate campaign run    DIR --rounds N [--wait]        # step until N rounds are done
    bayescurate campaign status DIR [--json]                   # rounds, label counts, metrics, waiting for

Exit codes: 0 (done, or waiting for answers), 2 (bad input), 3 (another step holds the campaign's lease).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from pydantic import Field

from jobs._app import ConfigCommand, subcommands
from pipeline.config import Config
from pipeline.rounds.config import CampaignConfig
from pipeline.rounds.lease import LeaseHeld

LEASE_HELD = 3

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "init": (
        "jobs.campaign:init_command",
        "Create a campaign directory from a config (flags or --config YAML).",
    ),
    "step": ("jobs.campaign:step_command", "Advance the campaign as far as possible now, then stop."),
    "run": ("jobs.campaign:run_command", "Step until N rounds are done (--wait: wait for answers)."),
    "status": (
        "jobs.campaign:status_command",
        "Rounds, label counts, metrics and what the campaign waits for.",
    ),
}


class InitConfig(CampaignConfig):
    """A campaign to create in `dir`."""

    dir: str  # campaign directory (local path or URI); its name is the default Label Studio project


class StepConfig(Config):
    """Which campaign to step."""

    dir: str  # campaign directory
    force: bool = False  # train the waiting round on the answers there are (ignore min_answered once)


class RunConfig(Config):
    """Which campaign to run, how far."""

    dir: str  # campaign directory
    rounds: int  # rounds to complete (counting those done already)
    wait: bool = False  # wait for answers (poll every poll_s) instead of returning while a round waits
    force: bool = False  # train the waiting round on the answers there are (once)
    poll_s: float | None = None  # seconds between checks while waiting (default: the campaign's poll_s)


class StatusConfig(Config):
    """Which campaign to report on, and how."""

    dir: str  # campaign directory
    as_json: bool = Field(default=False, json_schema_extra={"flag": "json"})  # print JSON (for scripts)


def leased(fn):  # type: ignore[no-untyped-def]
    """Exit code 3 with the owner's description when another step holds the lease."""

    def wrapper(cfg):  # type: ignore[no-untyped-def]
        try:
            return fn(cfg)
        except LeaseHeld as held:
            print(f"busy: {held}", file=sys.stderr)
            return LEASE_HELD

    wrapper.__doc__ = fn.__doc__
    return wrapper


def run_init(cfg: InitConfig) -> int:
    """Create a campaign directory: check the inputs, cache the class text features, write campaign.yaml."""
    from pipeline.rounds.campaign import init

    fields = cfg.model_dump(exclude={"dir"})
    init(cfg.dir, CampaignConfig.model_validate(fields))
    return 0


def run_step(cfg: StepConfig) -> int:
    """Advance the campaign as far as possible now (select, push, collect, train, update), then stop."""
    from pipeline.rounds.campaign import step

    report = step(cfg.dir, force=cfg.force)
    if report.finished and not report.did:
        print(f"nothing to do: {report.finished}")
    return 0


def run_run(cfg: RunConfig) -> int:
    """Step until `--rounds` rounds are done; with --wait, wait for annotators instead of returning."""
    from pipeline.rounds.campaign import run

    report = run(cfg.dir, cfg.rounds, wait=cfg.wait, force=cfg.force, poll_s=cfg.poll_s)
    done = report.state.completed
    print(f"{done} of {cfg.rounds} rounds done" + (f"; {report.waiting}" if report.waiting else ""))
    return 0


def run_status(cfg: StatusConfig) -> int:
    """Rounds, label counts and evaluation metrics; what the campaign waits for (`--json` for scripts)."""
    from pipeline.rounds.campaign import status

    report = status(cfg.dir)
    if cfg.as_json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(format_status(report))
    return 0


def format_status(report: dict) -> str:
    lines = [
        f"campaign {report['directory']}: {report['rounds_completed']} rounds done, labels from "
        f"{report['label_source']}, {report['method']} x {report['budget']} a round"
    ]
    header = f"{'round':>5}  {'state':<10} {'tasks':>5} {'answered':>8} {'labels':>6} {'used':>5}"
    header += (
        f"  {'MAP acc':>7} {'Bayes acc':>9} {'MAP ECE':>7} {'Bayes ECE':>9} {'MAP NLL':>7} {'Bayes NLL':>9}"
    )
    lines.append(header)
    base = report.get("baseline") or {}
    if base.get("MAP"):
        m, b = base["MAP"], base["Bayes"]
        lines.append(
            f"{'start':>5}  {'':<10} {'':>5} {'':>8} {'':>6} {0:>5}  {m['accuracy']:>7.3f} "
            f"{b['accuracy']:>9.3f} {m['ece']:>7.3f} {b['ece']:>9.3f} {m['nll']:>7.3f} {b['nll']:>9.3f}"
        )
    for r in report["rounds"]:
        c = r["labels"]
        row = f"{r['round']:>5}  {r['state']:<10} {c.get('tasks', 0):>5} {c.get('answered', 0):>8} "
        row += f"{c.get('labelled', 0):>6} {r['labels_used']:>5}"
        if r["metrics"].get("MAP"):
            m, b = r["metrics"]["MAP"], r["metrics"]["Bayes"]
            row += (
                f"  {m['accuracy']:>7.3f} {b['accuracy']:>9.3f} {m['ece']:>7.3f} {b['ece']:>9.3f} "
                f"{m['nll']:>7.3f} {b['nll']:>9.3f}"
            )
        lines.append(row)
    if report.get("waiting"):
        lines.append(f"waiting: {report['waiting']}")
    if report.get("lease"):
        lease = report["lease"]
        lines.append(
            f"being stepped now by pid {lease.get('pid')} on {lease.get('host')} since {lease.get('since')}"
        )
    if report.get("mlflow"):
        lines.append(f"MLflow: {report['mlflow']}")
    return "\n".join(lines)


init_command = ConfigCommand(InitConfig, leased(run_init), "bayescurate campaign init", positional=("dir",))
step_command = ConfigCommand(StepConfig, leased(run_step), "bayescurate campaign step", positional=("dir",))
run_command = ConfigCommand(RunConfig, leased(run_run), "bayescurate campaign run", positional=("dir",))
status_command = ConfigCommand(StatusConfig, run_status, "bayescurate campaign status", positional=("dir",))


def main(argv: Sequence[str] | None = None) -> int:
    return subcommands(SUBCOMMANDS, argv, "bayescurate campaign")
