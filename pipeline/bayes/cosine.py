"""ProbCosine and the predictive over classes (MATH.md §5–6).

`prob_cosine` gives the analytic mean and variance of the cosine between two independent diagonal
Gaussians (normalising the inner product by the expected norms); `ProbLogits` holds the resulting Gaussian
logits and turns them into class probabilities (probit approximation, Monte Carlo, or MAP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def prob_cosine(mean_x: Tensor, var_x: Tensor, mean_y: Tensor, var_y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of the cosine of `x ~ N(μx, diag σx²)` and `y ~ N(μy, diag σy²)` (MATH §5).

    mean = `μxᵀμy / √(E‖x‖² E‖y‖²)`,
    var  = `Σ_k (μx_k² σy_k² + σx_k² μy_k² + σx_k² σy_k²) / (E‖x‖² E‖y‖²)`, `E‖x‖² = ‖μx‖² + Σ σx²`.

    mean_x, var_x: [N, D]; mean_y, var_y: [M, D] -> (mean [N, M], var [N, M]).
    """
    if mean_x.shape != var_x.shape or mean_y.shape != var_y.shape:
        raise ValueError(
            f"means and variances must have equal shapes, got x {list(mean_x.shape)} vs {list(var_x.shape)}, "
            f"y {list(mean_y.shape)} vs {list(var_y.shape)}"
        )
    if mean_x.ndim != 2 or mean_y.ndim != 2 or mean_x.shape[1] != mean_y.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D], got {list(mean_x.shape)} and {list(mean_y.shape)}")
    mx2, my2 = mean_x.square(), mean_y.square()
    norm_x = mx2.sum(dim=1) + var_x.sum(dim=1)  # E‖x‖²   [N]
    norm_y = my2.sum(dim=1) + var_y.sum(dim=1)  # E‖y‖²   [M]
    denom = norm_x[:, None] * norm_y[None, :]  # [N, M]
    mean = (mean_x @ mean_y.T) / denom.sqrt()
    var = (mx2 @ var_y.T + var_x @ (my2 + var_y).T) / denom
    return mean, var


@dataclass
class ProbLogits:
    """Independent Gaussian logits per sample and class: mean [N, C], var [N, C]."""

    mean: Tensor
    var: Tensor

    def __post_init__(self) -> None:
        if self.mean.shape != self.var.shape or self.mean.ndim != 2:
            raise ValueError(
                f"mean and var must both be [N, C], got {list(self.mean.shape)} and {list(self.var.shape)}"
            )

    @classmethod
    def from_cosine(cls, mean: Tensor, var: Tensor, scale: float, bias: float = 0.0) -> ProbLogits:
        """Logits `z = s·cos + b` from ProbCosine moments: `mean_z = s·mean + b`, `var_z = s²·var` (§5)."""
        return cls(scale * mean + bias, scale * scale * var)

    def probit(self) -> Tensor:
        """Probit predictive `softmax(mean_z / √(1 + π/8 · var_z))` over classes (MATH §6): -> [N, C]."""
        return torch.softmax(self.mean / torch.sqrt(1 + math.pi / 8 * self.var), dim=-1)

    def map_probs(self) -> Tensor:
        """Predictive of the mean logits, `softmax(mean_z)`: -> [N, C]."""
        return torch.softmax(self.mean, dim=-1)

    def sample_probs(self, k: int, generator: torch.Generator | None = None) -> Tensor:
        """Monte Carlo predictive: softmax of `k` logit draws `z ~ N(mean, var)`: -> [N, k, C].

        Each logit is drawn independently, which is right for the predictive of one sample but NOT for
        EPIG or any quantity shared between samples: the draws of two samples are then independent. Use
        `BayesHead.sample_probs` (joint weight draws, MATH §7) for those.
        """
        if k < 1:
            raise ValueError(f"number of samples must be >= 1, got {k}")
        n, c = self.mean.shape
        gen_device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(n, k, c, generator=generator, dtype=self.mean.dtype, device=gen_device)
        z = self.mean[:, None, :] + self.var.sqrt()[:, None, :] * eps.to(self.mean.device)  # [N, k, C]
        return torch.softmax(z, dim=-1)
