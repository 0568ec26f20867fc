"""The online Laplace step (MATH §9) against dense twins: explicit torch.kron precisions, per-row loops,
autograd Jacobians; both dampings, both likelihoods, float64."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch.autograd.functional import jacobian

from pipeline.bayes.curvature import infonce_ggn
from pipeline.bayes.kron import KronFactors, KronPosterior
from pipeline.bayes.online import (
    Whitening,
    data_nll,
    labelled_factors,
    prior_penalty,
    refit_loss,
    updated_posterior,
)
from tests.bayes.test_purity import FORBIDDEN

d, D, C, N_PRE, N = 6, 5, 4, 50, 40
SCALE, BIAS, TAU = 7.0, -1.5, 2.0
DAMPINGS = ["paper", "exact"]
F64 = torch.float64


def _prior(damping: str, lam: float = 0.6, seed: int = 0, meta: dict | None = None) -> KronPosterior:
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(N_PRE, d, generator=g, dtype=F64)
    acts[:, -1] = 1.0
    emb = torch.randn(N_PRE, D, generator=g, dtype=F64)
    factors = KronFactors.from_batch(acts, infonce_ggn(emb, emb[:16], SCALE), meta=meta)
    weight = torch.randn(D, d, generator=g, dtype=F64)
    return KronPosterior(factors, weight, lam, hessian_scale=TAU, damping=damping)


def _rows(seed: int = 1, n: int = N) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(acts [n, d], labels [n], offsets [n, D], text_mean [C, D])."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, d, generator=g, dtype=F64)
    acts[:, -1] = 1.0
    labels = torch.randint(0, C, (n,), generator=g)
    offsets = 0.3 * torch.randn(n, D, generator=g, dtype=F64)
    text = torch.randn(C, D, generator=g, dtype=F64) * 2.0  # unnormalised: the loss normalises
    return acts, labels, offsets, text


def _dense_precision(post: KronPosterior) -> torch.Tensor:
    """MATH §3 written out with torch.kron, independently of KronPosterior."""
    f, lam, tau = post.factors, post.prior_precision, post.hessian_scale
    if post.damping.value == "exact":
        return tau * torch.kron(f.A, f.B) / f.n + lam * torch.eye(d * D, dtype=F64)
    a = math.sqrt(tau / f.n) * f.A + math.sqrt(lam) * torch.eye(d, dtype=F64)
    b = math.sqrt(tau / f.n) * f.B + math.sqrt(lam) * torch.eye(D, dtype=F64)
    return torch.kron(a, b)


def _vec(p: torch.Tensor) -> torch.Tensor:
    """vec stacking columns: [D, d] -> [D·d], index i·D + k."""
    return p.T.reshape(-1)


def _dense_loss(weight, post, acts, labels, offsets, text) -> torch.Tensor:
    """Per-row loop of CE(s·cos(P a_i + o_i, h_c) + b, y_i) plus ½ vec(Δ)ᵀ Λ vec(Δ) with a dense Λ."""
    total = torch.zeros((), dtype=F64)
    for a, y, o in zip(acts, labels, offsets, strict=True):
        g = weight @ a + o
        z = torch.stack([SCALE * (g @ h) / (g.norm() * h.norm()) + BIAS for h in text])  # [C]
        total = total + torch.logsumexp(z, dim=0) - z[y]
    delta = _vec(weight - post.weight)
    return total + 0.5 * delta @ _dense_precision(post) @ delta


@pytest.mark.parametrize("damping", DAMPINGS)
def test_refit_loss_and_gradient_match_the_dense_twin(damping: str) -> None:
    post = _prior(damping)
    acts, labels, offsets, text = _rows()
    g = torch.Generator().manual_seed(5)
    weight = (post.weight + 0.3 * torch.randn(D, d, generator=g, dtype=F64)).requires_grad_(True)

    fast = refit_loss(weight, post, text, acts, labels, SCALE, BIAS, offsets)
    (grad_fast,) = torch.autograd.grad(fast, weight)
    dense = _dense_loss(weight, post, acts, labels, offsets, text)
    (grad_dense,) = torch.autograd.grad(dense, weight)

    torch.testing.assert_close(fast, dense, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_fast, grad_dense, rtol=1e-10, atol=1e-11)
    # the two terms separately
    delta = _vec(weight.detach() - post.weight)
    torch.testing.assert_close(
        prior_penalty(weight.detach(), post), 0.5 * delta @ _dense_precision(post) @ delta, rtol=1e-12, atol=0
    )
    w = weight.detach()
    torch.testing.assert_close(
        data_nll(w, text, acts, labels, SCALE, BIAS, offsets) + prior_penalty(w, post),
        fast.detach(),
        rtol=1e-14,
        atol=0,
    )


def test_data_nll_without_offsets_and_on_no_rows() -> None:
    post = _prior("paper")
    acts, labels, _, text = _rows()
    zero = torch.zeros(acts.shape[0], D, dtype=F64)
    torch.testing.assert_close(
        data_nll(post.weight, text, acts, labels, SCALE, BIAS),
        data_nll(post.weight, text, acts, labels, SCALE, BIAS, zero),
        rtol=1e-15,
        atol=0,
    )
    weight = post.weight.clone().requires_grad_(True)
    empty = data_nll(weight, text, acts[:0], labels[:0], SCALE, BIAS)
    (grad,) = torch.autograd.grad(empty, weight)
    assert float(empty.detach()) == 0.0
    assert bool((grad == 0).all())
    # at P̂ the prior term vanishes: the loss is the data term alone
    torch.testing.assert_close(
        refit_loss(post.weight, post, text, acts, labels, SCALE, BIAS),
        data_nll(post.weight, text, acts, labels, SCALE, BIAS),
        rtol=0,
        atol=0,
    )


def test_bad_inputs_are_named() -> None:
    post = _prior("paper")
    acts, labels, offsets, text = _rows()
    w = post.weight
    bad = labels.clone()
    bad[7] = C
    with pytest.raises(ValueError, match=r"label 4 at row 7 is outside \[0, 4\)"):
        refit_loss(w, post, text, acts, bad, SCALE)
    bad[7] = -1
    with pytest.raises(ValueError, match=r"label -1 at row 7"):
        data_nll(w, text, acts, bad, SCALE)
    with pytest.raises(ValueError, match=r"activations have shape \[40, 5\].*\[n, 6\]"):
        refit_loss(w, post, text, acts[:, :5], labels, SCALE)
    with pytest.raises(ValueError, match=r"labels have shape \[39\], expected \[40\]"):
        data_nll(w, text, acts, labels[:39], SCALE)
    with pytest.raises(ValueError, match=r"labels must be integer class indices, got dtype torch.float64"):
        data_nll(w, text, acts, labels.double(), SCALE)
    with pytest.raises(ValueError, match=r"offsets have shape \[40, 4\], expected \[40, 5\]"):
        data_nll(w, text, acts, labels, SCALE, offsets=offsets[:, :4])
    with pytest.raises(ValueError, match=r"text_mean has embedding dimension 3 but the projection maps to 5"):
        data_nll(w, text[:, :3], acts, labels, SCALE)
    with pytest.raises(ValueError, match=r"projection has shape \[5, 5\] but the posterior is over \[5, 6\]"):
        prior_penalty(w[:, :5], post)


@pytest.mark.parametrize("damping", DAMPINGS)
def test_whitening_is_the_symmetric_root_of_the_covariance(damping: str) -> None:
    post = _prior(damping)
    root = Whitening.of(post)
    basis = torch.eye(D * d, dtype=F64).reshape(D * d, d, D).transpose(1, 2)  # e_m as [D, d], vec(e_m) = m
    T = torch.stack([_vec(root(e)) for e in basis], dim=1)  # [Dd, Dd], column m = vec(root(e_m))
    torch.testing.assert_close(T, T.T, rtol=0, atol=1e-13)
    eye = torch.eye(D * d, dtype=F64)
    torch.testing.assert_close(T @ _dense_precision(post) @ T, eye, rtol=0, atol=1e-10)
    z = torch.randn(D, d, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(
        prior_penalty(post.weight + root(z), post), 0.5 * z.square().sum(), rtol=1e-11, atol=0
    )
    with pytest.raises(ValueError, match=r"whitened offset has shape \[6, 5\], expected \[\.\.\., 5, 6\]"):
        root(z.T)


def _whitening_before(post: KronPosterior) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, V, S) as `Whitening.of` computed them before it asked the posterior: its own eigh and damping."""
    f = post.factors
    alpha, U = torch.linalg.eigh(((f.A + f.A.T) / 2).to(F64))
    beta, V = torch.linalg.eigh(((f.B + f.B.T) / 2).to(F64))
    alpha, beta = alpha.clamp_min(0), beta.clamp_min(0)
    data_scale, lam = post.hessian_scale / f.n, post.prior_precision
    if post.damping.value == "exact":
        return U, V, (data_scale * beta[:, None] * alpha[None, :] + lam).rsqrt()
    root, sq = math.sqrt(data_scale), math.sqrt(lam)
    return U, V, (root * beta + sq).rsqrt()[:, None] * (root * alpha + sq).rsqrt()[None, :]


