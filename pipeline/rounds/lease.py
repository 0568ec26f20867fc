"""One stepper at a time: the campaign lease.

On a local (or POSIX shared) filesystem the lease is an exclusive lock on `DIR/lease` (`storage.try_lock`),
held for as long as the step runs: the kernel releases it when its owner exits, however it exits (SIGKILL
included), so a dead owner's lease is taken over by the next step without any timeout. The file names the
owner (host, pid, start, command) for the message a refused step prints. A second step while one runs
fails at once with `LeaseHeld` (the CLI's exit code 3).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from pipeline.io import storage

LEASE_FILE = "lease"


class LeaseHeld(RuntimeError):
    """Another process is stepping this campaign right now."""

    def __init__(self, directory: str, owner: dict[str, Any]) -> None:
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
        super().__init__(
            f"campaign {directory!r} is being stepped by {who} since {owner.get('since', '?')} "
            f"({owner.get('command', 'campaign step')}); this step exits without changing anything"
        )
        self.owner = owner


class Lease:
    """A held lease; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, directory: str, owner: dict[str, Any], lock: storage.FileLock) -> None:
        self.directory = directory
        self.owner = owner
        self._lock = lock

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(note: str) -> dict[str, Any]:
    try:
        return dict(json.loads(note)) if note.strip() else {}
    except (json.JSONDecodeError, TypeError, ValueError):
        return {}


def acquire(directory: str, command: str = "") -> Lease:
    """Take the campaign's lease or raise `LeaseHeld` naming its owner."""
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command or " ".join(["bayescurate", *sys.argv[1:3]]),
    }
    lock, note = storage.try_lock(storage.join(directory, LEASE_FILE), json.dumps(owner) + "\n")
    if lock is None:
        raise LeaseHeld(directory, _parse(note))
    return Lease(directory, owner, lock)


def holder(directory: str) -> dict[str, Any] | None:
    """The owner the lease file names when that process is alive (checked on this host only), else None.

    Informational (for `campaign status`): it never touches the lock, so it cannot make a step fail.
    """
    path = storage.join(directory, LEASE_FILE)
    if not storage.is_file(path):
        return None
    owner = _parse(storage.read_text(path))
    if not owner:
        return None
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except (ProcessLookupError, ValueError, KeyError):
            return None
        except PermissionError:
            return owner
    return owner
