"""The online Laplace step of an annotation round: new MAP and posterior from labelled pairs (MATH.md §9).

After a round, labelled pairs `(a_i, y_i)` arrive: cached (bias-augmented) image activations `a_i` [d] and
class indices `y_i ∈ [0, C)`. The text side and the encoders stay frozen; only the image projection `P`
[D, d] moves, from the prior mean `P̂` to

    P* = argmin_P  Σ_i CE(s · cos(P a_i + o_i, h_c) + b, y_i) + ½ vec(P − P̂)ᵀ Λ_prev vec(P − P̂),

with `h_c` [C, D] the class text mean embeddings, `o_i` [D] the per-sample embedding offset (SigLIP's
attention-pool residual; zero for CLIP) and `Λ_prev` the prior posterior's precision (`KronPosterior`,
never formed as a Kronecker product). The cross-entropy is the softmax over the C classes for CLIP and for
SigLIP alike: a label is one class out of C, and `BayesHead` turns logits into class probabilities with the
same softmax, so the MAP maximises the likelihood the predictions are made under. (SigLIP's pretraining
sigmoid scores each pair independently and has no notion of "the other classes".)

The posterior is then updated around `P*` with the labelled data's KFAC factors, `A_lab = Σ a_i a_iᵀ` and
`B_lab = Σ G(P* a_i + o_i)` (MATH §1 with the class text means as targets, the same likelihood as the
pretraining factors so the merge is of like with like), weighted by `w`: `A + w A_lab`, `B + w B_lab`,
`N + w n`.

`Whitening` is the symmetric square root `Λ^{-1/2}` in matrix form; the optimiser in `pipeline.train`
works in its coordinates (`P = P̂ + Λ^{-1/2}[Z]`, taken in the eigenbases of the factors), where the prior
term is `½‖Z‖²_F` and one unit of a parameter is one prior standard deviation, whatever the scale of the
pretrained weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.bayes.curvature import Likelihood, ggn
from pipeline.bayes.kron import KronFactors, KronPosterior, KronPower


def check_labelled(
    acts: Tensor,
    labels: Tensor | None,
    text_mean: Tensor,
    offsets: Tensor | None = None,
    weight: Tensor | None = None,
) -> None:
    """Raise ValueError unless acts [n, d], labels [n] integers in [0, C), text_mean [C, D], offsets [n, D].

    With `weight` [D, d] given, `d` and `D` must also match it. `labels=None` skips the label checks.
    """
    if text_mean.ndim != 2 or text_mean.shape[0] == 0:
        raise ValueError(f"text_mean must be [C, D] with C >= 1, got shape {list(text_mean.shape)}")
    n_classes, dim = text_mean.shape
    if weight is not None:
        if weight.ndim != 2:
            raise ValueError(f"projection must be [D, d], got shape {list(weight.shape)}")
        if weight.shape[0] != dim:
            raise ValueError(
                f"text_mean has embedding dimension {dim} but the projection maps to {weight.shape[0]}"
            )
    d = None if weight is None else weight.shape[1]
    if acts.ndim != 2 or (d is not None and acts.shape[1] != d):
        want = f"[n, {d}]" if d is not None else "[n, d]"
        raise ValueError(
            f"activations have shape {list(acts.shape)} but the projection expects {want} "
            "(with a trailing 1 column when the projection has a bias)"
        )
    n = acts.shape[0]
    if offsets is not None and tuple(offsets.shape) != (n, dim):
        raise ValueError(f"offsets have shape {list(offsets.shape)}, expected [{n}, {dim}]")
    if labels is None:
        return
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels have shape {list(labels.shape)}, expected [{n}] (one per row)")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    bad = (labels < 0) | (labels >= n_classes)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"label {int(labels[row])} at row {row} is outside [0, {n_classes}) (C = {n_classes} classes)"
        )


def _check_weight(weight: Tensor, prior: KronPosterior) -> None:
    want = (prior.factors.D, prior.factors.d)
    if weight.ndim != 2 or tuple(weight.shape) != want:
        raise ValueError(f"projection has shape {list(weight.shape)} but the posterior is over {list(want)}")


def embeddings(weight: Tensor, acts: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Image embeddings `g_i = P a_i + o_i`: weight [D, d], acts [n, d], offsets [n, D] or None -> [n, D]."""
    emb = acts.to(weight.dtype) @ weight.T  # [n, D]
    return emb if offsets is None else emb + offsets.to(emb.dtype)


