"""Every command's options are generated from its config model: every field is reachable both as a flag and
from a YAML file (required ones included), enums are choices, and the help text is the field's comment."""

from __future__ import annotations

import typing
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_core import PydanticUndefined

from jobs import cli
from jobs._app import ConfigCommand, _unwrap_optional
from pipeline.config import Config, field_docs, load_config

COMMANDS = cli.config_commands()


def test_every_command_and_subcommand_is_generated_from_a_config() -> None:
    expected = {"demo", "services", "make-world", "pretrain-tiny", "fit-posterior", "embed", "zeroshot"}
    expected |= {"select", "bench core", "bench calibration", "bench pipeline"}
    assert expected <= set(COMMANDS)


# Fields a command's validators require together with the sampled values (cross-field checks).
CONSISTENT = {"campaign init": {("truth",): "truth-uri"}}


def _bounds(field: Any) -> tuple[float | None, float | None]:
    low = high = None
    for m in field.metadata:
        low = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else low
        low = getattr(m, "gt", None) if getattr(m, "gt", None) is not None else low
        high = getattr(m, "le", None) if getattr(m, "le", None) is not None else high
        high = getattr(m, "lt", None) if getattr(m, "lt", None) is not None else high
    return low, high


def _sample(annotation: Any, default: Any, field: Any = None) -> Any:
    """A valid value of the field's type (within its bounds) that differs from its default."""
    inner = _unwrap_optional(annotation)
    low, high = _bounds(field) if field is not None else (None, None)
    if inner in (int, float) and high is not None:
        value = (high + (low if low is not None else 0)) / 2
        value = int(value) if inner is int else value
        return value if value != default else (high if inner is float else int(high))
    origin = typing.get_origin(inner)
    if origin in (tuple, list):
        item = _unwrap_optional(next(a for a in typing.get_args(inner) if a is not Ellipsis))
        if isinstance(item, type) and issubclass(item, Enum):
            return [m.value for m in item][::-1]
        return {int: [3, 5], float: [0.25, 4.0], str: ["a", "b"]}[item]
    if inner is bool:
        return not default
    if isinstance(inner, type) and issubclass(inner, Enum):
        members = [m for m in inner if m != default]
        return members[-1].value
    if inner is int:
        return (default or 0) + 3
    if inner is float:
        return (default or 0.0) * 2 + 0.5
    return "/tmp/some-value" if inner is Path else "some-value"


def _flat_fields(cls: type[Config], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for name, field in cls.model_fields.items():
        inner = _unwrap_optional(field.annotation)
        if isinstance(inner, type) and issubclass(inner, Config):
            out += _flat_fields(inner, (*prefix, name))
        else:
            out.append(((*prefix, name), field))
    return out


def _get(cfg: Config, path: tuple[str, ...]) -> Any:
    value: Any = cfg
    for key in path:
        value = getattr(value, key)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _argv(path: tuple[str, ...], value: Any, command: ConfigCommand) -> list[str]:
    flag = next(f.option for f, _ in command.flags if f.path == path)
    if path[0] in command.positional:
        return [str(value)]
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag.removeprefix("--")]
    if isinstance(value, list):
        return [a for v in value for a in (flag, str(v))]
    return [flag, str(value)]


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for key in reversed(path[:-1]):
        out = {key: out}
    return out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_field_is_reachable_as_a_flag_and_from_yaml(name: str, tmp_path: Path) -> None:
    command: ConfigCommand = COMMANDS[name]
    fields = _flat_fields(command.config)
    required = {
        path: _sample(f.annotation, None, f)
        for path, f in fields
        if f.default is PydanticUndefined and f.default_factory is None
    }
    required.update(CONSISTENT.get(name, {}))
    positional_argv = [str(v) for p, v in required.items() if p[0] in command.positional]
    for path, field in fields:
        default = None if field.default is PydanticUndefined else field.default
        value = required.get(path, _sample(field.annotation, default, field))
        # As a flag (required fields as flags too).
        argv = list(positional_argv)
        for other, v in required.items():
            if other != path and other[0] not in command.positional:
                argv += _argv(other, v, command)
        if path[0] not in command.positional:
            argv += _argv(path, value, command)
        cfg = command.parse(argv)
        assert _plain(_get(cfg, path)) == _plain(value), (name, path, "flag")
        # From YAML (required fields from the file too), only positionals on the command line.
        doc: dict[str, Any] = {}
        for other, v in {**required, path: value}.items():
            if other[0] not in command.positional:
                doc = _deep_merge(doc, _nested(other, _plain(v)))
        config_file = tmp_path / f"{'-'.join(path)}.yaml"
        config_file.write_text(yaml.safe_dump(doc))
        cfg = command.parse([*positional_argv, "--config", str(config_file)])
        assert _plain(_get(cfg, path)) == _plain(value), (name, path, "yaml")


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_field_has_a_help_text_from_its_comment(name: str) -> None:
    def check(cls: type[Config]) -> None:
        docs = field_docs(cls)
        for field_name, field in cls.model_fields.items():
            inner = _unwrap_optional(field.annotation)
            if isinstance(inner, type) and issubclass(inner, Config):
                check(inner)
            else:
                assert docs.get(field_name), f"{cls.__name__}.{field_name} has no comment"

    check(COMMANDS[name].config)


