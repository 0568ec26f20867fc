"""A small synthetic world for campaign and curation tests, built once per session: posterior and
embeddings of the shipped tiny CLIP (in-process executor, no tracking), a pool mixing clean and blurred
images with a few corrupt files, targets and a labelled evaluation set from the blurred domain."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.flows.embed import EmbedConfig, embed
from pipeline.flows.fit import FitConfig, fit_posterior
from pipeline.flows.world import MakeWorldConfig, make_world
from pipeline.rounds.config import CampaignConfig


@dataclass(frozen=True)
class World:
    root: Path
    posterior: Path
    pool: Path
    targets: Path
    eval: Path
    classes: Path

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
    root = tmp_path_factory.mktemp("campaign-world")
    blur = {"domain": "blur", "severity": 3}
    for name, fields in {
        "pairs": {"n": 512},
        "pool/clean": {"n": 120, "start": 1_000_000, "corrupt": 0.03},
        "pool/shifted": {"n": 120, "start": 2_000_000, **blur},
        "targets": {"n": 48, "start": 3_000_000, **blur},
        "eval": {"n": 96, "start": 4_000_000, **blur},
    }.items():
        make_world(MakeWorldConfig(out=str(root / name), **fields))
    posterior = root / "posterior"
    fit_posterior(
        FitConfig(
            pairs=str(root / "pairs"), model="bayescurate-tiny", out=str(posterior), block_size=128,
            executor="local", tracking=False,
        )
    )  # fmt: skip
    for name in ("pool", "targets", "eval"):
        embed(
            EmbedConfig(
                images=str(root / name), posterior=str(posterior), out=str(root / "emb" / name),
                executor="local", activations=True,
            )
        )  # fmt: skip
    return World(
        root,
        posterior,
        root / "emb" / "pool",
        root / "emb" / "targets",
        root / "emb" / "eval",
        root / "pairs" / "classes" / "shape.json",
    )
