"""The shell around the commands: `--version`, `-h` as `--help` everywhere, help that reads as text (no Python
reprs, metavars that name what a flag takes, deprecated names hidden), and a shipped model that
`pretrain-tiny` does not replace by accident."""

from __future__ import annotations

import importlib
import re
from importlib.metadata import version
from pathlib import Path

import pytest

from jobs import cli
from jobs._app import ConfigCommand, resolve_target

# Python reprs and typer's own type labels (`<str>`, `<list[int]>`) that help must not show.
REPRS = re.compile(r"\bNone\b|\bTrue\b|\bFalse\b|\(\)|<enum|<[a-z]+(\[[^\]]*\])?>|\[default: None\]")


def _every_command_line() -> list[list[str]]:
    """`[COMMAND]` for every command and `[COMMAND, SUB]` for every subcommand."""
    out = []
    for name, (module, _) in cli.COMMANDS.items():
        out.append([name])
        table = getattr(importlib.import_module(module), "SUBCOMMANDS", {})
        out += [[name, sub] for sub in table]
    return out


def _command(words: list[str]) -> ConfigCommand | None:
    module = importlib.import_module(cli.COMMANDS[words[0]][0])
    table = getattr(module, "SUBCOMMANDS", None)
    if table is None:
        return module.main if isinstance(module.main, ConfigCommand) else None
    return resolve_target(table[words[1]][0]) if len(words) > 1 else None  # type: ignore[return-value]


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bayescurate {version('bayescurate')}"


@pytest.mark.parametrize("words", _every_command_line(), ids=" ".join)
@pytest.mark.parametrize("option", ["-h", "--help"])
def test_every_command_helps_in_plain_words(
    words: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*words, option]) == 0
    out = capsys.readouterr().out
    assert out.strip(), words
    assert [m.group(0) for m in REPRS.finditer(out)] == [], out
    command = _command(words)
    if command is None:
        return
    listed = out.split("\nOptions:\n", 1)[1]
    options = re.findall(r"^  (?:-h, )?(--[\w-]+)", listed, re.M)  # wrapped help text is indented further
    assert {f.option for f, _ in command.flags if not f.positional and not f.renamed_to} <= set(options)
    hidden = set(command.renamed_options()) & set(options)
    assert hidden == set(), f"deprecated names shown in `{' '.join(words)} {option}`"
    for metavar in re.findall(r"^  --[\w-]+ (\S+)", listed, re.M):  # DIR, N, {ray|local}; `/` of a bool
        assert metavar.isupper() or metavar.startswith("{") or metavar == "/", metavar


def test_help_names_what_a_flag_takes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["curate", "-h"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("--pool PATH|URI", "--classes FILE", "--budget N", "--beta X", "--executor {ray|local}"):
        assert shown in out
    assert cli.main(["bench", "calibration", "-h"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--severities N severities of each shifted domain [repeatable; default: 1 3 5]" in out
    assert cli.main(["campaign", "init", "-h"]) == 0
    out = capsys.readouterr().out
    assert "[OPTIONS] {DIR}" in out and re.search(r"^\s+DIR\s+campaign directory", out, re.M)


def test_pretrain_tiny_refuses_to_replace_the_shipped_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs import pretrain_tiny
    from pipeline.models import registry

    shipped = tmp_path / "shipped"  # stands in for the packaged weights, so a failure replaces nothing real
    monkeypatch.setattr(registry, "TINY_DIR", shipped)
    assert pretrain_tiny.main([]) == 2
    err = capsys.readouterr().err
    assert f"{shipped} is the shipped tiny model" in err and "--overwrite" in err
    assert pretrain_tiny.main(["--out", str(shipped), "--steps", "0"]) == 2  # the same place, named
    assert "--overwrite" in capsys.readouterr().err and not shipped.exists()
    cfg = pretrain_tiny.main.parse(["--overwrite"])
    assert cfg.overwrite and cfg.checkpoint_dir == shipped
    cfg.check_overwrite()  # allowed
    assert cli.main(["pretrain-tiny", "-h"]) == 0
    assert "--overwrite" in capsys.readouterr().out