@pytest.mark.parametrize("damping", DAMPINGS)
def test_whitening_is_the_posterior_root_as_before_without_eigh(
    damping: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Whitening.of` reads the posterior's cached decomposition (no eigh) and whitens as it did before.

    paper: bit for bit. exact: `S` to 2 ulp, rtol 5e-16 (the eigenvalue grid is `(τ/N · α_i) · β_j`,
    formerly `(τ/N · β_j) · α_i`), so whitened matrices agree to 1e-15 relative to their largest entry.
    """
    post = _prior(damping)
    U, V, S = _whitening_before(post)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(m) or eigh(m))
    root = Whitening.of(post)
    assert calls == [] and isinstance(root, Whitening) and isinstance(root.to(F64), Whitening)
    assert torch.equal(root.U, U) and torch.equal(root.V, V)
    z = torch.randn(3, D, d, generator=torch.Generator().manual_seed(4), dtype=F64)
    before = V @ (S * (V.T @ z @ U)) @ U.T
    if damping == "paper":
        assert torch.equal(root.S, S) and torch.equal(root(z), before)
    else:
        torch.testing.assert_close(root.S, S, rtol=5e-16, atol=0)
        assert float((root(z) - before).abs().max() / before.abs().max()) < 1e-15


def _dense_ggn(emb: torch.Tensor, text: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Σ_i J_zᵀ H_z J_z, J_z the autograd Jacobian of z = s·cos(x, h_c) + b w.r.t. the embedding x."""
    t_hat = text / text.norm(dim=1, keepdim=True)
    bias = BIAS if likelihood == "siglip" else 0.0

    def logits(x: torch.Tensor) -> torch.Tensor:
        return SCALE * (t_hat @ (x / x.norm())) + bias  # [C]

    total = torch.zeros(D, D, dtype=F64)
    for x in emb:
        jz = jacobian(logits, x)  # [C, D]
        z = logits(x)
        if likelihood == "infonce":
            p = torch.softmax(z, dim=0)
            h = torch.diag(p) - torch.outer(p, p)
        else:
            h = torch.diag(torch.sigmoid(z) * torch.sigmoid(-z))
        total += jz.T @ h @ jz
    return total


@pytest.mark.parametrize("likelihood", ["infonce", "siglip"])
def test_labelled_factors_match_per_sample_dense_ggns(likelihood: str) -> None:
    post = _prior("paper")
    acts, _, offsets, text = _rows()
    weight = post.weight + 0.1
    lab = labelled_factors(weight, acts, text, likelihood, SCALE, BIAS, offsets, meta={"tower": "image"})
    emb = acts @ weight.T + offsets
    torch.testing.assert_close(lab.A, sum(torch.outer(a, a) for a in acts), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(lab.B, _dense_ggn(emb, text, likelihood), rtol=1e-10, atol=1e-12)
    assert lab.n == N
    assert lab.meta == {"tower": "image"}
    assert lab.A.dtype == lab.B.dtype == F64
    empty = labelled_factors(weight, acts[:0], text, likelihood, SCALE, BIAS)
    assert empty.n == 0 and bool((empty.A == 0).all()) and bool((empty.B == 0).all())
    with pytest.raises(ValueError, match=r"activations have shape \[40, 7\]"):
        labelled_factors(weight, torch.ones(N, 7, dtype=F64), text, likelihood, SCALE)


@pytest.mark.parametrize("damping", DAMPINGS)
def test_updated_posterior_merges_factors_around_the_new_map(damping: str) -> None:
    post = _prior(damping, meta={"tower": "image"})
    acts, _, _, text = _rows()
    new_map = post.weight + 0.05
    lab = labelled_factors(new_map, acts, text, "infonce", SCALE, meta={"tower": "image"})

    up = updated_posterior(post, new_map, lab, merge_weight=0.5)
    torch.testing.assert_close(up.factors.A, post.factors.A + 0.5 * lab.A, rtol=0, atol=0)
    torch.testing.assert_close(up.factors.B, post.factors.B + 0.5 * lab.B, rtol=0, atol=0)
    assert up.factors.n == post.factors.n + 0.5 * N
    assert torch.equal(up.weight, new_map)
    assert (up.prior_precision, up.hessian_scale, up.damping) == (
        post.prior_precision,
        post.hessian_scale,
        post.damping,
    )
    assert up.factors.meta == {"tower": "image"}

    refit = updated_posterior(post, new_map, lab, refit_prior_precision=True)
    expected = KronPosterior.fit(post.factors + lab, new_map, TAU, damping)
    assert refit.prior_precision == pytest.approx(expected.prior_precision, rel=1e-12)
    torch.testing.assert_close(refit.factors.A, post.factors.A + lab.A, rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"different tower: 'image' vs 'text'"):
        updated_posterior(post, new_map, KronFactors(lab.A, lab.B, lab.n, {"tower": "text"}))
    with pytest.raises(ValueError, match=r"projection has shape \[6, 5\]"):
        updated_posterior(post, new_map.T, lab)


def test_online_imports_no_io_or_ray() -> None:
    code = f"import sys, pipeline.bayes.online; print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
