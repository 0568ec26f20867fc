"""One stepper at a time: the campaign lease.

On a local (or POSIX shared) filesystem the lease is an exclusive lock on `DIR/lease` (`storage.try_lock`),
held for as long as the step runs: the kernel releases it when its owner exits, however it exits (SIGKILL
included), so a dead owner's lease is taken over by the next step without any timeout.

On an object store (`s3://`, MinIO, Ceph) there is no lock to hold, so the lease is the object `DIR/lease`
itself, with a time to live:
- acquire: one PUT with `If-None-Match: *`; the store lets exactly one of any number of racing contenders
  create it.
- hold: a daemon thread renews it every third of its TTL with `If-Match: <its ETag>`, so a renewal never
  overwrites a successor's lease.
- take over: a lease not renewed for its TTL belongs to a dead owner. Its age is judged on the store's own
  clock (the response's Date minus the object's Last-Modified), so the hosts' clocks never matter. A
  contender replaces it with `If-Match: <the ETag it read>`; of several contenders only the first PUT
  matches, and the others re-read and find a live lease.
- release: DELETE with `If-Match: <its ETag>`, so a holder whose lease was taken over deletes nothing.
A holder that could not renew in time (stalled longer than the TTL) learns it when the heartbeat's
conditional PUT fails: `release()` then raises `LeaseLost`.

Either way the lease names the owner (host, pid, start, command) for the message a refused step prints: a
second step while one runs fails at once with `LeaseHeld` (the CLI's exit code 3). What happens to a held
lease (a renewal that failed, a lease lost) goes to this module's logger, as a step that failed in `campaign
serve` does.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from pipeline.io import storage
from pipeline.rounds.layout import LEASE_FILE as LEASE_FILE  # re-exported: its old home
from pipeline.rounds.layout import CampaignDir

logger = logging.getLogger(__name__)

TTL_ENV = "BAYESCURATE_LEASE_TTL_S"
DEFAULT_TTL_S = 60.0  # object stores: a lease not renewed for this long belongs to a dead owner
RELEASED = "released"  # body key of a lease given up on a store that cannot delete conditionally


class LeaseHeld(RuntimeError):
    """Another process is stepping this campaign right now."""

    def __init__(self, directory: str, owner: dict[str, Any]) -> None:
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
        super().__init__(
            f"campaign {directory!r} is being stepped by {who} since {owner.get('since', '?')} "
            f"({owner.get('command', 'campaign step')}); this step exits without changing anything"
        )
        self.owner = owner


class LeaseLost(RuntimeError):
    """The lease expired while it was held (not renewed within its TTL) and another step may have taken it."""


class Lease:
    """A held lease; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, directory: str, owner: dict[str, Any], release: Callable[[], None]) -> None:
        self.directory = directory
        self.owner = owner
        self._release = release

    def release(self) -> None:
        self._release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self.release()
        except LeaseLost as lost:
            if exc is None:
                raise
            logger.warning("%s", lost)  # the step's own error is the one to report


def _parse(note: str | bytes) -> dict[str, Any]:
    try:
        return dict(json.loads(note)) if note.strip() else {}
    except (json.JSONDecodeError, TypeError, ValueError, UnicodeDecodeError):
        return {}


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _ttl(ttl_s: float | None) -> float:
    raw: float | str = ttl_s if ttl_s is not None else os.environ.get(TTL_ENV, DEFAULT_TTL_S)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TTL_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"the lease TTL must be positive, got {value:g} s")
    return value


def acquire(directory: str, command: str = "", *, ttl_s: float | None = None) -> Lease:
    """Take the campaign's lease or raise `LeaseHeld` naming its owner.

    `ttl_s`: object stores only, how long the lease outlives its last renewal (default
    `$BAYESCURATE_LEASE_TTL_S`, else 60 s): how long a crashed step keeps others out.
    """
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": _iso(time.time()),
        "command": command or " ".join(["bayescurate", *sys.argv[1:3]]),
    }
    path = CampaignDir(directory).lease
    if not storage.is_local(path):
        return _acquire_object(directory, path, owner, _ttl(ttl_s))
    lock, note = storage.try_lock(path, json.dumps(owner) + "\n")
    if lock is None:
        raise LeaseHeld(directory, _parse(note))
    return Lease(directory, owner, lock.release)


