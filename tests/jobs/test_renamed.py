"""One vocabulary: a renamed field answers to its new flag and YAML key, and its earlier name keeps working
(flag, YAML key, keyword, a campaign directory's stored config) with one deprecation line, hidden from
help."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest
import yaml

from jobs import cli
from jobs._app import ConfigCommand
from pipeline.config import Config, Renamed, renamed_keys

COMMANDS = cli.config_commands()


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize(
    ("name", "new", "old", "value", "field", "expected"),
    [
        ("demo", "--pool-size", "--pool", "100", "pool_size", 100),
        ("demo", "--num-targets", "--targets", "7", "num_targets", 7),
        ("demo", "--num-eval", "--eval", "9", "num_eval", 9),
        ("demo", "--num-pairs", "--pairs", "64", "num_pairs", 64),
        ("demo", "--executor", "--trainer", "local", "executor", "local"),
        ("zeroshot", "--label-column", "--labels", "shape", "label_column", "shape"),
        ("zeroshot", "--draws", "--mc", "16", "draws", 16),
        ("annotate-bot", "--label-column", "--column", "shape", "label_column", "shape"),
        ("pretrain-tiny", "--out", "--out-dir", "/tmp/tiny", "out", "/tmp/tiny"),
        ("pretrain-tiny", "--contrastive-targets", "--targets", "soft", "contrastive_targets", "soft"),
        ("campaign init", "--executor", "--trainer", "local", "executor", "local"),
        ("campaign init", "--eval-label-column", "--eval-labels", "shape", "eval_label_column", "shape"),
        ("campaign init", "--truth-label-column", "--truth-column", "shape", "truth_label_column", "shape"),
        ("bench core", "--num-classes", "--classes", "64", "num_classes", 64),
        ("bench core", "--batch-size", "--batch", "16", "batch_size", 16),
        ("bench calibration", "--draws", "--mc-samples", "8", "draws", 8),
        ("bench select", "--num-classes", "--classes", "4", "num_classes", 4),
        ("bench select", "--num-targets", "--targets", "20", "num_targets", 20),
        ("bench select", "--dim", "--D", "16", "dim", 16),
        ("bench active-learning", "--num-eval", "--eval", "64", "num_eval", 64),
        ("bench curate", "--text-width", "--dt", "16", "text_width", 16),
        ("bench round", "--pool-size", "--pool", "600", "pool_size", 600),
        ("bench round", "--image-width", "--d", "24", "image_width", 24),
    ],
)
def test_the_new_flag_works_and_the_old_one_too_with_one_warning(
    name: str,
    new: str,
    old: str,
    value: str,
    field: str,
    expected: object,
    capsys: pytest.CaptureFixture[str],
) -> None:
    command: ConfigCommand = COMMANDS[name]
    required = []  # the other required fields, as text
    for f, _ in command.flags:
        if f.default == "required" and f.path[-1] != field:
            required += ["x"] if f.positional else [f.option, "x"]
    for flag in (new, old):
        cfg = command.parse([*required, flag, value])
        got = getattr(cfg, field)
        assert getattr(got, "value", got) == expected, (name, flag)
        warnings = _warnings(capsys.readouterr().err)
        assert warnings == ([] if flag == new else [f"warning: {old} is deprecated; use {new}"])
    assert old in command.renamed_options() and old not in command.option_names()


def test_bench_select_width_means_the_same_as_elsewhere_and_the_old_flag_keeps_its_meaning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--image-width` leaves out the bias column everywhere; `bench select`'s old `--d` counted it."""
    select = COMMANDS["bench select"]
    assert select.parse(["--image-width", "768"]).acts_width == 769
    assert select.parse(["--d", "769"]).image_width == 768
    assert _warnings(capsys.readouterr().err) == ["warning: --d is deprecated; use --image-width"]
    assert select.parse([]).image_width == COMMANDS["bench round"].parse([]).image_width == 768
    assert COMMANDS["bench curate"].parse(["--d", "24"]).image_width == 24  # it never counted the bias


def test_old_yaml_keys_load_with_a_warning_and_the_new_name_wins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "campaign.yaml"
    fields = {"pool": "p", "classes": "c", "posterior": "q", "trainer": "local", "eval_labels": "shape"}
    config.write_text(yaml.safe_dump(fields | {"train": {"lr": 0.05}}))
    command = COMMANDS["campaign init"]
    cfg = command.parse(["d", "--config", str(config)])
    assert (cfg.executor.value, cfg.eval_label_column, cfg.train.lr) == ("local", "shape", 0.05)
    assert sorted(_warnings(capsys.readouterr().err)) == [
        f"warning: `eval_labels:` in {config} is deprecated; use `eval_label_column:`",
        f"warning: `trainer:` in {config} is deprecated; use `executor:`",
    ]
    assert command.parse(["d", "--config", str(config), "--executor", "ray"]).executor.value == "ray"
    demo = tmp_path / "demo.yaml"
    demo.write_text("pool: 40\ntargets: 8\n")
    cfg = COMMANDS["demo"].parse(["--config", str(demo)])
    assert (cfg.pool_size, cfg.num_targets) == (40, 8)


def test_a_campaign_directory_written_before_the_renames_still_loads(tmp_path: Path) -> None:
    from pipeline.rounds.campaign import read_config
    from pipeline.rounds.config import CampaignConfig
    from pipeline.rounds.state import CONFIG_FILE

    stored = {
        "pool": "p", "classes": "c", "posterior": "q", "label_source": "oracle", "truth": "t",
        "truth_column": "shape", "eval_labels": "colour", "trainer": "local",
    }  # fmt: skip
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(stored))
    cfg = read_config(str(tmp_path))
    assert (cfg.truth_label_column, cfg.eval_label_column, cfg.executor.value) == ("shape", "colour", "local")
    assert cfg == CampaignConfig(**stored)  # keywords under the old names too
    assert "trainer" not in cfg.model_dump() and cfg.model_dump()["executor"].value == "local"


class _Section(Config):
    width: Annotated[int, Renamed("d", lambda d: d - 1)] = 8  # width without the bias column


class _Model(Config):
    executor: Annotated[str, Renamed("trainer")] = "ray"  # where work runs
    section: _Section = _Section()  # a section


def test_renamed_fields_are_one_mechanism_for_keywords_sections_and_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _Model(trainer="local", section={"d": 5}) == _Model(executor="local", section={"width": 4})
    assert _Model.model_validate({"trainer": "local", "executor": "ray"}).executor == "ray"
    assert list(renamed_keys(_Model, {"trainer": 1, "section": {"d": 2}})) == [
        ("trainer", "executor"),
        ("section.d", "section.width"),
    ]
    command = ConfigCommand(_Model, lambda cfg: 0, "model")
    assert command.renamed_options() == {"--trainer": "--executor", "--section-d": "--section-width"}
    assert command.parse(["--section-d", "9"]).section.width == 8
    assert _warnings(capsys.readouterr().err) == ["warning: --section-d is deprecated; use --section-width"]
    assert command.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--executor" in out and "--trainer" not in out and "--section-d " not in out
