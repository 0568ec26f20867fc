"""The cluster manifests parse, and every `bayescurate` command they run exists with the flags they pass."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from jobs import cli

INFRA = Path(__file__).resolve().parents[1] / "infra"
MANIFESTS = sorted([*INFRA.glob("k8s/*.yaml"), *INFRA.glob("ray/*.yaml")])


def _options(command: str) -> set[str]:
    return importlib.import_module(cli.COMMANDS[command][0]).main.option_names()


def bayescurate_calls(text: str) -> list[tuple[str, set[str]]]:
    """(command, flags) of every `bayescurate COMMAND --flag value ...` in YAML text (block or list form)."""
    flat = re.sub(r'[",\[\]]|>-', " ", text)
    calls = re.findall(r"bayescurate\s+([a-z-]+)((?:\s+--[a-z-]+(?:\s+[^\s-]\S*)?)+)", flat)
    return [(name, set(re.findall(r"--[a-z-]+", flags))) for name, flags in calls]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses(path: Path) -> None:
    assert [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_commands_in_manifests_exist_and_accept_their_flags() -> None:
    calls = bayescurate_calls(" ".join(p.read_text() for p in MANIFESTS))
    assert {name for name, _ in calls} >= {"fit-posterior", "embed"}
    for name, flags in calls:
        assert name in cli.COMMANDS, name
        assert flags <= _options(name), (name, flags - _options(name))


def test_a_wrong_flag_would_be_caught() -> None:
    [(name, flags)] = bayescurate_calls('command: ["bayescurate", "embed", "--images", "x", "--bogus", "1"]')
    assert name == "embed" and "--bogus" in flags and not flags <= _options(name)
