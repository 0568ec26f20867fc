"""A campaign whose rounds stream the pool through `curate`'s engine chooses what the in-memory rounds
choose, round after round (the later rounds re-score the stored activations under an updated posterior),
and never holds the pool."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.rounds import campaign
from pipeline.rounds.data import Rows
from tests.fixtures_world import World

pytestmark = pytest.mark.slow


def _round(directory: Path, index: int) -> dict[str, list]:
    table = pq.read_table(directory / "rounds" / f"{index:03d}" / "picks.parquet")
    return table.to_pydict()


def _run(world: World, directory: Path, rounds: int, **overrides: object) -> None:
    cfg = world.config(max_rounds=rounds, **overrides)
    campaign.init(str(directory), cfg, log=lambda _: None)
    campaign.run(str(directory), rounds, log=lambda _: None)


@pytest.mark.parametrize(("batch", "method"), [("greedy", "epig"), ("top-k", "bald"), ("stochastic", "epig")])
def test_streamed_rounds_choose_what_in_memory_rounds_choose(
    campaign_world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: str, method: str
) -> None:
    settings = {"batch": batch, "method": method, "budget": 5}
    _run(campaign_world, tmp_path / "memory", 2, engine="memory", **settings)

    def no_pool(self: campaign.Campaign) -> Rows:
        raise AssertionError("a streamed campaign read the whole pool")

    monkeypatch.setattr(campaign.Campaign, "pool", no_pool)
    _run(campaign_world, tmp_path / "stream", 2, engine="stream", **settings)
    for index in (0, 1):
        memory, stream = _round(tmp_path / "memory", index), _round(tmp_path / "stream", index)
        assert stream["sample_id"] == memory["sample_id"]
        assert stream["predicted"] == memory["predicted"]
        assert stream["score"] == pytest.approx(memory["score"], rel=1e-4, abs=1e-9)
        assert stream["domain"] == memory["domain"] and stream["source"] == memory["source"]
    # The second round left the first round's picks out and trained on both rounds' labels.
    assert not set(_round(tmp_path / "stream", 0)["sample_id"]) & set(
        _round(tmp_path / "stream", 1)["sample_id"]
    )
    state = campaign.status(str(tmp_path / "stream"))
    assert [r.labels_used for r in state.rounds] == [5, 10]


def test_a_streamed_round_without_targets_refuses_epig_and_names_the_fix(
    campaign_world: World, tmp_path: Path
) -> None:
    cfg = campaign_world.config(max_rounds=1, engine="stream", targets=None, method="epig")
    campaign.init(str(tmp_path / "c"), cfg, log=lambda _: None)
    with pytest.raises(ValueError, match=r"needs `targets`.*engine: memory"):
        campaign.run(str(tmp_path / "c"), 1, log=lambda _: None)
