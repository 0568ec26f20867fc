"""The campaign lease: one stepper at a time, a clear refusal (exit code 3), a dead owner taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import campaign as campaign_cli
from pipeline.rounds import lease

HOLD = """
import sys, time
from pipeline.rounds import lease
held = lease.acquire(sys.argv[1], "test holder")
print("held", flush=True)
time.sleep(600)
"""


def _holder(directory: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_acquire_is_refused_naming_the_owner(tmp_path: Path) -> None:
    with lease.acquire(str(tmp_path), "first") as first:
        with pytest.raises(lease.LeaseHeld, match=rf"pid {os.getpid()} on .* \(first\)"):
            lease.acquire(str(tmp_path), "second")
        assert lease.holder(str(tmp_path)) == first.owner
    assert lease.holder(str(tmp_path)) is None
    with lease.acquire(str(tmp_path), "again"):
        pass


def test_step_exits_3_while_another_process_holds_the_lease_and_takes_over_a_dead_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = _holder(tmp_path)
    try:
        started = time.monotonic()
        assert campaign_cli.main(["step", str(tmp_path)]) == campaign_cli.LEASE_HELD
        assert time.monotonic() - started < 30  # at once, not after a timeout (generous for a loaded CI)
        err = capsys.readouterr().err
        assert f"pid {proc.pid}" in err and "test holder" in err and "without changing anything" in err
        assert campaign_cli.main(["step", str(tmp_path), "--busy-ok"]) == 0  # a scheduled tick: no failure
        assert (
            f"busy: campaign {str(tmp_path)!r} is being stepped by pid {proc.pid}" in capsys.readouterr().err
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lease"]  # and nothing else was written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The owner died without releasing anything: the next acquire takes the lease over.
    with lease.acquire(str(tmp_path), "successor") as taken:
        assert taken.owner["pid"] == os.getpid()


def test_a_lease_lost_during_a_failed_step_is_logged_and_the_steps_error_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def lost() -> None:
        raise lease.LeaseLost("the lease expired before it was renewed")

    held = lease.Lease(str(tmp_path), {"pid": os.getpid()}, lost)
    with pytest.raises(RuntimeError, match="the step's own error"), held:
        raise RuntimeError("the step's own error")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("pipeline.rounds.lease", "WARNING", "the lease expired before it was renewed")
    ]
    with pytest.raises(lease.LeaseLost), held:  # with no error of its own, the step reports the lost lease
        pass
