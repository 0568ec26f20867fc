"""A small campaign world for campaign and curation tests, built once per session by the benchmarks' own
`build_campaign_world`: posterior and embeddings of the shipped tiny CLIP (in-process executor, no
tracking), a pool mixing clean and blurred images with a few corrupt files, targets and a labelled
evaluation set from the blurred domain."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipeline.data.synthetic import Domain
from pipeline.experiments.campaign_world import CampaignWorld, CampaignWorldSpec, build_campaign_world
from pipeline.rounds.config import CampaignConfig

SPEC = CampaignWorldSpec(
    pairs=512, pool_clean=120, pool_per_domain=120, pool_domains=(Domain.BLUR,), corrupt=0.03,
    targets=48, eval=96, block_size=128,
)  # fmt: skip


@dataclass(frozen=True)
class World(CampaignWorld):
    def config(self, **overrides: object) -> CampaignConfig:
        fields: dict[str, object] = {
            "pool": str(self.pool),
            "targets": str(self.targets),
            "eval": str(self.eval),
            "classes": str(self.classes),
            "posterior": str(self.posterior),
            "budget": 6,
            "label_source": "oracle",
            "truth": str(self.pool),
            "trainer": "local",
            "tracking": False,
            "draws": 16,
        }
        fields.update(overrides)
        return CampaignConfig.model_validate(fields)


@pytest.fixture(scope="session")
def campaign_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    world, _ = build_campaign_world(tmp_path_factory.mktemp("campaign-world"), SPEC)
    return World(**world.paths())
