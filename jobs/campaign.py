"""`bayescurate campaign init|step|run|status|serve`: annotation campaigns, round after round.

    bayescurate campaign init   DIR --config campaign.yaml     # or flags; --webhook URL registers one
    bayescurate campaign step   DIR                            # advance as far as possible; idempotent
    bayescurate campaign run    DIR --rounds N [--wait]        # step until N rounds are done
    bayescurate campaign status DIR [--json]                   # rounds, label counts, metrics, waiting for
    bayescurate campaign serve  DIR --port P                   # step on Label Studio's webhooks

Exit codes:
    0  progressed, done, or waiting for answers (`serve`: stopped by SIGTERM/SIGINT)
    2  bad input, named in the message (a refused token, a missing project, a request Label Studio rejects)
    3  another step holds the campaign's lease: nothing was changed (`step --busy-ok`: 0)
    4  Label Studio unreachable, failing (5xx) or throttling (408/429) after the client's retries
       (`label_studio_retry_s`): the failed transition changed nothing (outputs are written before
       `state.json`), the next step redoes it
The webhook's shared secret comes from `$BAYESCURATE_WEBHOOK_SECRET` or `--secret-file`, never a flag value.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from jobs._app import ConfigCommand, subcommands
from pipeline.config import Config
from pipeline.rounds.config import CampaignConfig
from pipeline.rounds.lease import LeaseHeld

if TYPE_CHECKING:
    from pipeline.rounds.status import CampaignStatus

LEASE_HELD = 3
SERVICE_UNAVAILABLE = 4

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
    "serve": (
        "jobs.campaign:serve_command",
        "Listen for Label Studio's annotation webhooks and step the campaign when answers arrive.",
    ),
}


class InitConfig(CampaignConfig):
    """A campaign to create in `dir`."""

    dir: str  # campaign directory (local path or URI); its name is the default Label Studio project
    secret_file: str | None = None  # file with the webhook secret (default: $BAYESCURATE_WEBHOOK_SECRET)


class StepConfig(Config):
    """Which campaign to step."""

    dir: str  # campaign directory
    force: bool = False  # train the waiting round on the answers there are (ignore min_answered once)
    busy_ok: bool = False  # exit 0, not 3, when another step holds the lease (a scheduled tick that overlaps)


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


class ServeConfig(Config):
    """Which campaign to step on webhooks, and where to listen."""

    dir: str  # campaign directory
    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: every interface, e.g. in a container)
    port: int = Field(8765, ge=0, le=65535)  # port to listen on (0: any free one, printed at start)
    secret_file: str | None = None  # file with the shared secret (default: $BAYESCURATE_WEBHOOK_SECRET)
    retry_s: float = Field(10.0, gt=0)  # step again this long after a step failed or found the lease held
    interval_s: float | None = Field(None, gt=0)  # also step this often without events (default: never)


def leased(fn):  # type: ignore[no-untyped-def]
    """Exit code 3 with the owner's description when another step holds the lease (0 with `busy_ok`: the
    running step does the work); 4 with the connector's one-line message when Label Studio stayed
    unreachable (or kept failing) through the retries."""

    def wrapper(cfg):  # type: ignore[no-untyped-def]
        try:
            return fn(cfg)
        except LeaseHeld as held:
            print(f"busy: {held}", file=sys.stderr)
            return 0 if getattr(cfg, "busy_ok", False) else LEASE_HELD
        except Exception as exc:
            if not _unavailable(exc) or os.environ.get("BAYESCURATE_DEBUG"):
                raise
            print(
                f"unavailable: {exc}; nothing was left half-done, run it again once Label Studio is back",
                file=sys.stderr,
            )
            return SERVICE_UNAVAILABLE

    wrapper.__doc__ = fn.__doc__
    return wrapper


def _unavailable(exc: BaseException) -> bool:
    """Label Studio down, failing or throttling past the retries. A refused token, a missing project or a
    rejected request is bad input instead (exit 2): running it again would fail the same way."""
    from connectors.label_studio import LabelStudioUnavailable

    return isinstance(exc, LabelStudioUnavailable)


def run_init(cfg: InitConfig) -> int:
    """Create a campaign directory: check the inputs, cache the class text features, write campaign.yaml."""
    from pipeline.rounds.campaign import init

    fields = cfg.model_dump(exclude={"dir", "secret_file"})
    campaign = CampaignConfig.model_validate(fields)
    secret = None
    if campaign.webhook:
        from pipeline.rounds.webhook import read_secret

        secret = read_secret(cfg.secret_file)
    init(cfg.dir, campaign, webhook_secret=secret)
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
    from pipeline.rounds.status import status

    report = status(cfg.dir)
    if cfg.as_json:
        print(json.dumps(report.to_json(), indent=2, default=str))
        return 0
    print(format_status(report))
    return 0


def run_serve(cfg: ServeConfig) -> int:
    """Serve Label Studio's annotation webhooks for the campaign: each event (with the shared secret) steps
    it, one step at a time; GET /health for probes. Stops on SIGTERM or SIGINT after the running step."""
    from pipeline.rounds.serve import HEALTH_PATH, WEBHOOK_PATH, WebhookServer
    from pipeline.rounds.webhook import read_secret

    def log(line: str) -> None:
        print(line, flush=True)

    secret = read_secret(cfg.secret_file)
    server = WebhookServer(
        cfg.dir,
        secret,
        host=cfg.host,
        port=cfg.port,
        retry_s=cfg.retry_s,
        interval_s=cfg.interval_s,
        log=log,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log(f"{signal.Signals(signum).name}: stopping after the running step (again: at once; it resumes)")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second signal ends the process now
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        server.start()
        registered = server.webhook or "none yet (campaign init DIR --webhook URL registers one)"
        log(
            f"campaign {cfg.dir}: Label Studio posts to {server.url}{WEBHOOK_PATH} (registered: {registered})"
        )
        log(f"health probes: GET {server.url}{HEALTH_PATH}")
        while not stop.wait(0.5):
            if not server.alive:
                print("error: a thread of the webhook server died; see the log above", file=sys.stderr)
                code = 1
                break
        server.close()
    except KeyboardInterrupt:
        print("stopped without waiting for the step (the next step resumes it)", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log("stopped")
    return code


def format_status(report: CampaignStatus) -> str:
    lines = [
        f"campaign {report.directory}: {report.rounds_completed} rounds done, labels from "
        f"{report.label_source.value}, {report.method.value} x {report.budget} a round"
    ]
    header = f"{'round':>5}  {'state':<10} {'tasks':>5} {'answered':>8} {'labels':>6} {'used':>5}"
    header += (
        f"  {'MAP acc':>7} {'Bayes acc':>9} {'MAP ECE':>7} {'Bayes ECE':>9} {'MAP NLL':>7} {'Bayes NLL':>9}"
    )
    lines.append(header)
    if report.baseline.get("MAP"):
        lines.append(f"{'start':>5}  {'':<10} {'':>5} {'':>8} {'':>6} {0:>5}" + _metrics(report.baseline))
    for r in report.rounds:
        labelled = r.counts.labels.labelled if r.counts.labels else 0
        row = f"{r.index:>5}  {r.state.value:<10} {r.counts.selection.tasks:>5} {r.counts.answered:>8} "
        row += f"{labelled:>6} {r.labels_used:>5}"
        lines.append(row + (_metrics(r.metrics) if r.metrics.get("MAP") else ""))
    if report.worst_classes:
        when = "at the start" if report.worst_round is None else f"after round {report.worst_round}"
        named = ", ".join(
            f"{c['class']} {c['Bayes']:.2f}"
            + (f" (start {c['Bayes_start']:.2f})" if c.get("Bayes_start") is not None else "")
            for c in report.worst_classes
        )
        lines.append(f"worst classes, Bayes recall on the evaluation set {when}: {named}")
    if report.waiting:
        lines.append(f"waiting: {report.waiting}")
    if report.lease:
        lease = report.lease
        lines.append(
            f"being stepped now by pid {lease.get('pid')} on {lease.get('host')} since {lease.get('since')}"
        )
    if report.mlflow:
        lines.append(f"MLflow: {report.mlflow}")
    return "\n".join(lines)


def _metrics(m: dict[str, Any]) -> str:
    """MAP and Bayes accuracy, ECE and NLL: the status table's right-hand columns."""
    a, b = m["MAP"], m["Bayes"]
    return (
        f"  {a['accuracy']:>7.3f} {b['accuracy']:>9.3f} {a['ece']:>7.3f} {b['ece']:>9.3f} "
        f"{a['nll']:>7.3f} {b['nll']:>9.3f}"
    )


init_command = ConfigCommand(InitConfig, leased(run_init), "bayescurate campaign init", positional=("dir",))
step_command = ConfigCommand(StepConfig, leased(run_step), "bayescurate campaign step", positional=("dir",))
run_command = ConfigCommand(RunConfig, leased(run_run), "bayescurate campaign run", positional=("dir",))
status_command = ConfigCommand(StatusConfig, run_status, "bayescurate campaign status", positional=("dir",))
serve_command = ConfigCommand(ServeConfig, run_serve, "bayescurate campaign serve", positional=("dir",))


def main(argv: Sequence[str] | None = None) -> int:
    return subcommands(SUBCOMMANDS, argv, "bayescurate campaign")
