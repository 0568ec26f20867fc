"""`faults.kill_once`: an armed site kills exactly one process, which leaves its pid; unarmed, nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pipeline.io import faults


def _child_reaches(site: str) -> tuple[int, int]:
    """Fork a child that calls `kill_once(site)` and exits 0 if it returns; (its pid, its wait status)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            faults.kill_once(site)
        finally:
            os._exit(0)
    return pid, os.waitpid(pid, 0)[1]


def test_an_armed_site_kills_the_first_process_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.KILL_ONCE, str(tmp_path))
    assert os.waitstatus_to_exitcode(_child_reaches("score")[1]) == 0  # not armed: returns
    (tmp_path / "score").touch()
    pid, status = _child_reaches("score")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not (tmp_path / "score").exists() and (tmp_path / "score.fired").read_text() == str(pid)
    assert os.waitstatus_to_exitcode(_child_reaches("score")[1]) == 0  # taken: the next one lives
    assert os.waitstatus_to_exitcode(_child_reaches("other")[1]) == 0  # another site was never armed


def test_without_the_variable_an_armed_file_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(faults.KILL_ONCE, raising=False)
    (tmp_path / "score").touch()
    faults.kill_once("score")  # this process: would die if it were armed
    assert (tmp_path / "score").exists()