def holder(directory: str) -> dict[str, Any] | None:
    """The owner the lease names while it is held, else None.

    Locally: when that process is alive (checked on this host only). On object stores: while the lease is
    not expired; the answer then includes `ttl_s` and `expires`. Informational (for `campaign status`): it
    never changes the lease, so it cannot make a step fail.
    """
    path = CampaignDir(directory).lease
    if not storage.is_local(path):
        current = storage.read_versioned(path)
        if current is None:
            return None
        note = _parse(current.data)
        return None if _expired(note, current.age_s) else note
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


# --------------------------------------------------------------------------------- object-store leases


def _expired(note: dict[str, Any], age_s: float) -> bool:
    """Whether a lease object `age_s` old (store clock) no longer protects its owner."""
    if not note or note.get(RELEASED):
        return True  # given up, or not a lease bayescurate wrote: nobody holds it
    try:
        ttl = float(note.get("ttl_s", DEFAULT_TTL_S))
    except (TypeError, ValueError):
        ttl = DEFAULT_TTL_S
    return age_s >= ttl


class _ObjectHold:
    """A lease object this process holds: renewed by a daemon thread, deleted on release."""

    def __init__(self, directory: str, uri: str, owner: dict[str, Any], etag: str, ttl_s: float) -> None:
        self.directory, self.uri, self.owner, self.ttl_s = directory, uri, owner, ttl_s
        self.etag = etag
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease heartbeat {uri}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                etag = storage.conditional_put(self.uri, _body(self.owner, self.ttl_s), if_match=self.etag)
            except OSError as exc:  # a transient store error: the next beat tries again, within the TTL
                logger.warning("could not renew the campaign lease %r: %s", self.uri, exc)
                continue
            except NotImplementedError as exc:  # the store cannot replace conditionally: it cannot renew
                logger.error("%s", exc)
                etag = None
            if etag is None:
                self.lost.set()
                logger.error("%s", self._lost_message())
                return
            self.etag = etag

    def _lost_message(self) -> str:
        return (
            f"the lease of campaign {self.directory!r} expired before it was renewed (TTL {self.ttl_s:g} s) "
            "and was taken over by another step; this step's writes may have overlapped with it"
        )

    def release(self) -> None:
        if self._stop.is_set():
            return  # released already
        self._stop.set()
        self._thread.join()
        if self.lost.is_set():
            raise LeaseLost(self._lost_message())
        try:
            if storage.conditional_delete(self.uri, self.etag):
                return
        except NotImplementedError:  # no conditional DELETE here: leave a released lease instead
            if storage.conditional_put(
                self.uri, _body(self.owner, self.ttl_s, released=True), if_match=self.etag
            ):
                return
        raise LeaseLost(self._lost_message())


def _body(owner: dict[str, Any], ttl_s: float, *, released: bool = False) -> bytes:
    now = time.time()
    note = {**owner, "ttl_s": ttl_s, "renewed": _iso(now), "expires": _iso(now + ttl_s)}
    if released:
        note[RELEASED] = True
    return (json.dumps(note, sort_keys=True) + "\n").encode()


def _acquire_object(directory: str, uri: str, owner: dict[str, Any], ttl_s: float) -> Lease:
    owner = {**owner, "token": uuid.uuid4().hex}  # tells apart two holders in one process
    seen: dict[str, Any] = {}
    for _ in range(8):  # each round trip ends in a win, a refusal, or a race someone else won: look again
        etag = storage.conditional_put(uri, _body(owner, ttl_s))
        if etag is None:
            current = storage.read_versioned(uri)
            if current is None:
                continue  # released between the two requests
            seen = _parse(current.data)
            if not _expired(seen, current.age_s):
                raise LeaseHeld(directory, seen)
            etag = storage.conditional_put(uri, _body(owner, ttl_s), if_match=current.etag)
            if etag is None:
                continue  # another contender replaced it first: its lease is live now
        hold = _ObjectHold(directory, uri, owner, etag, ttl_s)
        return Lease(directory, owner, hold.release)
    raise LeaseHeld(directory, seen)
