"""The Bayesian CLIP head: posteriors over both projections, scored by cosine (MATH.md §3, §5–7).

Embeddings are `acts @ Wᵀ + offset`: the offset [N, D] is a per-sample constant (SigLIP's attention-pool
residual) and carries no uncertainty; the variance comes only from the projection `W`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.bayes.cosine import ProbLogits, prob_cosine
from pipeline.bayes.curvature import Likelihood
from pipeline.bayes.kron import KronPosterior

TOWERS: tuple[str, ...] = ("image", "text")  # the two projections a posterior covers, in file order


def _check_offset(offset: Tensor | None, n: int, dim: int, what: str) -> None:
    if offset is not None and tuple(offset.shape) != (n, dim):
        raise ValueError(f"{what} has shape {list(offset.shape)}, expected [{n}, {dim}]")


@dataclass(frozen=True)
class Activations:
    """Rows of one tower as a head sees them: pre-projection activations and their per-row offsets.

    The embedding of row n is `acts[n] @ Wᵀ + offsets[n]`; `offsets` is None where the projection explains
    the whole embedding (CLIP). One value instead of parallel `acts` / `offsets` arguments.
    """

    acts: Tensor  # [N, d]
    offsets: Tensor | None = None  # [N, D]

    def __post_init__(self) -> None:
        if self.acts.ndim != 2:
            raise ValueError(f"activations must be [N, d], got {list(self.acts.shape)}")
        if self.offsets is not None and (
            self.offsets.ndim != 2 or self.offsets.shape[0] != self.acts.shape[0]
        ):
            raise ValueError(
                f"offsets have shape {list(self.offsets.shape)} for {self.acts.shape[0]} rows of activations"
            )

    def __len__(self) -> int:
        return int(self.acts.shape[0])

    def take(self, index: Tensor) -> Activations:
        """Rows `index` (indices or a boolean mask)."""
        return Activations(self.acts[index], None if self.offsets is None else self.offsets[index])

    def to(self, dtype: torch.dtype) -> Activations:
        return Activations(self.acts.to(dtype), None if self.offsets is None else self.offsets.to(dtype))


class BayesHead:
    """Image and text projection posteriors with the model's logit scale `s` and bias `b`.

    image, text: `KronPosterior` of the image projection `P` [D, d] and text projection `Q` [D, dt];
    scale: `s = exp(logit_scale)`; bias: `b` (SigLIP's logit bias, 0 for CLIP); likelihood: the loss whose
    curvature updates the posterior (used by acquisition).
    """

    def __init__(
        self,
        image: KronPosterior,
        text: KronPosterior,
        scale: float,
        bias: float = 0.0,
        likelihood: Likelihood | str = Likelihood.INFONCE,
    ) -> None:
        if image.factors.D != text.factors.D:
            raise ValueError(
                f"image embeddings have dimension {image.factors.D} but text embeddings have {text.factors.D}"
            )
        try:
            self.likelihood = Likelihood(likelihood)
        except ValueError:
            raise ValueError(f"unknown likelihood {likelihood!r}; expected 'infonce' or 'siglip'") from None
        self.image = image
        self.text = text
        self.scale = float(scale)
        self.bias = float(bias)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return self.image.factors.D

    def with_image(self, posterior: KronPosterior) -> BayesHead:
        """The same head with another image posterior (e.g. after a labelling round)."""
        return BayesHead(posterior, self.text, self.scale, self.bias, self.likelihood)

    def computing_in(self, dtype: torch.dtype, device: torch.device | str | None = None) -> BayesHead:
        """The same head doing its per-row products in `dtype` on `device` (`KronPosterior.computing_in`)."""
        image, text = self.image.computing_in(dtype, device), self.text.computing_in(dtype, device)
        return BayesHead(image, text, self.scale, self.bias, self.likelihood)

    @staticmethod
    def _embeddings(
        post: KronPosterior, acts: Tensor, offset: Tensor | None, what: str
    ) -> tuple[Tensor, Tensor]:
        mean = post.mean(acts)  # [N, D]
        _check_offset(offset, acts.shape[0], post.factors.D, what)
        if offset is not None:
            mean = mean + offset.to(mean.dtype)
        return mean, post.embedding_variance(acts)

    def image_embeddings(self, acts: Tensor, offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and variance of the image embeddings: acts [N, d] -> ([N, D], [N, D])."""
        return self._embeddings(self.image, acts, offset, "image offset")

    def text_embeddings(self, acts: Tensor, offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and variance of the text embeddings: acts [C, dt] -> ([C, D], [C, D])."""
        return self._embeddings(self.text, acts, offset, "text offset")

    def logits(
        self,
        image_acts: Tensor,
        text_acts: Tensor,
        image_offset: Tensor | None = None,
        text_offset: Tensor | None = None,
    ) -> ProbLogits:
        """Gaussian logits by ProbCosine (MATH §5): `mean_z = s·E[cos] + b`, `var_z = s²·Var[cos]`: [N, C]."""
        mx, vx = self.image_embeddings(image_acts, image_offset)
        my, vy = self.text_embeddings(text_acts, text_offset)
        mean, var = prob_cosine(mx, vx, my, vy)
        return ProbLogits.from_cosine(mean, var, self.scale, self.bias)

    def sample_probs(
        self,
        image_act_sets: list[Tensor],
        text_acts: Tensor,
        k: int,
        generator: torch.Generator | None = None,
        image_offsets: list[Tensor | None] | None = None,
        text_offset: Tensor | None = None,
        *,
        chunk_size: int = 2048,
    ) -> list[Tensor]:
        """Class probabilities under `k` JOINT posterior draws, shared by every set (MATH §7).

        Draws `P_k` (image) and `Q_k` (text) once; for each set of image activations [N_i, d] returns
        `softmax_c(s · cos(P_k a + offset, Q_k t_c + offset) + b)` as [N_i, k, C]. Because every set sees the
        same draws, pool and target probabilities are coupled through the parameters, as EPIG requires.
        Rows are processed `chunk_size` at a time to bound memory at `O(chunk_size · k · (C + D))`.
        """
        if k < 1:
            raise ValueError(f"number of samples must be >= 1, got {k}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if image_offsets is not None and len(image_offsets) != len(image_act_sets):
            raise ValueError(
                f"got {len(image_offsets)} image offsets for {len(image_act_sets)} sets of image activations"
            )
        n_text = text_acts.shape[0]
        self.text.check_acts(text_acts)
        _check_offset(text_offset, n_text, self.dim, "text offset")
        for acts in image_act_sets:
            self.image.check_acts(acts)

        P = self.image.sample_weights(k, generator)  # [k, D, d]
        Q = self.text.sample_weights(k, generator)  # [k, D, dt]
        text = torch.einsum("ct,kdt->kcd", text_acts.to(Q.dtype), Q)  # [k, C, D]
        if text_offset is not None:
            text = text + text_offset.to(text.dtype)[None]
        text = text / text.norm(dim=-1, keepdim=True)

        out: list[Tensor] = []
        for i, acts in enumerate(image_act_sets):
            offset = image_offsets[i] if image_offsets is not None else None
            _check_offset(offset, acts.shape[0], self.dim, f"image offset {i}")
            probs = torch.empty(acts.shape[0], k, n_text, dtype=P.dtype, device=P.device)  # [N_i, k, C]
            for lo in range(0, acts.shape[0], chunk_size):
                a = acts[lo : lo + chunk_size].to(P.dtype)  # [n, d]
                img = torch.einsum("nd,kDd->knD", a, P)  # [k, n, D]
                if offset is not None:
                    img = img + offset[lo : lo + chunk_size].to(img.dtype)[None]
                img = img / img.norm(dim=-1, keepdim=True)
                logits = self.scale * (img @ text.transpose(1, 2)) + self.bias  # [k, n, C]
                probs[lo : lo + chunk_size] = torch.softmax(logits, dim=-1).transpose(0, 1)
            out.append(probs)
        return out

    def __repr__(self) -> str:
        return (
            f"BayesHead(image={self.image!r}, text={self.text!r}, scale={self.scale:g}, bias={self.bias:g}, "
            f"likelihood={self.likelihood.value!r})"
        )
