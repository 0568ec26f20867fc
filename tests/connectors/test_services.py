"""`bayescurate services up|down|status` on a fresh state dir: idempotent up, clean down."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from connectors import processes, services
from jobs.services import main
from tests.fixtures_services import TEMPLATE


def _ours(state_dir: Path) -> list[str]:
    """Live (non-zombie) processes whose command line mentions the state dir."""
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(state_dir) in line and not line.lstrip().startswith("Z")]


@pytest.mark.services
def test_up_is_idempotent_and_down_stops_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    monkeypatch.setenv("BAYESCURATE_STATE_DIR", str(state_dir))
    services.ensure_services(state_dir, mlflow=False, template_dir=TEMPLATE)  # the template is the test's
    assert main(["up"]) == 0
    printed = capsys.readouterr().out
    first = services.read_state()
    assert first.mlflow is not None and first.label_studio is not None
    token = first.label_studio.token()
    assert first.mlflow.url in printed and first.label_studio.url in printed
    assert first.label_studio.token_file in printed and token not in printed
    assert token not in (state_dir / "services.json").read_text()
    assert stat.S_IMODE(os.stat(first.label_studio.token_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(first.label_studio.admin_file).st_mode) == 0o600

    assert main(["up"]) == 0  # nothing new starts
    second = services.read_state()
    assert second.mlflow.process == first.mlflow.process  # type: ignore[union-attr]
    assert second.label_studio.process == first.label_studio.process  # type: ignore[union-attr]
    assert main(["status"]) == 0
    assert "healthy" in capsys.readouterr().out
    groups = [first.mlflow.process.pid, first.label_studio.process.pid]
    assert all(processes.group_members(g) for g in groups)

    assert main(["down"]) == 0
    assert "mlflow" in capsys.readouterr().out
    assert not any(processes.group_members(g) for g in groups)
    assert _ours(state_dir) == []
    capsys.readouterr()
    assert main(["status"]) == 0 and "not started" in capsys.readouterr().out
    assert main(["down"]) == 0 and "nothing was running" in capsys.readouterr().out
    assert json.loads((state_dir / "services.json").read_text())["label_studio"] is None


def test_down_never_signals_a_process_it_did_not_start(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        record = processes.ProcessRecord(
            sleeper.pid, start_time=1, log=str(tmp_path / "x.log")
        )  # wrong start time
        assert not processes.is_running(record)
        assert processes.stop(record) is False
        assert sleeper.poll() is None  # still alive
    finally:
        sleeper.kill()
        sleeper.wait()
