"""Label-free GGN of the contrastive losses with respect to an unnormalised embedding (MATH.md §1).

For a source embedding `x` (unnormalised) scored against target rows `Y` (normalised to `Ŷ`), with
`u = x/‖x‖`, `r = ‖x‖` and the normalisation Jacobian `J = (I − u uᵀ)/r`:

    InfoNCE: p = softmax(s Ŷ u),               G(x) = s² J Ŷᵀ (diag p − p pᵀ) Ŷ J
    SigLIP:  w_j = σ(z_j)(1 − σ(z_j)), z = s Ŷ u + b,   G(x) = s² J Ŷᵀ diag(w) Ŷ J

Neither depends on the label. The batch sum `Σ_b G(x_b)` is computed without any `[B, D, D]` tensor by
expanding `J M J = (M − u uᵀM − M u uᵀ + (uᵀMu) u uᵀ)/r²` with `M_b = s² Ŷᵀ(diag w_b − ρ_b ρ_bᵀ)Ŷ`
(`w_b = ρ_b = p_b` for InfoNCE, `ρ_b = 0` for SigLIP). With `q_b = Ŷᵀρ_b`, `c_b = Ŷ u_b` (cosines) and
`v_b = M_b u_b = s² (Ŷᵀ(w_b ⊙ c_b) − q_b (ρ_b·c_b))`:

    Σ_b G_b = s² Ŷᵀ diag(Σ_b w_b/r_b²) Ŷ − s² (Q/r)ᵀ(Q/r) − (U/r)ᵀ(V/r) − (V/r)ᵀ(U/r) + Uᵀ diag(γ) U,
    γ_b = (u_b·v_b)/r_b²,

a handful of `[B, C] @ [C, D]` and `[D, B] @ [B, D]` products: `O(B·C·D + C·D² + B·D²)`.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

# Largest number of logits of one row chunk kept between the two softmax passes (64 MiB in float32).
_CACHE_ELEMENTS = 1 << 24


class Likelihood(str, Enum):
    """The contrastive loss whose curvature is used."""

    INFONCE = "infonce"
    """CLIP: softmax cross-entropy over the targets of each source (MATH §1)."""
    SIGLIP = "siglip"
    """SigLIP: independent sigmoid per source–target pair with a learned bias (MATH §1)."""


def _check_inputs(sources: Tensor, targets: Tensor, chunk_size: int) -> None:
    if sources.ndim != 2 or targets.ndim != 2:
        raise ValueError(
            f"sources and targets must be 2-D [B, D] and [C, D], got shapes {list(sources.shape)} "
            f"and {list(targets.shape)}"
        )
    if sources.shape[1] != targets.shape[1]:
        raise ValueError(
            f"sources have embedding dimension {sources.shape[1]} but targets have {targets.shape[1]}"
        )
    if targets.shape[0] == 0:
        raise ValueError("targets must hold at least one row, got 0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _normalise(x: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Rows of `x` divided by their norms, and the norms; a zero row is an error."""
    norms = x.norm(dim=1)  # [B]
    if bool((norms == 0).any()):
        row = int(torch.nonzero(norms == 0)[0, 0])
        raise ValueError(f"{what} row {row} has zero norm; its normalisation is undefined")
    return x / norms[:, None], norms


