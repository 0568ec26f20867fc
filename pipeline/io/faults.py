"""Fault injection for crash tests: kill this process right after its N-th write or side effect.

Every completed storage write and every external side effect (a Label Studio import, an MLflow run) calls
`checkpoint(name)`. With `BAYESCURATE_KILL_AFTER=N` set, the N-th checkpoint SIGKILLs the process: the
harshest crash there is, no `finally`, no flush. `BAYESCURATE_CHECKPOINT_LOG=FILE` appends one line per
checkpoint, so a test can first count the checkpoints of a run and then crash it at each one in turn.
Unset (always, outside tests), `checkpoint` only increments a counter.
"""

from __future__ import annotations

import os
import signal

KILL_AFTER = "BAYESCURATE_KILL_AFTER"
CHECKPOINT_LOG = "BAYESCURATE_CHECKPOINT_LOG"

_count = 0


def reset() -> None:
    """Start counting checkpoints from zero (a forked test process that crashes itself)."""
    global _count
    _count = 0


def checkpoint(name: str) -> None:
    """Record that a write or side effect named `name` has completed (see the module docstring)."""
    global _count
    _count += 1
    log = os.environ.get(CHECKPOINT_LOG)
    if log:
        with open(log, "a") as handle:
            handle.write(f"{_count}\t{name}\n")
    kill_after = os.environ.get(KILL_AFTER)
    if kill_after and _count == int(kill_after):
        os.kill(os.getpid(), signal.SIGKILL)
