"""The campaign directory as a typed object: where every file lives, its round files' readers, and the state
file's records (older `state.json` files load; a damaged one is named with what to do)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from jobs import campaign as campaign_cli
from pipeline.io import storage, tensors
from pipeline.rounds.labels import LabelCounts
from pipeline.rounds.layout import CampaignDir, RoundFiles
from pipeline.rounds.state import Round, RoundCounts, RoundState, SelectionCounts, read_state
from tests.rounds.test_status import CONFIG, STATE


def test_a_campaign_directory_names_every_file_where_it_has_always_been() -> None:
    camp = CampaignDir("s3://bucket/campaigns/shapes")
    assert (camp.config, camp.state, camp.lease, camp.cache) == (
        "s3://bucket/campaigns/shapes/campaign.yaml",
        "s3://bucket/campaigns/shapes/state.json",
        "s3://bucket/campaigns/shapes/lease",
        "s3://bucket/campaigns/shapes/cache/model.safetensors",
    )
    assert (camp.labels, camp.quarantine) == (
        "s3://bucket/campaigns/shapes/labels",
        "s3://bucket/campaigns/shapes/labels/quarantine",
    )
    files = camp.round(7)
    assert files == RoundFiles("s3://bucket/campaigns/shapes", 7)
    assert files.dir == "s3://bucket/campaigns/shapes/rounds/007"
    names = {
        "picks": "picks.parquet",
        "push": "push.json",
        "labels": "labels.parquet",
        "projection": "projection.safetensors",
        "train": "train.json",
        "ray_train": "ray-train",
        "posterior": "posterior",
        "metrics": "metrics.json",
        "reliability": "reliability.png",
    }
    assert {k: getattr(files, k) for k in names} == {k: f"{files.dir}/{v}" for k, v in names.items()}
    assert CampaignDir("/data/campaigns/shapes/").name == "shapes"


def test_round_files_read_what_a_round_wrote(tmp_path: Path) -> None:
    files = CampaignDir(str(tmp_path)).round(0)
    assert files.picked_ids() == []  # before the round picks
    picks = pa.table({"sample_id": ["b", "a"], "rank": [0, 1], "score": [0.5, 0.25]})
    storage.write_parquet(picks, files.picks)
    assert files.picked_ids() == ["b", "a"]
    assert files.read_picks() == picks.to_pylist()
    storage.write_parquet(pa.table({"sample_id": ["a", "b"], "label": ["circle", "star"]}), files.labels)
    assert files.read_labels() == {"a": "circle", "b": "star"}
    weight = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    tensors.save(files.projection, {"weight": weight}, {"round": 0})
    torch.testing.assert_close(files.read_projection(), weight)


def test_the_config_reader_names_a_directory_that_is_no_campaign(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"is not a campaign directory \(no campaign\.yaml\)"):
        CampaignDir(str(tmp_path)).read_config()
    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump(CONFIG))
    camp = CampaignDir(str(tmp_path))
    assert camp.read_config().selection.budget == 4 and not camp.initialised()


def test_round_counts_keep_selection_and_labels_apart_and_write_todays_flat_counts() -> None:
    selected = {"tasks": 4, "candidates": 36, "pool_left": 36}
    counts = RoundCounts.from_json(selected)
    assert (
        counts == RoundCounts(SelectionCounts(4, 36, 36)) and counts.labels is None and counts.answered == 0
    )
    assert counts.to_json() == selected
    pushed = RoundCounts.from_json({**selected, "created": 4})
    assert pushed.selection.created == 4 and pushed.to_json() == {**selected, "created": 4}
    collected = STATE["rounds"][1]["counts"]
    counts = RoundCounts.from_json(collected)
    assert counts.labels == LabelCounts(
        tasks=4,
        answered=1,
        labelled=1,
        skipped=0,
        quarantined=0,
        multi_annotated=0,
        agreement=1.0,
        labels_total=4,
    )
    assert counts.answered == 1 and counts.to_json() == collected
    assert list(counts.to_json()) == list(collected)  # in the order every version wrote them


def test_a_round_keeps_its_pick_count_as_picks_in_state_json() -> None:
    data = STATE["rounds"][1]
    round_ = Round.from_json(data)
    assert round_.picked == 4 and round_.state is RoundState.COLLECTING
    assert round_.to_json() == data and "picked" not in round_.to_json()


def _campaign(directory: Path, state_text: str) -> Path:
    directory.mkdir()
    (directory / "campaign.yaml").write_text(yaml.safe_dump(CONFIG))
    (directory / "state.json").write_text(state_text)
    return directory


def test_a_truncated_state_json_is_named_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = json.dumps(STATE, indent=2)
    directory = _campaign(tmp_path / "camp", text[: len(text) // 2])
    path = str(directory / "state.json")
    with pytest.raises(ValueError, match="damaged") as raised:
        read_state(str(directory))
    message = str(raised.value)
    assert repr(path) in message and "backup" in message and "`campaign init`" in message
    assert campaign_cli.main(["status", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the campaign state {path!r} is damaged (")
    assert campaign_cli.main(["step", str(directory)]) == 2  # a step refuses too, and changes nothing
    assert (directory / "state.json").read_text() == text[: len(text) // 2]


@pytest.mark.parametrize(
    ("state", "found"),
    [
        ({**STATE, "format": "bayescurate.campaign/9"}, "has format 'bayescurate.campaign/9'"),
        ([1, 2], "has format 'list'"),
        (
            {**STATE, "rounds": [{"state": "updated"}]},
            "is damaged (TypeError: Round.__init__() missing 2 required positional arguments",
        ),
        ({**STATE, "rounds": [{**STATE["rounds"][0], "state": "done"}]}, "is damaged (ValueError: 'done'"),
    ],
)
def test_a_state_json_of_another_format_or_with_a_broken_round_is_named(
    tmp_path: Path, state: object, found: str
) -> None:
    directory = _campaign(tmp_path / "camp", json.dumps(state))
    with pytest.raises(ValueError) as raised:
        read_state(str(directory))
    assert str(raised.value).startswith(f"the campaign state {str(directory / 'state.json')!r} {found}")
