from __future__ import annotations

import subprocess
import sys

import pytest

from jobs import cli
from jobs._app import run_command


def _greet(name: str, times: int = 1) -> int:
    """Say hello."""
    if times < 0:
        raise ValueError(f"times must be >= 0, got {times}")
    print(" ".join([f"hello {name}"] * times))
    return 0


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_every_command_module_has_main() -> None:
    import importlib

    for module, _ in cli.COMMANDS.values():
        mod = importlib.import_module(module)
        assert callable(mod.main), module


def test_run_command_parses_and_reports_user_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(_greet, ["bob", "--times", "2"], "greet") == 0
    assert capsys.readouterr().out.strip() == "hello bob hello bob"
    assert run_command(_greet, ["bob", "--times", "-1"], "greet") == 2
    assert "error: times must be >= 0, got -1" in capsys.readouterr().err
    assert run_command(_greet, ["--help"], "greet") == 0
    assert "Say hello." in capsys.readouterr().out
    assert run_command(_greet, ["--bogus"], "greet") == 2


def test_console_script_help_does_not_import_torch() -> None:
    code = "import sys; from jobs.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
