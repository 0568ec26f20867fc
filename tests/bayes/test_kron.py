"""KronFactors and KronPosterior against explicit torch.kron matrices (MATH §2–4), for both dampings."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.bayes.curvature import infonce_ggn
from pipeline.bayes.kron import Damping, KronFactors, KronPosterior

d, D, N = 5, 4, 30
TAU = 3.0
DAMPINGS = ["paper", "exact"]


def _factors(seed: int = 0, n: int = N, meta: dict | None = None) -> KronFactors:
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, d, generator=g, dtype=torch.float64)
    acts[:, -1] = 1.0  # bias column, as the adapter appends
    emb = torch.randn(n, D, generator=g, dtype=torch.float64)
    text = torch.randn(7, D, generator=g, dtype=torch.float64)
    return KronFactors.from_batch(acts, infonce_ggn(emb, text, 5.0), meta=meta)


def _weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(D, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dense_precision(f: KronFactors, lam: float, tau: float, damping: str) -> torch.Tensor:
    """Written out independently of KronPosterior: MATH §3."""
    eye = torch.eye
    if damping == "exact":
        return tau * torch.kron(f.A, f.B) / f.n + lam * eye(d * D, dtype=torch.float64)
    a = math.sqrt(tau) * f.A / math.sqrt(f.n) + math.sqrt(lam) * eye(d, dtype=torch.float64)
    b = math.sqrt(tau) * f.B / math.sqrt(f.n) + math.sqrt(lam) * eye(D, dtype=torch.float64)
    return torch.kron(a, b)


def _dense_log_evidence(f: KronFactors, weight: torch.Tensor, lam: float, tau: float, damping: str) -> float:
    _, logdet = torch.linalg.slogdet(_dense_precision(f, lam, tau, damping))
    return float(-0.5 * lam * weight.square().sum() + 0.5 * d * D * math.log(lam) - 0.5 * logdet)


def _vec(p: torch.Tensor) -> torch.Tensor:
    """vec stacking columns: [..., D, d] -> [..., D·d] with index i·D + k."""
    return p.transpose(-1, -2).reshape(*p.shape[:-2], -1)


@pytest.mark.parametrize("damping", DAMPINGS)
def test_dense_twin_and_embedding_variance(damping: str) -> None:
    f, w = _factors(), _weight()
    post = KronPosterior(f, w, prior_precision=0.7, hessian_scale=TAU, damping=damping)
    prec = _dense_precision(f, 0.7, TAU, damping)
    torch.testing.assert_close(post.precision_dense(), prec, rtol=1e-12, atol=1e-12)
    cov = torch.linalg.inv(prec)
    acts = torch.randn(6, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expected = torch.stack(
        [
            torch.diagonal(
                torch.kron(a[None, :], torch.eye(D, dtype=torch.float64))
                @ cov
                @ torch.kron(a[:, None], torch.eye(D, dtype=torch.float64))
            )
            for a in acts
        ]
    )  # (aᵀ ⊗ I) Λ⁻¹ (a ⊗ I)
    torch.testing.assert_close(post.embedding_variance(acts), expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(post.mean(acts), acts @ w.T, rtol=0, atol=0)
    # float32 in, float32 out, same values to float32 precision
    var32 = post.embedding_variance(acts.float())
    assert var32.dtype == torch.float32
    torch.testing.assert_close(var32.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("damping", DAMPINGS)
def test_log_marginal_likelihood_matches_dense(damping: str) -> None:
    f, w = _factors(), _weight()
    post = KronPosterior(f, w, 1.0, hessian_scale=TAU, damping=damping)
    for lam in (1e-3, 0.2, 1.0, 40.0):
        dense = _dense_log_evidence(f, w, lam, TAU, damping)
        assert post.log_marginal_likelihood(lam) == pytest.approx(dense, rel=1e-11, abs=1e-10)
    assert post.log_marginal_likelihood() == pytest.approx(
        _dense_log_evidence(f, w, 1.0, TAU, damping), rel=1e-11
    )


@pytest.mark.parametrize("damping", DAMPINGS)
def test_fit_matches_dense_grid_search(damping: str) -> None:
    f, w = _factors(), _weight()
    post = KronPosterior.fit(f, w, hessian_scale=TAU, damping=damping)
    grid = torch.linspace(-6, 6, 1201, dtype=torch.float64)  # log λ, spacing 0.01
    values = torch.tensor(
        [_dense_log_evidence(f, w, math.exp(t), TAU, damping) for t in grid.tolist()], dtype=torch.float64
    )
    best = int(values.argmax())
    assert 0 < best < len(grid) - 1  # an interior optimum
    assert abs(math.log(post.prior_precision) - float(grid[best])) <= 0.01
    assert _dense_log_evidence(f, w, post.prior_precision, TAU, damping) >= float(values.max()) - 1e-12
    assert post.damping is Damping(damping) and post.hessian_scale == TAU


@pytest.mark.parametrize("damping", DAMPINGS)
def test_sample_weights_covariance_monte_carlo(damping: str) -> None:
    f, w = _factors(), _weight()
    post = KronPosterior(f, w, 0.5, hessian_scale=TAU, damping=damping)
    k = 100_000
    draws = post.sample_weights(k, generator=torch.Generator().manual_seed(3))  # [k, D, d]
    assert draws.shape == (k, D, d) and draws.dtype == torch.float64
    cov = torch.linalg.inv(_dense_precision(f, 0.5, TAU, damping))  # [Dd, Dd]
    x = _vec(draws - w)  # [k, Dd]
    mean_se = (torch.diagonal(cov) / k).sqrt()
    assert bool((x.mean(0).abs() <= 5 * mean_se).all())
    emp = x.T @ x / k
    # standard error of an entry of the empirical covariance of a Gaussian: √((Σ_ii Σ_jj + Σ_ij²)/k)
    se = ((torch.outer(torch.diagonal(cov), torch.diagonal(cov)) + cov.square()) / k).sqrt()
    assert float(((emp - cov).abs() / se).max()) < 5.0
    torch.testing.assert_close(post.covariance_dense(), cov, rtol=1e-10, atol=1e-12)
    # the same generator state gives the same draws
    again = post.sample_weights(4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, draws[:4], rtol=0, atol=0)


@pytest.mark.parametrize("damping", DAMPINGS)
def test_update_equals_posterior_of_merged_factors(damping: str) -> None:
    f1, f2, w = _factors(0), _factors(1, n=8), _weight()
    post = KronPosterior(f1, w, 0.3, hessian_scale=TAU, damping=damping)
    updated = post.update(f2, weight=2.0)
    merged = KronFactors(f1.A + 2 * f2.A, f1.B + 2 * f2.B, f1.n + 16)
    ref = KronPosterior(merged, w, 0.3, hessian_scale=TAU, damping=damping)
    assert updated.prior_precision == 0.3 and updated.factors.n == 46
    torch.testing.assert_close(updated.precision_dense(), ref.precision_dense(), rtol=1e-13, atol=1e-13)
    acts = torch.randn(3, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert bool(
        (updated.embedding_variance(acts) < post.embedding_variance(acts)).all()
    )  # more data, less doubt


def test_no_data_posterior_is_the_prior() -> None:
    w = _weight()
    prior = KronPosterior(KronFactors.zeros(d, D), w, 4.0, damping="exact")
    torch.testing.assert_close(prior.covariance_dense(), torch.eye(d * D, dtype=torch.float64) / 4)
    acts = torch.ones(2, d, dtype=torch.float64)
    torch.testing.assert_close(
        prior.embedding_variance(acts), torch.full((2, D), d / 4.0, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="below the search bounds"):
        KronPosterior.fit(KronFactors.zeros(d, D), w)


def test_factor_merge_is_order_independent_and_matches_one_batch() -> None:
    g = torch.Generator().manual_seed(5)
    acts = torch.randn(20, d, generator=g, dtype=torch.float64)
    ggns = [torch.randn(D, D, generator=g, dtype=torch.float64) for _ in range(3)]
    parts = [
        KronFactors.from_batch(acts[i * 7 : (i + 1) * 7], ggns[i], meta={"model": "m"}) for i in range(3)
    ]
    a = (parts[0] + parts[1]) + parts[2]
    b = parts[2] + (parts[1] + parts[0])
    c = KronFactors.zeros(d, D) + parts[1] + parts[2] + parts[0]
    whole = KronFactors.from_batch(acts, sum(ggns[1:], ggns[0]))
    for x in (a, b, c):
        torch.testing.assert_close(x.A, whole.A, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(x.B, whole.B, rtol=1e-13, atol=1e-13)
        assert x.n == 20 and x.meta == {"model": "m"}
    half = parts[0].scaled(0.5)
    torch.testing.assert_close(half.A, parts[0].A / 2, rtol=0, atol=0)
    assert half.n == 3.5


def test_merge_rejects_incompatible_factors() -> None:
    f = _factors(meta={"model": "tiny", "tower": "image", "likelihood": "infonce"})
    with pytest.raises(ValueError, match="tower: 'image' vs 'text'"):
        f + _factors(meta={"tower": "text"})
    with pytest.raises(ValueError, match="cannot merge factors of shapes"):
        f + KronFactors.zeros(d + 1, D)
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        f.scaled(-1)


@pytest.mark.parametrize("damping", DAMPINGS)
def test_precision_quadratic_matches_the_dense_kronecker_form(damping: str) -> None:
    """`vec(Δ)ᵀ Λ vec(Δ)` without the Kronecker product, against the explicit matrix (float64, 1e-12)."""
    f = _factors()
    post = KronPosterior(f, _weight(), prior_precision=0.7, hessian_scale=TAU, damping=damping)
    deltas = torch.randn(3, D, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    prec = _dense_precision(f, 0.7, TAU, damping)
    expected = torch.stack([_vec(x) @ prec @ _vec(x) for x in deltas])
    torch.testing.assert_close(post.precision_quadratic(deltas), expected, rtol=1e-12, atol=1e-12)
    # its gradient is 2 Λ vec(Δ), as the re-fit objective needs
    delta = deltas[0].clone().requires_grad_(True)
    post.precision_quadratic(delta).backward()
    torch.testing.assert_close(_vec(delta.grad), 2 * prec @ _vec(deltas[0]), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"weight offset has shape \[5, 4\]"):
        post.precision_quadratic(deltas[0].T)


def test_posterior_rejects_bad_input() -> None:
    f = _factors()
    with pytest.raises(ValueError, match=r"projection has shape \[5, 4\]"):
        KronPosterior(f, _weight().T, 1.0)
    with pytest.raises(ValueError, match="prior_precision must be finite and > 0"):
        KronPosterior(f, _weight(), 0.0)
    with pytest.raises(ValueError, match="unknown damping 'full'"):
        KronPosterior(f, _weight(), 1.0, damping="full")
    with pytest.raises(ValueError, match=r"expects \[N, 5\]"):
        KronPosterior(f, _weight(), 1.0).embedding_variance(torch.ones(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("damping", DAMPINGS)
def test_sample_weights_do_not_depend_on_eigenvector_signs(damping: str) -> None:
    """Negating eigenvectors is an equally valid eigh result; with a fixed seed the draws must not change.

    Greedy batch selection reuses one seed across posterior updates and relies on this.
    """
    from dataclasses import replace

    f, w = _factors(), _weight()
    post = KronPosterior(f, w, prior_precision=0.7, hessian_scale=TAU, damping=damping)
    e = post._eig
    flip_u = torch.where(torch.arange(d) % 2 == 0, -1.0, 1.0).to(torch.float64)
    flip_v = torch.where(torch.arange(D) % 3 == 0, -1.0, 1.0).to(torch.float64)
    flipped = KronPosterior(f, w, 0.7, TAU, damping, _eigen=replace(e, U=e.U * flip_u, V=e.V * flip_v))
    a = post.sample_weights(16, torch.Generator().manual_seed(5))
    b = flipped.sample_weights(16, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- factored draws and low-rank conditioning -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("damping", DAMPINGS)
def test_factored_draws_equal_sample_weights(damping: str, dtype: torch.dtype) -> None:
    """`draws(noise(k, g))` is the draw `sample_weights(k, g)` makes, applied without forming it."""
    f, w = _factors(), _weight().to(dtype)
    post = KronPosterior(f, w, prior_precision=0.7, hessian_scale=TAU, damping=damping)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    weights = post.sample_weights(6, torch.Generator().manual_seed(4))  # [6, D, d]
    noise = post.noise(6, torch.Generator().manual_seed(4))
    assert noise.dtype == dtype and noise.shape == (6, D, d)
    draws = post.draws(noise)
    assert draws.k == 6
    torch.testing.assert_close(draws.weights(), weights, **tol)
    g = torch.Generator().manual_seed(5)
    acts = torch.randn(9, d, generator=g, dtype=dtype)
    offset = torch.randn(9, D, generator=g, dtype=dtype)
    expected = torch.einsum("nd,kDd->nkD", acts, weights) + offset[:, None, :]  # [N, k, D]
    torch.testing.assert_close(draws.embeddings(acts, offset), expected, **tol)
    vectors = torch.randn(6, 3, D, generator=g, dtype=dtype)
    torch.testing.assert_close(draws.adjoint(vectors), vectors @ weights, **tol)  # P_kᵀ v   [k, M, d]
    with pytest.raises(ValueError, match=r"noise has shape \[6, 5, 4\]"):
        post.draws(noise.transpose(1, 2))


@pytest.mark.parametrize("max_rank", [0, 2, 100])  # eigh for both; eigen-update of A; of both
@pytest.mark.parametrize("damping", DAMPINGS)
def test_update_low_rank_equals_update(damping: str, max_rank: int) -> None:
    """The low-rank route (eigen-updates when rank ≤ max_rank, else eigh) gives the posterior of `update`."""
    post = KronPosterior(_factors(), _weight(), prior_precision=0.3, hessian_scale=TAU, damping=damping)
    g = torch.Generator().manual_seed(7)
    acts = torch.randn(2, d, generator=g, dtype=torch.float64)
    root = torch.randn(D, 3, generator=g, dtype=torch.float64)
    fast = post.update_low_rank(acts, root, weight=0.5, max_update_rank=max_rank)
    ref = post.update(KronFactors(acts.T @ acts, root @ root.T, 2.0), weight=0.5)
    assert fast.factors.n == ref.factors.n == N + 1
    torch.testing.assert_close(fast.factors.A, ref.factors.A, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(fast.factors.B, ref.factors.B, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(fast.precision_dense(), ref.precision_dense(), rtol=1e-12, atol=1e-12)
    probe = torch.randn(5, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        fast.embedding_variance(probe), ref.embedding_variance(probe), rtol=1e-10, atol=1e-13
    )
    torch.testing.assert_close(
        fast.sample_weights(8, torch.Generator().manual_seed(1)),
        ref.sample_weights(8, torch.Generator().manual_seed(1)),
        rtol=1e-10,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match=r"ggn_root has shape \[3, 4\]"):
        post.update_low_rank(acts, root.T)
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        post.update_low_rank(acts, root, weight=-1.0)


# ---- powers of the precision from the one eigendecomposition ----------------------------------------------


def _dense_power(matrix: torch.Tensor, exponent: float) -> torch.Tensor:
    """`M^p` of a symmetric positive definite matrix by eigh of the dense matrix itself (float64)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.pow(exponent)) @ vectors.T