def _ggn(
    sources: Tensor,
    targets: Tensor,
    scale: float,
    bias: float,
    softmax: bool,
    chunk_size: int,
    accumulate_dtype: torch.dtype | None,
) -> Tensor:
    """Shared implementation of both GGN sums (see the module docstring for the expansion)."""
    _check_inputs(sources, targets, chunk_size)
    dtype = torch.promote_types(sources.dtype, targets.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    acc = accumulate_dtype or dtype
    device = sources.device
    s = float(scale)
    n_sources, dim = sources.shape
    n_targets = targets.shape[0]

    y_hat, _ = _normalise(targets.to(dtype), "target")  # [C, D]
    _normalise(sources, "source")  # zero rows are reported by their index in the whole batch
    weight_sum = torch.zeros(n_targets, dtype=acc, device=device)  # Σ_b w_b / r_b²   [C]
    outer = torch.zeros(dim, dim, dtype=acc, device=device)  # everything except the Ŷᵀ diag Ŷ term
    c_chunks = [(lo, min(lo + chunk_size, n_targets)) for lo in range(0, n_targets, chunk_size)]

    for lo in range(0, n_sources, chunk_size):
        x = sources[lo : lo + chunk_size].to(dtype)  # [b, D]
        u, r = _normalise(x, "source")  # [b, D], [b]
        inv_r2 = r.pow(-2)  # [b]

        if softmax:
            # First pass: the log-partition of each row over all C targets, in C chunks. The logit
            # chunks are kept for the second pass when they fit in _CACHE_ELEMENTS, else recomputed.
            keep = x.shape[0] * n_targets <= _CACHE_ELEMENTS
            cached: list[Tensor] = []
            lse = torch.full((x.shape[0],), -torch.inf, dtype=dtype, device=device)  # [b]
            for c_lo, c_hi in c_chunks:
                logits = s * (u @ y_hat[c_lo:c_hi].T)  # [b, c]
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
                if keep:
                    cached.append(logits)

        q = torch.zeros_like(u)  # Ŷᵀ ρ_b              [b, D]
        wc = torch.zeros_like(u)  # Ŷᵀ (w_b ⊙ c_b)      [b, D]
        rho_c = torch.zeros_like(r)  # ρ_b · c_b          [b]
        for i_c, (c_lo, c_hi) in enumerate(c_chunks):
            y = y_hat[c_lo:c_hi]  # [c, D]
            if softmax:
                logits = cached[i_c] if cached else s * (u @ y.T)  # [b, c]
                cos = logits / s if s != 0 else u @ y.T
                w = torch.exp(logits - lse[:, None])  # p_b restricted to this chunk   [b, c]
                both = torch.cat([w, w * cos]) @ y  # [2b, D]
                q += both[: x.shape[0]]
                wc += both[x.shape[0] :]
                rho_c += (w * cos).sum(dim=1)
            else:
                cos = u @ y.T  # [b, c]
                z = s * cos + bias
                w = torch.sigmoid(z) * torch.sigmoid(-z)  # [b, c]
                wc += (w * cos) @ y
            weight_sum[c_lo:c_hi] += (w.to(acc) * inv_r2.to(acc)[:, None]).sum(dim=0)

        v = s * s * (wc - q * rho_c[:, None]) if softmax else s * s * wc  # M_b u_b   [b, D]
        u_r = (u * inv_r2.sqrt()[:, None]).to(acc)  # u_b / r_b   [b, D]
        v_r = (v * inv_r2.sqrt()[:, None]).to(acc)  # v_b / r_b   [b, D]
        gamma = (u_r * v_r).sum(dim=1)  # (u_b·v_b)/r_b²   [b]
        cross = u_r.T @ v_r  # [D, D]
        outer += (u.to(acc) * gamma[:, None]).T @ u.to(acc) - cross - cross.T
        if softmax:
            q_r = (q * inv_r2.sqrt()[:, None]).to(acc)  # [b, D]
            outer -= (s * s) * (q_r.T @ q_r)

    # s² Ŷᵀ diag(Σ_b w_b/r_b²) Ŷ, in C chunks.
    diag_term = torch.zeros(dim, dim, dtype=acc, device=device)
    for c_lo, c_hi in c_chunks:
        y = y_hat[c_lo:c_hi].to(acc)  # [c, D]
        diag_term += (y * weight_sum[c_lo:c_hi, None]).T @ y
    total = (s * s) * diag_term + outer
    return (total + total.T) / 2


def infonce_ggn(
    sources: Tensor,
    targets: Tensor,
    scale: float,
    *,
    chunk_size: int = 1024,
    accumulate_dtype: torch.dtype | None = None,
) -> Tensor:
    """Sum over sources of the label-free InfoNCE GGN w.r.t. each unnormalised source (MATH §1).

    `Σ_b s² J_b Ŷᵀ (diag p_b − p_b p_bᵀ) Ŷ J_b`, `p_b = softmax(s Ŷ x̂_b)` over all C targets.

    sources: [B, D] unnormalised embeddings (image embeddings for the image tower); targets: [C, D] (any
    norm; normalised here); scale: `s = exp(logit_scale)`. Rows are processed in chunks of `chunk_size`
    and the softmax over targets in two passes over chunks of `chunk_size` targets, so memory stays
    `O(chunk_size² + C·D + D²)`. Cost `O(B·C·D + C·D² + B·D²)`. Returns the symmetric [D, D] sum in
    `accumulate_dtype` when given (use float64 to sum many batches), else in the inputs' dtype.
    """
    return _ggn(sources, targets, scale, 0.0, True, chunk_size, accumulate_dtype)


def siglip_ggn(
    sources: Tensor,
    targets: Tensor,
    scale: float,
    bias: float,
    *,
    chunk_size: int = 1024,
    accumulate_dtype: torch.dtype | None = None,
) -> Tensor:
    """Sum over sources of the label-free SigLIP GGN w.r.t. each unnormalised source (MATH §1).

    `Σ_b s² J_b Ŷᵀ diag(w_b) Ŷ J_b`, `w_bj = σ(z_bj)(1 − σ(z_bj))`, `z_bj = s x̂_bᵀ ŷ_j + b`.

    sources: [B, D]; targets: [N, D]; scale `s`, bias `b` (SigLIP's `logit_bias`). Chunked over both
    sources and targets (`chunk_size` each). Returns the symmetric [D, D] sum in `accumulate_dtype` when
    given, else in the inputs' dtype.
    """
    return _ggn(sources, targets, scale, float(bias), False, chunk_size, accumulate_dtype)


def ggn(
    likelihood: Likelihood | str,
    sources: Tensor,
    targets: Tensor,
    scale: float,
    bias: float = 0.0,
    **kwargs: int | torch.dtype | None,
) -> Tensor:
    """Dispatch to `infonce_ggn` or `siglip_ggn` by likelihood (`bias` is ignored for InfoNCE)."""
    try:
        kind = Likelihood(likelihood)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in Likelihood)
        raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {choices}") from None
    if kind is Likelihood.INFONCE:
        return infonce_ggn(sources, targets, scale, **kwargs)  # type: ignore[arg-type]
    return siglip_ggn(sources, targets, scale, bias, **kwargs)  # type: ignore[arg-type]
