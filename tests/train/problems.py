"""Tiny re-fit problems (float64, d=6, D=5, C=4) shared by the tests of pipeline.train."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.bayes.curvature import Likelihood, ggn
from pipeline.bayes.kron import KronFactors, KronPosterior
from pipeline.train.data import TrainData

d, D, C = 6, 5, 4
SCALE = 10.0


def world(seed: int = 0) -> tuple[Tensor, Tensor]:
    """(true projection [D, d], class text means [C, D])."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, d, generator=g, dtype=torch.float64), torch.randn(
        C, D, generator=g, dtype=torch.float64
    )


def activations(n: int, g: torch.Generator) -> Tensor:
    acts = torch.randn(n, d, generator=g, dtype=torch.float64)
    acts[:, -1] = 1.0  # the bias column
    return acts


def prior(
    n_pretrain: int = 200,
    prior_precision: float = 1.0,
    damping: str = "paper",
    seed: int = 0,
    likelihood: Likelihood | str = Likelihood.INFONCE,
    bias: float = 0.0,
) -> KronPosterior:
    """A posterior around a perturbation `P̂` of the true projection, from `n_pretrain` synthetic sources."""
    p_true, text = world(seed)
    g = torch.Generator().manual_seed(seed + 1)
    p_hat = p_true + 0.7 * torch.randn(D, d, generator=g, dtype=torch.float64)
    acts = activations(n_pretrain, g)
    b = ggn(likelihood, acts @ p_hat.T, text, SCALE, bias, accumulate_dtype=torch.float64)
    return KronPosterior(KronFactors.from_batch(acts, b), p_hat, prior_precision, damping=damping)


def labelled(
    n: int = 40, noise: float = 0.0, seed: int = 0, offsets: bool = False, bias: float = 0.0
) -> TrainData:
    """Rows labelled by the true projection, a share `noise` of them relabelled uniformly at random."""
    p_true, text = world(seed)
    g = torch.Generator().manual_seed(seed + 2)
    acts = activations(n, g)
    off = 0.3 * torch.randn(n, D, generator=g, dtype=torch.float64) if offsets else None
    emb = acts @ p_true.T + (0 if off is None else off)
    logits = SCALE * torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(text, dim=1).T
    labels = torch.distributions.Categorical(logits=logits + bias).sample()
    flip = torch.rand(n, generator=g) < noise
    labels[flip] = torch.randint(0, C, (int(flip.sum()),), generator=g)
    return TrainData(acts, labels, off, [f"sample-{seed}-{i:04d}" for i in range(n)])
