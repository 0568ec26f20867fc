"""A campaign round re-fitted by Ray Train gives the weights the in-process trainer gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.io import tensors
from pipeline.rounds import campaign
from tests.fixtures_world import World

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_ray_train_and_the_local_trainer_agree_on_a_campaign_round(
    campaign_world: World, tmp_path: Path, ray_session: None
) -> None:
    weights = {}
    for trainer in ("ray", "local"):
        directory = tmp_path / trainer
        campaign.init(
            str(directory), campaign_world.config(trainer=trainer, max_rounds=1), log=lambda _: None
        )
        report = campaign.run(str(directory), 1, log=lambda _: None)
        assert report.state.rounds[0].train["trainer"] == trainer
        weights[trainer] = tensors.load(directory / "rounds/000/projection.safetensors")[0]["weight"]
    # The same objective, optimiser and data: the all-reduced full-batch gradients differ only by rounding.
    torch.testing.assert_close(weights["ray"], weights["local"], rtol=0, atol=1e-10)
    assert campaign.Campaign(str(tmp_path / "ray")).picks(0) == campaign.Campaign(
        str(tmp_path / "local")
    ).picks(0)