def _rel(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest entry error relative to the reference's largest entry."""
    return float((x - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("exponent", [-0.5, -1.0, 0.5, 1.0])
@pytest.mark.parametrize("damping", DAMPINGS)
def test_precision_power_matches_the_dense_matrix_power(damping: str, exponent: float) -> None:
    """`precision_power(p)` is `Λ^p` of the explicit torch.kron precision to 1e-12 relative (float64).

    Relative: the largest entry error over the largest entry of the dense twin; measured errors are ~3e-15.
    """
    f, w = _factors(), _weight()
    post = KronPosterior(f, w, prior_precision=0.7, hessian_scale=TAU, damping=damping)
    dense = _dense_power(_dense_precision(f, 0.7, TAU, damping), exponent)  # [Dd, Dd]
    power = post.precision_power(exponent)
    assert power.S.shape == (D, d) and power.S.dtype == torch.float64
    assert _rel(power.to_matrix(), dense) < 1e-12
    z = torch.randn(3, D, d, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert _rel(_vec(power(z)), _vec(z) @ dense.T) < 1e-12  # the operator is the dense matrix
    if damping == "paper":  # Λ^p = A'^p ⊗ B'^p: powers of the damped factors
        a_d = math.sqrt(TAU / N) * f.A + math.sqrt(0.7) * torch.eye(d, dtype=torch.float64)
        b_d = math.sqrt(TAU / N) * f.B + math.sqrt(0.7) * torch.eye(D, dtype=torch.float64)
        twin = torch.kron(_dense_power(a_d, exponent), _dense_power(b_d, exponent))
        assert _rel(power.to_matrix(), twin) < 1e-12
    with pytest.raises(ValueError, match=r"matrix has shape \[3, 5, 4\], expected \[\.\.\., 4, 5\]"):
        power(z.transpose(1, 2))


@pytest.mark.parametrize("damping", DAMPINGS)
def test_powers_and_moves_reuse_the_cached_eigendecomposition(
    damping: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once built, a posterior never calls eigh again to give its powers or to move to a dtype/device."""
    f, w = _factors(), _weight()
    post = KronPosterior(f, w, prior_precision=0.7, hessian_scale=TAU, damping=damping)
    calls = []
    eigh = torch.linalg.eigh

    def counting(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(matrix.shape)
        return eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    root = post.precision_power(-0.5)
    moved = post.to(torch.float32, "cpu")
    back = moved.to(torch.float64)
    assert calls == []
    assert moved.weight.dtype == moved.factors.A.dtype == moved.factors.B.dtype == torch.float32
    for m in (moved, back):  # the same decomposition, bit for bit, still float64
        assert m._eig.U.dtype == torch.float64
        for name in ("U", "alpha", "V", "beta"):
            assert torch.equal(getattr(m._eig, name), getattr(post._eig, name))
        assert torch.equal(m.precision_power(-0.5).S, root.S)
    acts = torch.randn(4, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(back.embedding_variance(acts), post.embedding_variance(acts))
    assert torch.equal(back.weight, post.weight.float().double()) and back.factors.n == post.factors.n
    assert calls == []