def class_logits(
    weight: Tensor,
    text_mean: Tensor,
    acts: Tensor,
    scale: float,
    bias: float = 0.0,
    offsets: Tensor | None = None,
) -> Tensor:
    """`z_ic = s · cos(P a_i + o_i, h_c) + b` (MATH notation): -> [n, C], differentiable in `weight`."""
    emb = F.normalize(embeddings(weight, acts, offsets), dim=1)  # [n, D]
    text = F.normalize(text_mean.to(emb.dtype), dim=1)  # [C, D]
    return float(scale) * (emb @ text.T) + float(bias)


def data_nll(
    weight: Tensor,
    text_mean: Tensor,
    acts: Tensor,
    labels: Tensor,
    scale: float,
    bias: float = 0.0,
    offsets: Tensor | None = None,
) -> Tensor:
    """The data term alone, `Σ_i CE(s · cos(P a_i + o_i, h_c) + b, y_i)` summed over rows (MATH §9): scalar.

    weight [D, d]; text_mean [C, D]; acts [n, d]; labels [n] in [0, C); offsets [n, D] or None. Softmax
    cross-entropy over the C classes for CLIP and SigLIP alike (module docstring). Zero (still attached to
    `weight`'s graph) when n = 0, so an empty shard of a distributed run contributes nothing. Divide by n
    for the mean held-out NLL.
    """
    check_labelled(acts, labels, text_mean, offsets, weight)
    logits = class_logits(weight, text_mean, acts, scale, bias, offsets)  # [n, C]
    return F.cross_entropy(logits, labels.long(), reduction="sum")


def prior_penalty(weight: Tensor, prior: KronPosterior) -> Tensor:
    """`½ vec(P − P̂)ᵀ Λ_prev vec(P − P̂)` via `KronPosterior.precision_quadratic` (MATH §3, §9): scalar."""
    _check_weight(weight, prior)
    return 0.5 * prior.precision_quadratic(weight - prior.weight.to(weight))


def refit_loss(
    weight: Tensor,
    prior: KronPosterior,
    text_mean: Tensor,
    acts: Tensor,
    labels: Tensor,
    scale: float,
    bias: float = 0.0,
    offsets: Tensor | None = None,
) -> Tensor:
    """The MAP objective of an annotation round (MATH §9): scalar, differentiable in `weight`.

    `Σ_i CE(s · cos(P a_i + o_i, h_c) + b, y_i) + ½ vec(P − P̂)ᵀ Λ_prev vec(P − P̂)`, i.e.
    `data_nll + prior_penalty`.

    weight: `P` [D, d]; prior: the posterior before the round (`prior.weight` is `P̂`, its precision
    `Λ_prev`); text_mean: `h_c` [C, D]; acts: `a_i` [n, d] (bias-augmented like the prior's factors);
    labels: `y_i` [n] in [0, C); scale: `s = exp(logit_scale)`; bias: `b`; offsets: `o_i` [n, D] or None.
    """
    return data_nll(weight, text_mean, acts, labels, scale, bias, offsets) + prior_penalty(weight, prior)


