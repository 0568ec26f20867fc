"""A CLIP-shaped stand-in model for benchmarks on synthetic activations: random projections, hashed text.

Campaigns and curation never encode an image (they work from cached activations), so a model that has the
projections' shapes, a logit scale and a text tower is all they need. Loaded by name through
`pipeline.stages.embed.ModelSpec` as `MODEL` with `pretrained` = "d,dt,D,seed".
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

MODEL = "factory:pipeline.models.synthetic:synthetic"
# The name before the model moved here from `jobs/bench_round.py`: posterior directories written then
# record it, and `check_identity` compares names, so it must still load as a model of that name.
LEGACY_MODEL = "factory:jobs.bench_round:synthetic"


@dataclass
class Features:
    acts: torch.Tensor  # [N, dt + 1] text activations with the bias column
    offset: torch.Tensor | None = None  # [N, D]; always None (no attention-pool residual)


class SyntheticAdapter:
    """A CLIP-shaped stand-in: projections of the given sizes with random weights, logit scale 100 (CLIP's
    cap), text activations hashed from each prompt. Enough for everything a campaign does (it never encodes
    an image: it works from cached activations)."""

    likelihood = "infonce"
    scale = 100.0
    bias = 0.0

    def __init__(self, d: int, dt: int, D: int, seed: int, name: str = MODEL) -> None:
        self.d, self.dt, self.D, self.seed, self.name = d, dt, D, seed, name
        g = torch.Generator().manual_seed(seed)
        self._image = torch.randn(D, d + 1, generator=g, dtype=torch.float64) / math.sqrt(d)  # [D, d + 1]
        self._text = torch.randn(D, dt + 1, generator=g, dtype=torch.float64) / math.sqrt(dt)  # [D, dt + 1]

    def image_weight(self) -> torch.Tensor:
        return self._image

    def text_weight(self) -> torch.Tensor:
        return self._text

    def encode_texts(self, texts: list[str]) -> Features:
        rows = []
        for text in texts:
            digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
            g = torch.Generator().manual_seed(digest % 2**63)
            rows.append(torch.cat([torch.randn(self.dt, generator=g, dtype=torch.float64), torch.ones(1)]))
        return Features(torch.stack(rows))

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pretrained": f"{self.d},{self.dt},{self.D},{self.seed}",
            "weights_sha256": f"synthetic-{self.d}-{self.dt}-{self.D}-{self.seed}",
            "embed_dim": self.D,
        }


def _sizes(pretrained: str | None) -> tuple[int, int, int, int]:
    text = pretrained or "768,512,512,0"
    try:
        d, dt, D, seed = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"the synthetic model's pretrained must be 'd,dt,D,seed', got {text!r}") from None
    return d, dt, D, seed


def synthetic(pretrained: str | None, device: str = "cpu") -> SyntheticAdapter:
    """The `factory:` entry point of `MODEL`: `pretrained` = "d,dt,D,seed" (default ViT-B/32's sizes)."""
    return SyntheticAdapter(*_sizes(pretrained))


def legacy_synthetic(pretrained: str | None, device: str = "cpu") -> SyntheticAdapter:
    """The same model under `LEGACY_MODEL`, the name that posterior directories written before the move
    record (`jobs.bench_round.synthetic` is this function)."""
    return SyntheticAdapter(*_sizes(pretrained), name=LEGACY_MODEL)
