"""Fault injection for crash tests: kill this process right after its N-th write or side effect.

Every completed storage write and every external side effect (a Label Studio import, an MLflow run) calls
`checkpoint(name)`. With `BAYESCURATE_KILL_AFTER=N` set, the N-th checkpoint SIGKILLs the process: the
harshest crash there is, no `finally`, no flush. `BAYESCURATE_CHECKPOINT_LOG=FILE` appends one line per
checkpoint, so a test can first count the checkpoints of a run and then crash it at each one in turn.
Unset (always, outside tests), `checkpoint` only increments a counter.

`kill_once(site)` crashes one worker of a distributed run instead: with `BAYESCURATE_KILL_ONCE=DIR` in the
workers' environment, a test arms `site` by creating `DIR/<site>`, and the first process to reach
`kill_once(site)` afterwards takes it and SIGKILLs itself (Ray then retries its task elsewhere).
"""

from __future__ import annotations

import os
import signal

KILL_AFTER = "BAYESCURATE_KILL_AFTER"
CHECKPOINT_LOG = "BAYESCURATE_CHECKPOINT_LOG"
KILL_ONCE = "BAYESCURATE_KILL_ONCE"

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


def kill_once(site: str) -> None:
    """SIGKILL this process if `site` is armed (see the module docstring): the rename of `DIR/<site>` to
    `DIR/<site>.fired` is atomic, so exactly one process across all workers takes it; it writes its pid
    there before dying. Unset or unarmed: nothing."""
    folder = os.environ.get(KILL_ONCE)
    if not folder:
        return
    armed = os.path.join(folder, site)
    fired = f"{armed}.fired"
    try:
        os.rename(armed, fired)
    except OSError:  # not armed, or another process took it
        return
    with open(fired, "w") as handle:
        handle.write(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