@dataclass(frozen=True)
class Whitening(KronPower):
    """The symmetric root of the prior covariance, `vec(Δ) = Λ^{-1/2} vec(Z)`, in matrix form (MATH §3).

    `KronPosterior.precision_power(-1/2)`: with `A = U diag(α) Uᵀ`, `B = V diag(β) Vᵀ`, both dampings share
    one form, `Δ = V (S ⊙ (Vᵀ Z U)) Uᵀ`: exact `S[j, i] = (τ α_i β_j / N + λ)^{-1/2}`; paper
    `S[j, i] = β'_j^{-1/2} α'_i^{-1/2}` with `α' = √(τ/N) α + √λ`, `β' = √(τ/N) β + √λ` (i.e.
    `Δ = B'^{-1/2} Z A'^{-1/2}`). Then `vec(Δ)ᵀ Λ vec(Δ) = ‖Z‖²_F`, and the operator is symmetric (its own
    adjoint), so it also maps a gradient w.r.t. `Δ` to the gradient w.r.t. `Z`. As a matrix function it
    does not depend on the signs or order of the eigenvectors `eigh` returns.

    U: [d, d]; V: [D, D]; S: [D, d].
    """

    noun: ClassVar[str] = "whitened offset"

    @classmethod
    def of(cls, prior: KronPosterior) -> Whitening:
        """The square root of `prior`'s covariance in float64, from its cached eigendecomposition."""
        root = prior.precision_power(-0.5)
        return cls(root.U, root.V, root.S)


def labelled_factors(
    weight: Tensor,
    acts: Tensor,
    text_mean: Tensor,
    likelihood: Likelihood | str,
    scale: float,
    bias: float = 0.0,
    offsets: Tensor | None = None,
    meta: dict[str, str | int | float] | None = None,
) -> KronFactors:
    """KFAC factors of the labelled rows at the new MAP `P*` (MATH §2, §9), in float64.

    `A_lab = Σ_i a_i a_iᵀ` [d, d]; `B_lab = Σ_i G(P* a_i + o_i)` [D, D], the label-free GGN of `likelihood`
    (MATH §1) with the class text means `h_c` [C, D] as targets; `n = len(acts)`. For the softmax
    likelihood the GGN of the labelled cross-entropy equals the label-free one, so no labels are needed.

    weight: `P*` [D, d]; acts [n, d]; offsets [n, D] or None; meta: identity of the factors (merged with
    the prior's, which must agree on shared keys).
    """
    check_labelled(acts, None, text_mean, offsets, weight)
    a = acts.to(torch.float64)  # [n, d]
    dim = weight.shape[0]
    if a.shape[0] == 0:
        b_sum = torch.zeros(dim, dim, dtype=torch.float64, device=a.device)
    else:
        emb = embeddings(weight.to(torch.float64), a, offsets)  # [n, D]
        b_sum = ggn(likelihood, emb, text_mean.to(torch.float64), scale, bias, accumulate_dtype=torch.float64)
    return KronFactors.from_batch(a, b_sum, meta)


def updated_posterior(
    prior: KronPosterior,
    weight: Tensor,
    labelled: KronFactors,
    *,
    merge_weight: float = 1.0,
    refit_prior_precision: bool = False,
) -> KronPosterior:
    """The posterior after an annotation round (MATH §9): factors `prior.factors + w · labelled`, mean `P*`.

    `A + w A_lab`, `B + w B_lab`, `N + w n_lab` (exact merge, `KronFactors.__add__`); the mean is the new
    MAP `weight` [D, d]; τ and the damping are kept; λ is kept, or re-fitted by marginal likelihood
    (MATH §4, `KronPosterior.fit`) when `refit_prior_precision`. Pass the ORIGINAL prior and the factors
    of ALL labels so far: a round is then a pure function of (prior, labels).
    """
    _check_weight(weight, prior)
    extra = labelled.to(dtype=prior.factors.A.dtype, device=prior.factors.A.device).scaled(merge_weight)
    merged = prior.factors + extra
    mean = weight.to(dtype=prior.weight.dtype, device=prior.weight.device)
    if refit_prior_precision:
        return KronPosterior.fit(merged, mean, prior.hessian_scale, prior.damping)
    return KronPosterior(merged, mean, prior.prior_precision, prior.hessian_scale, prior.damping)
