"""A stand-in for `ClipAdapter` (contract interface) so pipeline tests do not depend on a trained model.

Image tower: 8x8 average pooling of the 3x16x16... pixels -> tanh features; text tower: hashed bag of words.
Both with a bias column appended, as the real adapter does. Deterministic weights (seeded).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms as T

D, DI, DT, SIDE = 8, 12, 10, 32


@dataclass
class TowerFeatures:
    acts: torch.Tensor
    offset: torch.Tensor | None


class StandInAdapter:
    name = "standin"
    likelihood = "infonce"
    scale = 20.0
    bias = 0.0

    def __init__(self, device: str = "cpu") -> None:
        g = torch.Generator().manual_seed(0)
        self.image_mix = torch.randn(3 * 4 * 4, DI - 1, generator=g) / 7
        self.P = torch.randn(D, DI, generator=g) / 3
        self.Q = torch.randn(D, DT, generator=g) / 3
        self.device = device
        self.preprocess = T.Compose([T.Resize(SIDE), T.CenterCrop(SIDE), T.ToTensor()])

    def image_features(self, pixels: torch.Tensor) -> TowerFeatures:
        pooled = torch.nn.functional.adaptive_avg_pool2d(pixels.float(), 4).flatten(1)  # [N, 48]
        acts = torch.tanh((pooled - 0.5) @ self.image_mix * 4)
        return TowerFeatures(torch.cat([acts, torch.ones(len(acts), 1)], 1), None)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), DT - 1)
        for i, text in enumerate(texts):
            for word in text.split():
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % (DT - 1)] += 1.0
        return out

    def text_features(self, tokens: torch.Tensor) -> TowerFeatures:
        acts = torch.tanh(tokens)
        return TowerFeatures(torch.cat([acts, torch.ones(len(acts), 1)], 1), None)

    def encode_texts(self, texts: list[str]) -> TowerFeatures:
        return self.text_features(self.tokenize(texts))

    def image_weight(self) -> torch.Tensor:
        return self.P

    def text_weight(self) -> torch.Tensor:
        return self.Q

    def identity(self) -> dict[str, Any]:
        return {
            "name": "factory:tests.stages.standin:load",
            "pretrained": None,
            "weights_sha256": "standin-v1",
            "embed_dim": D,
        }


def load(pretrained: str | None = None, device: str = "cpu") -> StandInAdapter:
    return StandInAdapter(device)
