"""Background server processes: start in their own session, wait for health, stop exactly what was started.

A process is identified by its pid AND its kernel start time (`/proc/<pid>/stat`, field 22), so a recycled
pid is never mistaken for ours. Stopping signals the whole process group (servers spawn workers) and waits
until no member of the group is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

# Popen handles of the processes this interpreter started, so they are reaped (no zombies) when stopped.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ProcessRecord:
    """What is needed to find a started server again from another process."""

    pid: int  # leader of its own session and process group
    start_time: int  # clock ticks since boot (`/proc/<pid>/stat` field 22)
    log: str  # file receiving stdout and stderr

    def to_dict(self) -> dict[str, int | str]:
        return {"pid": self.pid, "start_time": self.start_time, "log": self.log}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> ProcessRecord:
        return cls(pid=int(d["pid"]), start_time=int(d["start_time"]), log=str(d["log"]))  # type: ignore[call-overload]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nobody listens on `port` (connections of a stopped server lingering in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()  # the name may contain spaces and parentheses


def start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def is_running(record: ProcessRecord) -> bool:
    """True when the recorded process is alive (not a zombie) and is the one we started."""
    _reap(record.pid)
    fields = _stat(record.pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == record.start_time


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def spawn(argv: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path | None = None) -> ProcessRecord:
    """Start `argv` in a new session with output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    began = start_time(proc.pid)
    if began is None:  # exited before we could look at it
        proc.wait()
        raise RuntimeError(f"{argv[0]} exited at once (code {proc.returncode}); see {log}")
    return ProcessRecord(pid=proc.pid, start_time=began, log=str(log))


def wait_healthy(
    record: ProcessRecord,
    check: Callable[[], bool],
    *,
    name: str,
    timeout: float,
    interval: float = 0.25,
) -> None:
    """Poll `check` until it returns True; raise with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not is_running(record):
            raise RuntimeError(
                f"{name} exited before becoming healthy; log {record.log}:\n{_tail(record.log)}"
            )
        time.sleep(interval)
    raise TimeoutError(f"{name} not healthy after {timeout:.0f} s; log {record.log}:\n{_tail(record.log)}")


def http_ok(
    url: str, expect: Callable[[requests.Response], bool] | None = None, timeout: float = 2.0
) -> bool:
    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException:
        return False
    return response.status_code == 200 and (expect is None or expect(response))


def stop(record: ProcessRecord, timeout: float = 15.0) -> bool:
    """Stop the recorded process group: SIGTERM, then SIGKILL after `timeout`. False if it was not ours/alive.

    The group is only signalled when its leader is still the process we started; servers run through an
    `exec` script so the leader is the server itself and its workers share its group.
    """
    if not is_running(record):
        return False
    pgid = record.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(record.pid)
        if not group_members(pgid):
            return True
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        _reap(record.pid)
        if not group_members(pgid):
            return True
        time.sleep(0.1)
    raise RuntimeError(f"process group {pgid} survived SIGKILL: {group_members(pgid)}")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        del _CHILDREN[pid]


def _tail(path: str, lines: int = 30) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def clean_env() -> dict[str, str]:
    """The caller's environment minus what would leak the project's venv into the servers."""
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST"):
        env.pop(var, None)
    return env
