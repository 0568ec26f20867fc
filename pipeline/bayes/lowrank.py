"""Exact eigendecomposition updates of a symmetric matrix after adding positive semi-definite low-rank terms.

`M = U diag(λ) Uᵀ` and `M + ρ v vᵀ` (`ρ ≥ 0`) differ by a rotation of the eigenbasis: with `z = Uᵀ v`,
the update is `U (diag(λ) + ρ z zᵀ) Uᵀ`, and the eigenvalues `μ_j` of `diag(λ) + ρ z zᵀ` are the roots of the
secular equation

    f(μ) = 1 + ρ Σ_i z_i² / (λ_i − μ) = 0,    one root in each (λ_j, λ_{j+1}) and one in (λ_n, λ_n + ρ‖z‖²],

(Golub 1973; Bunch, Nielsen & Sorensen 1978). The eigenvectors are `q_j ∝ (diag(λ) − μ_j I)⁻¹ ẑ` with `ẑ`
recomputed from the roots by Löwner's formula `ρ ẑ_i² = Π_j (μ_j − λ_i) / Π_{k≠i} (λ_k − λ_i)` (Gu &
Eisenstat 1994), which makes them orthogonal to working precision however close the roots are. Components
that carry no update (`ρ|z_i|` at rounding level) or sit on an (almost) repeated eigenvalue are deflated
first, as in LAPACK's `dlaed2`: they stay eigenpairs, so repeated and zero eigenvalues are handled exactly.

Cost of one rank-one update of an `n × n` decomposition: `O(n²)` per root iteration (about five), `O(n·K²)`
for rotating `U` (`K ≤ n` the components left after deflation). Everything runs in float64. On 2 CPU
cores this is about as fast as MKL's eigh at n ≈ 500-800 (see `kron.EIGEN_UPDATE_MAX_RANK`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_EPS = torch.finfo(torch.float64).eps
_MAX_ITER = 64  # secular root iterations; the rational model converges in ~3-6, bisection is the backstop
_BLOCK = 128  # roots solved together: their [K, 128] float64 temporaries stay in a core's L2 cache


def _two_pole_root(c: Tensor, b_l: Tensor, b_r: Tensor, gap: Tensor, left: Tensor, last: Tensor) -> Tensor:
    """Root in (δ_l, δ_r) of `c + b_l/(δ_l − x) + b_r/(δ_r − x)` (`b_l, b_r > 0`), measured from the origin.

    From the left pole (`δ_l = 0`, `δ_r = gap`) it is the root in (0, gap) of
    `c x² − (c·gap + b_l + b_r) x + b_l·gap`, taken in the cancellation-free form `2C/(B + √(B² − 4cC))`;
    from the right pole (`δ_r = 0`) the mirror image; with no right pole (the last root) `x = b_l/c`.
    """
    big = c * gap + b_l + b_r
    from_left = 2 * b_l * gap / (big + (big * big - 4 * c * b_l * gap).clamp_min(0).sqrt())
    big_r = -c * gap + b_l + b_r
    from_right = -2 * b_r * gap / (big_r + (big_r * big_r + 4 * c * b_r * gap).clamp_min(0).sqrt())
    return torch.where(last, b_l / c, torch.where(left, from_left, from_right))


def _secular_block(d: Tensor, w: Tensor, j0: int, j1: int) -> tuple[Tensor, Tensor]:
    """Roots `j0 .. j1-1` of `f(μ) = 1 + Σ_i w_i/(d_i − μ)`: `(origin [b], mu [b])` as in `_secular_roots`."""
    k = d.shape[0]
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    j = torch.arange(j0, j1, device=d.device)
    last = j == k - 1
    d_left = d[j]
    gap = torch.where(last, zero, d[(j + 1).clamp_max(k - 1)] - d_left)  # [b]
    mid = d_left + gap / 2
    f_mid = 1 + (w[:, None] / (d[:, None] - mid[None, :])).sum(dim=0)  # f at the midpoints   [b]
    # f increases from −∞ to +∞ across (d_j, d_{j+1}): f(mid) ≥ 0 puts the root in the left half. The last
    # root lies in (d_K, d_K + Σw], measured from d_K.
    left = (f_mid >= 0) | last
    origin = torch.where(left, j, j + 1)  # the pole nearer to the root   [b]
    delta = d[:, None] - d[origin][None, :]  # d_i − d[origin_j]   [K, b]
    total = w.sum()
    hi = torch.where(left, torch.where(last, total, mid - d_left), zero)
    lo = torch.where(left, zero, mid - d_left - gap)  # right origin: mu in (mid − d_{j+1}, 0)
    dl_shift = torch.where(left, zero, -gap)  # δ_l (0 or −gap): the left pole relative to the origin
    dr_shift = torch.where(left, gap, zero)  # δ_r (gap or 0): the right pole (unused for the last root)
    # Initial guess (as LAPACK's dlaed4): the two bounding poles exactly, all other terms frozen at the
    # midpoint (at d_K + Σw for the last root); fall back to the bracket's far end.
    w_l, w_r = w[j], torch.where(last, zero, w[(j + 1).clamp_max(k - 1)])
    f_end = torch.where(last, 1 + (w / (d - d[-1] - total)).sum(), f_mid)
    c = f_end - torch.where(last, w_l / (-hi), w_l / (-gap / 2) + w_r / (gap / 2))
    mu = _two_pole_root(c, w_l, w_r, gap, left, last)
    far = torch.where(left, hi, lo)
    mu = torch.where((mu > lo) & (mu < hi) & torch.isfinite(mu), mu, far)
    done = torch.zeros_like(last)
    for _ in range(_MAX_ITER):
        inv = (delta - mu).reciprocal_()  # 1/(d_i − root)   [K, b]
        terms = inv * w[:, None]  # w_i/(d_i − root)
        sq = inv.mul_(terms)  # w_i/(d_i − root)²
        # ψ: poles left of the root (i ≤ j), φ: poles right of it; within the block that is a triangle.
        psi = terms[:j0].sum(0) + terms[j0:j1].triu().sum(0)
        phi = terms[j1:].sum(0) + terms[j0:j1].tril(-1).sum(0)
        dpsi = sq[:j0].sum(0) + sq[j0:j1].triu().sum(0)
        dphi = sq[j1:].sum(0) + sq[j0:j1].tril(-1).sum(0)
        f = 1 + psi + phi
        lo = torch.where(f < 0, mu, lo)  # f is increasing in mu: tighten the bracket
        hi = torch.where(f > 0, mu, hi)
        # Two-pole model f ≈ c + b_l/(δ_l − x) + b_r/(δ_r − x) matching ψ, ψ', φ, φ' at the iterate.
        dl, dr = dl_shift - mu, dr_shift - mu  # δ_l − mu, δ_r − mu
        b_l, b_r = dpsi * dl * dl, torch.where(last, zero, dphi * dr * dr)
        c = 1 + (psi - dpsi * dl) + torch.where(last, zero, phi - dphi * dr)
        new = _two_pole_root(c, b_l, b_r, gap, left, last)
        # Converged: f at rounding level, the model step below the iterate's precision (it may then touch
        # the bracket's end, which is the iterate), or the bracket collapsed. Otherwise a step that leaves
        # the bracket is replaced by bisection.
        f_small = f.abs() <= _EPS * (1 + 8 * (phi - psi) + mu.abs() * (dpsi + dphi))  # as dlaed4
        tiny_step = (new - mu).abs() <= 4 * _EPS * torch.maximum(new.abs(), mu.abs())
        collapsed = (hi - lo) <= 4 * _EPS * torch.maximum(hi.abs(), lo.abs())
        bisect = ~tiny_step & ((new <= lo) | (new >= hi) | ~torch.isfinite(new))
        new = torch.where(bisect, (lo + hi) / 2, new)
        mu = torch.where(done | f_small, mu, new)
        done = done | f_small | tiny_step | collapsed
        if bool(done.all()):
            break
    return origin, mu


def _secular_roots(d: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Roots of `f(μ) = 1 + Σ_i w_i / (d_i − μ)`, `d` [K] strictly ascending, `w` [K] > 0.

    Returns `(origin, mu)`, both [K]: root j is `d[origin_j] + mu_j`, with the origin the pole nearer to the
    root, so that the differences `d_i − root_j = (d_i − d[origin_j]) − mu_j` keep full relative accuracy
    (what the eigenvectors need). Each root is found by the two-pole rational ("fixed weight") model of
    `f` (Li 1994), safeguarded by bisection on its bracket: quadratic convergence, never leaves the bracket.
    `O(K²)` per iteration, done `_BLOCK` roots at a time.
    """
    k = d.shape[0]
    parts = [_secular_block(d, w, j0, min(j0 + _BLOCK, k)) for j0 in range(0, k, _BLOCK)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _diag_plus_rank_one(d: Tensor, z: Tensor, rho: float) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of `diag(d) + ρ z zᵀ`, `d` strictly ascending, every `z_i ≠ 0` (nothing to deflate).

    Returns `(values [K] ascending, vectors [K, K])`, columns `q_j ∝ ẑ ⊘ (d − μ_j)` with the Löwner `ẑ`.
    """
    k = d.shape[0]
    origin, mu = _secular_roots(d, rho * z * z)
    values = d[origin] + mu  # [K]
    if k == 1:
        return values, torch.ones(1, 1, dtype=d.dtype, device=d.device)
    # d_i − μ_j from the pole nearest to μ_j: accurate to working precision   [K, K]
    diff = (d[:, None] - d[origin][None, :]) - mu[None, :]
    # Löwner: ρ ẑ_i² = −(d_i − μ_i) Π_{j≠i} (d_i − μ_j)/(d_i − d_j); every factor is > 0 by interlacing,
    # and each partial product stays within the spread/gap ratio of d (no overflow). ρ cancels in the
    # normalised eigenvectors and is left out.
    ratios = diff / (d[:, None] - d[None, :])  # [K, K], ∞/NaN on the diagonal, replaced next
    ratios.diagonal().copy_(-diff.diagonal())
    z_hat = ratios.abs_().prod(dim=1).sqrt_() * torch.where(z < 0, -1.0, 1.0).to(d.dtype)  # [K]
    vectors = diff.reciprocal_().mul_(z_hat[:, None])  # ẑ_i/(d_i − μ_j)   [K, K]
    vectors /= torch.linalg.vector_norm(vectors, dim=0, keepdim=True)
    return values, vectors


def eigh_rank_one_update(
    values: Tensor, vectors: Tensor, v: Tensor, rho: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of `U diag(λ) Uᵀ + ρ v vᵀ` from that of `U diag(λ) Uᵀ` (`ρ ≥ 0`).

    values [n] (`λ`, any order), vectors [n, n] (`U`, orthonormal columns), v [n] -> (values [n] ascending,
    vectors [n, n]), in float64. Deflation (LAPACK `dlaed2`): a component with `ρ'|ẑ_i| ≤ 8 ε max(|λ|, ρ')`
    (`ρ' = ρ‖z‖²`, `ẑ = z/‖z‖`) is kept as it is; two components whose Givens rotation (zeroing one `z`
    entry) leaves an off-diagonal `|t c s| ≤` that tolerance (`t` the eigenvalue gap) are merged first. The
    rest is the secular equation and Löwner's eigenvectors (module docstring). Backward error `O(ε‖M‖)`.
    """
    if values.ndim != 1 or vectors.shape != (values.shape[0], values.shape[0]) or v.shape != values.shape:
        raise ValueError(
            f"expected values [n], vectors [n, n] and v [n], got {list(values.shape)}, "
            f"{list(vectors.shape)} and {list(v.shape)}"
        )
    rho = float(rho)
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be finite and >= 0 (a positive semi-definite update), got {rho}")
    values, vectors, v = (x.to(torch.float64) for x in (values, vectors, v))
    if bool((values[1:] >= values[:-1]).all()):  # eigh's order, and this function's: no copy needed yet
        d, U = values, vectors
    else:
        order = torch.argsort(values)
        d, U = values[order], vectors[:, order]
    z = U.T @ v  # [n]
    norm = float(torch.linalg.vector_norm(z))
    rho_eff = rho * norm * norm
    if rho_eff == 0.0:
        return d, U
    z = z / norm
    tol = 8 * _EPS * max(float(d.abs().max()), rho_eff)

    # Deflation scan (sequential, O(n) scalar work): Python floats, rotations applied to U as found.
    d_list, z_list = d.tolist(), z.tolist()
    keep: list[int] = []
    U_owned = False  # U is the caller's until the first rotation writes to it
    for i in range(len(d_list)):
        if rho_eff * abs(z_list[i]) <= tol:
            continue  # no coupling: (d_i, u_i) stays an eigenpair
        if keep:
            p = keep[-1]
            tau = math.hypot(z_list[p], z_list[i])
            c, s = z_list[i] / tau, -z_list[p] / tau
            t = d_list[i] - d_list[p]
            if abs(t * c * s) <= tol:
                # Rotate (u_p, u_i) so that z_p = 0: u_p is then deflated with eigenvalue c²d_p + s²d_i.
                z_list[p], z_list[i] = 0.0, tau
                d_p, d_i = d_list[p], d_list[i]
                d_list[p], d_list[i] = d_p * c * c + d_i * s * s, d_p * s * s + d_i * c * c
                if not U_owned:
                    U, U_owned = U.clone(), True
                u_p, u_i = U[:, p].clone(), U[:, i].clone()
                U[:, p], U[:, i] = c * u_p + s * u_i, c * u_i - s * u_p
                keep[-1] = i
                continue
        keep.append(i)
    d = torch.tensor(d_list, dtype=torch.float64, device=U.device)
    if not keep:
        order = torch.argsort(d)
        return d[order], U[:, order]
    if len(keep) == len(d_list):  # nothing deflated: the roots interlace, so they come out sorted
        new_values, local = _diag_plus_rank_one(d, z, rho_eff)
        return new_values, U @ local
    kept = torch.tensor(keep, dtype=torch.long, device=U.device)
    z_kept = torch.tensor([z_list[i] for i in keep], dtype=torch.float64, device=U.device)
    new_values, local = _diag_plus_rank_one(d[kept], z_kept, rho_eff)
    d[kept] = new_values
    U = U.clone() if not U_owned else U
    U[:, kept] = U[:, kept] @ local  # [n, K] @ [K, K]
    order = torch.argsort(d)
    return d[order], U[:, order]


def eigh_low_rank_update(values: Tensor, vectors: Tensor, factor: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of `U diag(λ) Uᵀ + L Lᵀ` from that of `U diag(λ) Uᵀ`, `L` [n, r].

    `L Lᵀ = Σ_c l_c l_cᵀ`, so it is `r` successive exact rank-one updates (`eigh_rank_one_update`); a column
    that is (numerically) in the span of the earlier ones deflates completely and costs only `O(n²)`.
    values [n], vectors [n, n], factor [n, r] -> (values [n] ascending, vectors [n, n]), float64.
    """
    if factor.ndim != 2 or factor.shape[0] != values.shape[0]:
        raise ValueError(f"factor must be [n, r] with n = {values.shape[0]}, got {list(factor.shape)}")
    factor = factor.to(torch.float64)
    for col in range(factor.shape[1]):
        values, vectors = eigh_rank_one_update(values, vectors, factor[:, col])
    return values.to(torch.float64), vectors.to(torch.float64)
