"""Calibration evaluation of a CLIP adapter on the synthetic world: fit the posterior, predict zero-shot.

The non-CLI half of `bayescurate bench calibration`: encode image–caption pairs, estimate KFAC factors for
both towers from contrastive blocks (MATH.md §1–2), fit the Laplace posteriors (§3–4), and turn class
prompts and test images into MAP, probit and Monte Carlo predictives (§5–6).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import torch
from PIL import Image
from torch import Tensor

from pipeline.bayes import contrastive
from pipeline.bayes.head import BayesHead
from pipeline.bayes.kron import Damping, KronFactors, KronPosterior
from pipeline.data.synthetic import World, class_names, prompts
from pipeline.models.adapter import ClipAdapter, TowerFeatures

# All Bayesian algebra of the benchmark runs in float64; the tiny model is small enough for it to be cheap.
DTYPE = torch.float64


class Predictive(str, Enum):
    """How class probabilities are formed from the head."""

    MAP = "map"
    """`softmax(s·cos(P̂a, Q̂t) + b)`: the pretrained model, no uncertainty."""
    PROBIT = "probit"
    """ProbCosine logits through the probit approximation (MATH §6)."""
    MC = "mc"
    """Average of `softmax` over K joint posterior draws of both projections (MATH §6–7)."""


@dataclass
class Features:
    """Pre-projection activations of one tower, in float64, with the optional per-sample offset."""

    acts: Tensor  # [N, d]
    offset: Tensor | None  # [N, D]

    @classmethod
    def cat(cls, parts: list[TowerFeatures]) -> Features:
        acts = torch.cat([p.acts for p in parts]).to(DTYPE)
        has_offset = [p.offset is not None for p in parts]
        if any(has_offset) and not all(has_offset):
            raise ValueError("some feature batches have an offset and some do not")
        offset = torch.cat([p.offset for p in parts]).to(DTYPE) if all(has_offset) and parts else None
        return cls(acts, offset)

    def embeddings(self, weight: Tensor) -> Tensor:
        """MAP embeddings `acts @ Wᵀ + offset`: -> [N, D]."""
        out = self.acts @ weight.T.to(DTYPE)
        return out if self.offset is None else out + self.offset


def _batched(items: Iterable, size: int) -> Iterable[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def encode_images(adapter: ClipAdapter, images: Iterable[Image.Image], batch_size: int = 256) -> Features:
    """Image-tower activations of PIL images, `batch_size` at a time."""
    parts = [
        adapter.image_features(torch.stack([adapter.preprocess(im) for im in batch]))
        for batch in _batched(images, batch_size)
    ]
    return Features.cat(parts)


@torch.inference_mode()
def encode_texts(adapter: ClipAdapter, texts: list[str], batch_size: int = 1024) -> Features:
    """Text-tower activations of strings, `batch_size` at a time."""
    return Features.cat([adapter.encode_texts(batch) for batch in _batched(texts, batch_size)])


@dataclass
class LabelledImages:
    """Encoded images of one test set with their labels per task."""

    features: Features
    labels: dict[str, Tensor]  # task -> [N] class indices


def encode_world(
    adapter: ClipAdapter,
    world: World,
    n: int,
    start: int,
    tasks: list[str],
    domain: str = "clean",
    severity: int = 0,
    batch_size: int = 256,
) -> LabelledImages:
    """Encode samples `start .. start + n - 1` of `world` in a domain, with their class indices per task."""
    samples = list(world.generate(n, domain, severity, start=start))
    features = encode_images(adapter, (s.image for s in samples), batch_size)
    labels = {
        task: torch.tensor([class_names(task).index(s.labels[task]) for s in samples]) for task in tasks
    }
    return LabelledImages(features, labels)


def class_text_features(adapter: ClipAdapter, task: str) -> Features:
    """One text activation per class: the mean over the task's prompt templates.

    Embeddings are linear in the activations, so averaging activations averages the (unnormalised)
    prompt embeddings; the same averaged activations feed MAP and Bayesian predictives alike.
    """
    templates = prompts(task)
    names = class_names(task)
    feats = encode_texts(adapter, [t.format(c) for c in names for t in templates])
    acts = feats.acts.reshape(len(names), len(templates), -1).mean(dim=1)  # [C, dt]
    offset = None
    if feats.offset is not None:
        offset = feats.offset.reshape(len(names), len(templates), -1).mean(dim=1)  # [C, D]
    return Features(acts, offset)


def contrastive_factors(
    images: Features,
    texts: Features,
    image_weight: Tensor,
    text_weight: Tensor,
    likelihood: str,
    scale: float,
    bias: float,
    block_size: int,
    meta: dict[str, str | int | float] | None = None,
) -> tuple[KronFactors, KronFactors]:
    """KFAC factors of both towers from paired rows cut into contrastive blocks (MATH §1–2).

    For each block of `block_size` pairs, the image GGN uses the block's image embeddings as sources and
    its caption embeddings as targets; the text GGN the reverse. `A = Σ a aᵀ` over all rows of each tower.
    A trailing partial block is used as a smaller block.
    """
    if images.acts.shape[0] != texts.acts.shape[0]:
        raise ValueError(f"got {images.acts.shape[0]} images but {texts.acts.shape[0]} captions")
    return contrastive.contrastive_factors(
        images.acts,
        images.embeddings(image_weight),
        texts.acts,
        texts.embeddings(text_weight),
        likelihood,
        scale,
        bias,
        block_size=block_size,
        meta=meta,
    )


def fit_head(
    image_factors: KronFactors,
    text_factors: KronFactors,
    image_weight: Tensor,
    text_weight: Tensor,
    scale: float,
    bias: float,
    likelihood: str,
    hessian_scale: float = 1.0,
    damping: Damping | str = Damping.PAPER,
) -> BayesHead:
    """Both posteriors with λ by marginal likelihood (MATH §4), combined into a head."""
    image = KronPosterior.fit(image_factors, image_weight.to(DTYPE), hessian_scale, damping)
    text = KronPosterior.fit(text_factors, text_weight.to(DTYPE), hessian_scale, damping)
    return BayesHead(image, text, scale, bias, likelihood)


def map_probs(head: BayesHead, images: Features, classes: Features) -> Tensor:
    """`softmax(s·cos(g, h_c) + b)` from the posterior-mean embeddings: -> [N, C]."""
    g = images.embeddings(head.image.weight)
    h = classes.embeddings(head.text.weight)
    cos = torch.nn.functional.normalize(g, dim=1) @ torch.nn.functional.normalize(h, dim=1).T  # [N, C]
    return torch.softmax(head.scale * cos + head.bias, dim=1)


def predict(
    head: BayesHead,
    images: Features,
    classes: Features,
    predictive: Predictive | str,
    k: int = 64,
    seed: int = 0,
) -> Tensor:
    """Class probabilities [N, C] of the test images under one predictive."""
    predictive = Predictive(predictive)
    if predictive is Predictive.MAP:
        return map_probs(head, images, classes)
    if predictive is Predictive.PROBIT:
        return head.logits(images.acts, classes.acts, images.offset, classes.offset).probit()
    generator = torch.Generator().manual_seed(seed)
    (probs,) = head.sample_probs(
        [images.acts], classes.acts, k, generator, image_offsets=[images.offset], text_offset=classes.offset
    )
    return probs.mean(dim=1)
