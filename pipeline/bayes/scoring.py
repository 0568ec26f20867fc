"""Per-row acquisition scores of any block of image rows under one fixed posterior: the scoring of curation.

A `RowScorer` is built once per posterior (the joint draws' class-side products, EPIG's target side, the
class text Gaussians) and then scores blocks of rows independently, so a pool of millions can be scored
block by block on any number of workers and the scores do not depend on how the pool was cut.

Cost per row and draw (MATH §10): the cosine numerators `⟨P_k a + o, t̂_kc⟩` are one product with
`P_kᵀ t̂_kc` (`C·d`); the norm `‖P_k a + o‖` needs the draw's embedding (`D·d`). `Norm.EXPECTED` replaces
it by `√E‖g‖² = √(‖P̂a + o‖² + Σ Var(g))`, the expected norm ProbCosine uses, the same for every draw, so a
row costs `d² + D·d + K·C·d` instead of `K·D·d` (about 1.5M against 25M multiply-adds at ViT-B/32 sizes).
It is an approximation: `bench curate` reports its rank correlation and top-k overlap with the exact norm.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch import Tensor

from pipeline.bayes.acquisition import HeadDraws, JointDraws, _epig, _EpigTargets, bald
from pipeline.bayes.cosine import ProbLogits, prob_cosine
from pipeline.bayes.head import Activations, BayesHead
from pipeline.bayes.kron import KronDraws
from pipeline.bayes.metrics import entropy

# Scores a RowScorer computes (the values of `pipeline.selection.Acquisition` it supports).
ROW_METHODS = ("epig", "bald", "entropy", "random")


class Norm(str, Enum):
    """How the norm of a drawn image embedding is taken in the cosine of each joint draw."""

    EXACT = "exact"
    """`‖P_k a + o‖` of every draw: the reference (`K·D·d` multiply-adds a row)."""
    EXPECTED = "expected"
    """`√E‖g‖²` under the posterior, shared by the draws (`d² + D·d` a row): ~10x cheaper at ViT sizes."""


@dataclass(frozen=True)
class RowScores:
    """Scores of a block of rows and their probit predictive (what annotators and curators see)."""

    scores: Tensor  # [n] float64 (EPIG, BALD or entropy in nats; 1 for random)
    probs: Tensor  # [n, C] probit predictive


class RowScorer:
    """Scores blocks of image rows by `method` under one posterior, from `draws` joint draws seeded by `seed`.

    The draws are those of `score_pool(head, ..., k=draws, seed=seed)`, so with `Norm.EXACT` and float64
    the scores of any block equal `score_pool`'s for the same rows. EPIG's target side (the targets'
    probabilities under the same draws, MATH §7) is computed once here; without `targets`, EPIG is
    refused: a block cannot be its own target set when the pool is cut into blocks.
    text: the class text rows [C, dt]; targets: EPIG's target rows [Nt, d].
    """

    def __init__(
        self,
        head: BayesHead,
        text: Activations,
        method: str,
        *,
        targets: Activations | None = None,
        draws: int = 64,
        seed: int = 0,
        norm: Norm | str = Norm.EXACT,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if method not in ROW_METHODS:
            raise ValueError(f"method {method!r} cannot be scored row by row; expected one of {ROW_METHODS}")
        if method == "epig" and (targets is None or len(targets) == 0):
            raise ValueError("EPIG scores rows against a target set: give targets (--targets)")
        self.method = method
        self.norm = Norm(norm)
        self.head = head.computing_in(dtype)
        self.dtype = dtype
        text = text.to(dtype)
        self.text_mean, self.text_var = self.head.text_embeddings(text.acts, text.offsets)  # [C, D] each
        self.drawn: HeadDraws | None = None
        self.targets: _EpigTargets | None = None
        if method in ("epig", "bald"):
            generator = torch.Generator(device="cpu").manual_seed(seed)
            joint = JointDraws(self.head, text.acts, draws, generator, text.offsets)
            drawn = joint.draw(self.head.image)
            if self.norm is Norm.EXPECTED:  # the draws' embeddings are never needed: do not hold or ship them
                drawn = HeadDraws(None, drawn.text, drawn.dual, drawn.scale, drawn.bias)  # type: ignore[arg-type]
            self.drawn = drawn
        if method == "epig":
            self.targets = _EpigTargets.of(self._draw_probs(targets.to(dtype)))

    @property
    def classes(self) -> int:
        return int(self.text_mean.shape[0])

    def to(self, device: torch.device | str) -> RowScorer:
        """This scorer computing on `device` (a GPU actor moves it there once, in its setup)."""
        moved = object.__new__(RowScorer)
        moved.__dict__.update(self.__dict__)
        moved.head = self.head.computing_in(self.dtype, device)
        moved.text_mean, moved.text_var = self.text_mean.to(device), self.text_var.to(device)
        if self.drawn is not None:
            image = self.drawn.image
            if image is not None:
                image = KronDraws(image.weight.to(device), image.left.to(device), image.right.to(device))
            moved.drawn = replace(
                self.drawn, image=image, text=self.drawn.text.to(device), dual=self.drawn.dual.to(device)
            )
        if self.targets is not None:
            moved.targets = replace(
                self.targets, flat=self.targets.flat.to(device), entropy=self.targets.entropy.to(device)
            )
        return moved

    def _gaussians(self, rows: Activations) -> tuple[Tensor, Tensor]:
        return self.head.image_embeddings(rows.acts, rows.offsets)  # [n, D] each

    def _draw_probs(self, rows: Activations, moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if self.drawn is None:
            raise RuntimeError(f"a {self.method!r} scorer holds no joint draws")
        norms = None
        if self.norm is Norm.EXPECTED:
            mean, var = moments if moments is not None else self._gaussians(rows)
            norms = ((mean * mean).sum(dim=1) + var.sum(dim=1)).sqrt()  # √E‖g‖²   [n]
        return self.drawn.probs(rows.acts, rows.offsets, norms)  # [n, K, C]

    def __call__(self, rows: Activations) -> RowScores:
        """Scores and probit predictive of rows [n, d] (offsets [n, D])."""
        device = self.text_mean.device
        rows = rows.to(self.dtype)
        if rows.acts.device != device:
            rows = Activations(
                rows.acts.to(device), None if rows.offsets is None else rows.offsets.to(device)
            )
        mean, var = self._gaussians(rows)
        cos_mean, cos_var = prob_cosine(mean, var, self.text_mean, self.text_var)
        probs = ProbLogits.from_cosine(cos_mean, cos_var, self.head.scale, self.head.bias).probit()  # [n, C]
        if self.method == "entropy":
            scores = entropy(probs)
        elif self.method == "random":
            scores = torch.ones(len(rows), dtype=probs.dtype, device=device)
        elif self.method == "bald":
            scores = bald(self._draw_probs(rows, (mean, var)))
        else:
            if self.targets is None:
                raise RuntimeError("an EPIG scorer was built without its target side")
            scores = _epig(self._draw_probs(rows, (mean, var)), self.targets, None, 1024)
        return RowScores(scores.double().cpu(), probs.double().cpu())
