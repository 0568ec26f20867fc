"""The campaign world: a shifted target domain, a mixed pool and a posterior, as a campaign starts from.

On the procedural image world (`pipeline.data.synthetic`) with a real model (the tiny CLIP by default),
`build_campaign_world(root, spec)` writes, under `root`:

    world/pairs/                     in-domain image-caption pairs (and classes/<task>.json)
    world/pool/clean/                the pool's in-domain images, a `corrupt` share made unreadable
    world/pool/<domain>/             the pool's images of each shifted domain, at one severity
    world/targets/, world/eval/      unlabelled targets and a labelled evaluation set of the target domain
    posterior/                       the starting posterior, fitted on the pairs
    emb/pool/, emb/targets/, emb/eval/   their embeddings with activations (`embed --activations`)
    world.json                       completion marker: the spec, the fit, what was embedded, seconds

Every corpus has its own world indices (`start`), so no image is in two of them. The benchmarks and the
tests' campaign world are both this, at different sizes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.data.synthetic import SHIFTED_DOMAINS, Domain
from pipeline.io import storage

MARKER = "world.json"


@dataclass(frozen=True)
class CampaignWorldSpec:
    """What the world holds (the defaults: `bench active-learning`'s reported sizes)."""

    model: str = "bayescurate-tiny"  # model whose posterior the campaigns refine
    task: str = "shape"  # zero-shot task of the synthetic world (its classes file)
    seed: int = 0  # synthetic world seed
    pairs: int = 2048  # in-domain image–caption pairs the starting posterior is fitted on
    pool_clean: int = 400  # in-domain pool images
    pool_per_domain: int = 400  # pool images per shifted domain
    pool_domains: tuple[Domain, ...] = SHIFTED_DOMAINS  # shifted domains in the pool
    severity: int = 3  # severity of every shifted domain (1..5)
    corrupt: float = 0.02  # fraction of the in-domain pool files made corrupt (embed quarantines them)
    target_domain: Domain = Domain.BLUR  # the shifted domain of the targets and the evaluation set
    targets: int = 200  # unlabelled target-domain images
    eval: int = 1000  # labelled target-domain images
    block_size: int = 256  # contrastive block of the posterior's fit

    def corpora(self) -> dict[str, dict[str, Any]]:
        """Corpus name (its folder under world/) -> its `MakeWorldConfig` fields."""
        shifted = {"severity": self.severity}
        out: dict[str, dict[str, Any]] = {
            "pairs": {"n": self.pairs},
            "pool/clean": {"n": self.pool_clean, "start": 1_000_000, "corrupt": self.corrupt},
        }
        for i, domain in enumerate(self.pool_domains):
            out[f"pool/{domain.value}"] = {
                "n": self.pool_per_domain, "start": 2_000_000 + 100_000 * i, "domain": domain, **shifted,
            }  # fmt: skip
        target = {"domain": self.target_domain, **shifted}
        out["targets"] = {"n": self.targets, "start": 3_000_000, **target}
        out["eval"] = {"n": self.eval, "start": 4_000_000, **target}
        return out


@dataclass(frozen=True)
class CampaignWorld:
    """Where the world's parts are: what a campaign config names."""

    root: Path
    posterior: Path  # the starting posterior
    pool: Path  # embeddings with activations
    targets: Path
    eval: Path
    classes: Path  # the task's classes file
    images: Path  # the corpora (`CampaignWorldSpec.corpora`), one folder each

    @classmethod
    def at(cls, root: Path, task: str) -> CampaignWorld:
        return cls(
            root,
            root / "posterior",
            root / "emb" / "pool",
            root / "emb" / "targets",
            root / "emb" / "eval",
            root / "world" / "pairs" / "classes" / f"{task}.json",
            root / "world",
        )

    def paths(self) -> dict[str, Path]:
        """The paths by name (to build a subclass from)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def build_campaign_world(root: Path, spec: CampaignWorldSpec) -> tuple[CampaignWorld, dict[str, Any]]:
    """Write the corpora, fit the posterior, embed pool, targets and evaluation set; returns the paths and
    what was built. Once: a second call finds `world.json` and returns at once."""
    from pipeline.flows.embed import EmbedConfig, embed
    from pipeline.flows.fit import FitConfig, fit_posterior
    from pipeline.flows.world import MakeWorldConfig, make_world

    world = CampaignWorld.at(root, spec.task)
    marker = root / MARKER
    if marker.is_file():
        return world, json.loads(marker.read_text())
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for name, corpus in spec.corpora().items():
        make_world(MakeWorldConfig(out=str(world.images / name), seed=spec.seed, **corpus))
    seconds["world"] = time.perf_counter() - started
    started = time.perf_counter()
    fit = fit_posterior(
        FitConfig(
            pairs=str(world.images / "pairs"), model=spec.model, out=str(world.posterior),
            block_size=spec.block_size, executor="local", tracking=False,
        )
    )  # fmt: skip
    seconds["fit"] = time.perf_counter() - started
    embedded: dict[str, Any] = {}
    for name, dest in (("pool", world.pool), ("targets", world.targets), ("eval", world.eval)):
        started = time.perf_counter()
        result = embed(
            EmbedConfig(
                images=str(world.images / name), posterior=str(world.posterior), out=str(dest),
                executor="local", activations=True, tracking=False,
            )
        )  # fmt: skip
        seconds[f"embed_{name}"] = time.perf_counter() - started
        embedded[name] = {"rows": result.rows, "embedded": result.embedded, "quarantined": result.quarantined}
    info = {
        "settings": json.loads(json.dumps(asdict(spec), default=lambda v: v.value)),
        "posterior_id": fit.posterior_id,
        "prior_precision": fit.prior_precision,
        "pairs_used": fit.pairs_used,
        "embedded": embedded,
        "seconds": seconds,
    }
    storage.write_text(marker, json.dumps(info, indent=1))
    return world, info