class _Commented(Config):
    # a section heading documents nothing
    first: int = 1  # the first field, whose comment
    # goes on under it
    second: int = 2  # the second field

    # another heading
    third: int = 3


def test_comment_lines_continue_the_field_above_and_headings_document_nothing() -> None:
    assert field_docs(_Commented) == {
        "first": "the first field, whose comment goes on under it",
        "second": "the second field",
    }


def test_help_shows_comments_choices_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert COMMANDS["embed"].main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "corpus URI: Parquet files, an image folder or WebDataset tars [required]" in " ".join(out.split())
    assert "ray|local" in out and "--variance / --no-variance" in out and "[default: 256]" in out


def test_a_required_field_may_come_from_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = COMMANDS["embed"]
    config = tmp_path / "c.yaml"
    config.write_text("images: /data/corpus\nout: /data/emb\n")
    cfg = command.parse(["--config", str(config), "--batch-size", "64"])
    assert (cfg.images, cfg.out, cfg.batch_size) == ("/data/corpus", "/data/emb", 64)
    assert command.main(["--out", "x"]) == 2
    assert "missing --images (or `images:` in the --config file)" in capsys.readouterr().err


def test_wrong_values_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert COMMANDS["embed"].main(["--images", "a", "--out", "b", "--executor", "spark"]) == 2
    assert "spark" in capsys.readouterr().err


class Inner(Config):
    source: str = "oracle"  # where labels come from
    column: str | None = None  # label column


class Outer(Config):
    name: str  # a name
    labels: Inner = Inner()  # the label source


def test_sections_nest_in_yaml_and_flatten_on_the_command_line(tmp_path: Path) -> None:
    command = ConfigCommand(Outer, lambda cfg: 0, "outer")
    assert {"--labels-source", "--labels-column", "--name"} <= command.option_names()
    config = tmp_path / "c.yaml"
    config.write_text("name: x\nlabels:\n  source: label-studio\n  column: shape\n")
    cfg = command.parse(["--config", str(config), "--labels-column", "colour"])
    assert cfg.labels == Inner(source="label-studio", column="colour") and cfg.name == "x"
    assert load_config(Outer, config, labels={"column": None}).labels.column == "shape"


def test_the_docs_cli_reference_is_generated_from_every_config_model() -> None:
    """docs/cli.md's tables are what `python -m jobs._reference` writes now: one per command."""
    from jobs import _reference
    from jobs.cli import config_commands

    page = _reference.PAGE.read_text()
    assert _reference.render(page) == page, "docs/cli.md is stale: run `python -m jobs._reference`"
    for name in config_commands():
        assert f"\n## `bayescurate {name}`\n" in page, name


def test_the_docs_campaign_reference_lists_every_field_as_the_config_has_it() -> None:
    from jobs._app import config_reference
    from jobs._reference import PAGE
    from pipeline.rounds.config import CampaignConfig

    page = PAGE.read_text()
    section = page[page.index("## `bayescurate campaign init`") :]
    assert config_reference(CampaignConfig) in section, (
        "docs/cli.md is stale: run `python -m jobs._reference`"
    )


def test_the_selection_section_keeps_its_flat_flag_and_yaml_names(tmp_path: Path) -> None:
    """`--method`, not `--selection-method`; a top-level `budget:` in YAML lands in the section, and a flag
    (nested in the section) wins over it; campaigns name a changed setting by its own name."""
    from jobs._app import ConfigCommand
    from pipeline.config import changed_fields
    from pipeline.flows.curate import CurateConfig
    from pipeline.rounds.config import CampaignConfig

    command = ConfigCommand(CurateConfig, lambda cfg: 0, "curate")
    assert {
        "--method",
        "--budget",
        "--batch",
        "--beta",
        "--whole-pool",
        "--dedupe-cosine",
    } <= command.option_names()
    assert not any(o.startswith("--selection") for o in command.option_names())
    config = tmp_path / "c.yaml"
    config.write_text("pool: p\nposterior: q\nclasses: c\nout: o\nbudget: 7\nmethod: bald\n")
    cfg = command.parse(["--config", str(config), "--method", "entropy", "--beta", "2"])
    assert (cfg.selection.budget, cfg.selection.method.value, cfg.selection.beta) == (7, "entropy", 2.0)
    old = CampaignConfig(pool="p", classes="c", posterior="q", budget=4, label_source="oracle", truth="t")
    new = CampaignConfig.model_validate(old.model_dump() | {"selection": {"budget": 5}, "poll_s": 1.0})
    assert changed_fields(old, new) == ["budget", "poll_s"]
