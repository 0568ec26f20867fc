"""The fast GGN sums against per-sample GGNs built from autograd Jacobians (MATH §1)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from pipeline.bayes import curvature
from pipeline.bayes.curvature import Likelihood, ggn, infonce_ggn, siglip_ggn

SCALE, BIAS = 7.5, -3.0


def _data(b: int = 11, c: int = 9, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sources = torch.randn(b, d, generator=g, dtype=torch.float64) * 2.0  # unnormalised, norms far from 1
    targets = torch.randn(c, d, generator=g, dtype=torch.float64) * 0.5
    return sources, targets


def _logits_fn(targets: torch.Tensor, scale: float, bias: float):
    y_hat = targets / targets.norm(dim=1, keepdim=True)
    return lambda x: scale * (y_hat @ (x / x.norm())) + bias  # [C]


def _dense_infonce(sources: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """Σ_b J_zᵀ (diag p − p pᵀ) J_z with J_z the autograd Jacobian of the logits w.r.t. x_b."""
    f = _logits_fn(targets, scale, 0.0)
    total = torch.zeros(sources.shape[1], sources.shape[1], dtype=torch.float64)
    for x in sources:
        jz = jacobian(f, x)  # [C, D]
        p = torch.softmax(f(x), dim=0)
        total += jz.T @ (torch.diag(p) - torch.outer(p, p)) @ jz
    return total


def _dense_siglip(sources: torch.Tensor, targets: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    f = _logits_fn(targets, scale, bias)
    total = torch.zeros(sources.shape[1], sources.shape[1], dtype=torch.float64)
    for x in sources:
        jz = jacobian(f, x)  # [C, D]
        s = torch.sigmoid(f(x))
        total += jz.T @ torch.diag(s * (1 - s)) @ jz
    return total


def _fisher_infonce(sources: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """Second twin: the label-free GGN of softmax CE equals the Fisher E_{y~p}[∇ℓ_y ∇ℓ_yᵀ]."""
    f = _logits_fn(targets, scale, 0.0)
    total = torch.zeros(sources.shape[1], sources.shape[1], dtype=torch.float64)
    for x in sources:
        grads = jacobian(lambda v: torch.log_softmax(f(v), dim=0), x)  # row y: ∇ log p_y   [C, D]
        p = torch.softmax(f(x), dim=0)
        total += grads.T @ (p[:, None] * grads)
    return total


def test_infonce_matches_autograd() -> None:
    sources, targets = _data()
    fast = infonce_ggn(sources, targets, SCALE)
    torch.testing.assert_close(fast, _dense_infonce(sources, targets, SCALE), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast, _fisher_infonce(sources, targets, SCALE), rtol=1e-10, atol=1e-12)


def test_siglip_matches_autograd() -> None:
    sources, targets = _data(seed=1)
    fast = siglip_ggn(sources, targets, SCALE, BIAS)
    torch.testing.assert_close(fast, _dense_siglip(sources, targets, SCALE, BIAS), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["infonce", "siglip"])
@pytest.mark.parametrize("chunk_size", [1, 2, 4, 5])
@pytest.mark.parametrize("cache", [True, False])
def test_chunking_does_not_change_the_result(
    likelihood: str, chunk_size: int, cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources, targets = _data(b=13, c=11, seed=2)
    whole = ggn(likelihood, sources, targets, SCALE, BIAS, chunk_size=10_000)
    if not cache:  # recompute the logits in the softmax's second pass instead of keeping them
        monkeypatch.setattr(curvature, "_CACHE_ELEMENTS", 0)
    chunked = ggn(likelihood, sources, targets, SCALE, BIAS, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, whole, rtol=1e-11, atol=1e-13)


def test_sum_is_additive_over_sources_and_label_free_symmetric_psd() -> None:
    sources, targets = _data(b=12, seed=3)
    full = infonce_ggn(sources, targets, SCALE)
    parts = infonce_ggn(sources[:5], targets, SCALE) + infonce_ggn(sources[5:], targets, SCALE)
    torch.testing.assert_close(full, parts, rtol=1e-12, atol=1e-13)
    assert torch.equal(full, full.T)
    assert torch.linalg.eigvalsh(full).min() > -1e-10
    # The normalisation's Jacobian kills the radial direction: G x_b = 0 for a single source.
    one = infonce_ggn(sources[:1], targets, SCALE)
    torch.testing.assert_close(one @ sources[0], torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_float32_with_float64_accumulation() -> None:
    sources, targets = _data(b=40, c=30, d=8, seed=4)
    ref = infonce_ggn(sources, targets, SCALE)
    out = infonce_ggn(sources.float(), targets.float(), SCALE, chunk_size=7, accumulate_dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert infonce_ggn(sources.float(), targets.float(), SCALE).dtype == torch.float32


def test_dispatcher_and_errors() -> None:
    sources, targets = _data(seed=5)
    torch.testing.assert_close(
        ggn(Likelihood.SIGLIP, sources, targets, SCALE, BIAS), siglip_ggn(sources, targets, SCALE, BIAS)
    )
    torch.testing.assert_close(ggn("infonce", sources, targets, SCALE), infonce_ggn(sources, targets, SCALE))
    with pytest.raises(ValueError, match="unknown likelihood 'hinge'"):
        ggn("hinge", sources, targets, SCALE)
    with pytest.raises(ValueError, match="dimension 6 but targets have 5"):
        infonce_ggn(sources, targets[:, :5], SCALE)
    zero = sources.clone()
    zero[3] = 0
    with pytest.raises(ValueError, match="source row 3 has zero norm"):
        infonce_ggn(zero, targets, SCALE)
    empty = infonce_ggn(sources[:0], targets, SCALE)
    assert torch.equal(empty, torch.zeros(6, 6, dtype=torch.float64))
