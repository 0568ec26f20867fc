"""ProbCosine against a per-element closed form and Monte Carlo; the predictive (MATH §5–6)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.bayes.cosine import ProbLogits, prob_cosine


def _moments(n: int, m: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mx = torch.randn(n, dim, generator=g, dtype=torch.float64)
    my = torch.randn(m, dim, generator=g, dtype=torch.float64)
    vx = torch.rand(n, dim, generator=g, dtype=torch.float64) * 0.5
    vy = torch.rand(m, dim, generator=g, dtype=torch.float64) * 0.5
    return mx, vx, my, vy


def test_prob_cosine_matches_closed_form_per_element() -> None:
    mx, vx, my, vy = _moments(3, 4, 5)
    mean, var = prob_cosine(mx, vx, my, vy)
    assert mean.shape == var.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            ex = sum(mx[i, k] ** 2 + vx[i, k] for k in range(5))
            ey = sum(my[j, k] ** 2 + vy[j, k] for k in range(5))
            num = sum(mx[i, k] * my[j, k] for k in range(5))
            v = sum(
                mx[i, k] ** 2 * vy[j, k] + vx[i, k] * my[j, k] ** 2 + vx[i, k] * vy[j, k] for k in range(5)
            )
            assert float(mean[i, j]) == pytest.approx(float(num / math.sqrt(ex * ey)), rel=1e-13, abs=1e-15)
            assert float(var[i, j]) == pytest.approx(float(v / (ex * ey)), rel=1e-13, abs=1e-15)


def test_prob_cosine_matches_monte_carlo_of_the_normalised_inner_product() -> None:
    """ProbCosine is the mean and variance of xᵀy / √(E‖x‖² E‖y‖²): check both by 200k draws (5 SE)."""
    mx, vx, my, vy = _moments(2, 2, 6, seed=1)
    mean, var = prob_cosine(mx, vx, my, vy)
    k = 200_000
    g = torch.Generator().manual_seed(2)
    x = mx[:, None] + vx.sqrt()[:, None] * torch.randn(2, k, 6, generator=g, dtype=torch.float64)  # [2, k, 6]
    y = my[:, None] + vy.sqrt()[:, None] * torch.randn(2, k, 6, generator=g, dtype=torch.float64)
    ex = (mx.square() + vx).sum(1)
    ey = (my.square() + vy).sum(1)
    for i in range(2):
        for j in range(2):
            z = (x[i] * y[j]).sum(1) / math.sqrt(ex[i] * ey[j])  # [k]
            mc_mean, dev2 = z.mean(), (z - z.mean()).square()
            assert abs(float(mc_mean - mean[i, j])) < 5 * float(z.std() / math.sqrt(k))
            assert abs(float(dev2.mean() - var[i, j])) < 5 * float(dev2.std() / math.sqrt(k))


def test_prob_cosine_without_variance_is_the_cosine() -> None:
    mx, _, my, _ = _moments(3, 4, 5, seed=3)
    mean, var = prob_cosine(mx, torch.zeros_like(mx), my, torch.zeros_like(my))
    cos = torch.nn.functional.normalize(mx, dim=1) @ torch.nn.functional.normalize(my, dim=1).T
    torch.testing.assert_close(mean, cos, rtol=1e-13, atol=1e-15)
    assert torch.equal(var, torch.zeros_like(var))
    with pytest.raises(ValueError, match="equal shapes"):
        prob_cosine(mx, torch.zeros(3, 4), my, torch.zeros_like(my))


def test_probit_and_map() -> None:
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    var = torch.rand(5, 7, generator=g, dtype=torch.float64) * 4
    logits = ProbLogits(mean, var)
    expected = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), dim=1)
    torch.testing.assert_close(logits.probit(), expected, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(logits.map_probs(), torch.softmax(mean, dim=1), rtol=0, atol=0)
    flat = ProbLogits(mean, torch.full_like(var, 2.0))  # equal variance: softened logits, higher entropy
    ent = lambda p: -(p * p.log()).sum(1)  # noqa: E731
    assert bool((ent(flat.probit()) > ent(flat.map_probs())).all())
    cos = ProbLogits.from_cosine(mean, var, scale=10.0, bias=-2.0)
    torch.testing.assert_close(cos.mean, 10 * mean - 2, rtol=0, atol=0)
    torch.testing.assert_close(cos.var, 100 * var, rtol=0, atol=0)


def test_sample_probs_draw_the_stated_gaussian_and_agree_with_probit() -> None:
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(3, 4, generator=g, dtype=torch.float64)
    var = torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.5
    k = 100_000
    probs = ProbLogits(mean, var).sample_probs(k, generator=torch.Generator().manual_seed(6))  # [N, k, C]
    assert probs.shape == (3, k, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, k, dtype=torch.float64), rtol=0, atol=1e-12)
    # log p_c − log p_0 = z_c − z_0 ~ N(mean_c − mean_0, var_c + var_0): moments within 5 SE
    diff = probs.log()[..., 1:] - probs.log()[..., :1]  # [N, k, C-1]
    m_want = mean[:, 1:] - mean[:, :1]
    v_want = var[:, 1:] + var[:, :1]
    assert float(((diff.mean(1) - m_want).abs() / (v_want / k).sqrt()).max()) < 5
    assert float(((diff.var(1) - v_want).abs() / (v_want * math.sqrt(2 / k))).max()) < 5
    # the probit approximation is close to the Monte Carlo predictive for moderate variance
    mc = probs.mean(1)
    assert float((mc - ProbLogits(mean, var).probit()).abs().max()) < 0.02
    # zero variance: every draw is the MAP
    zero = ProbLogits(mean, torch.zeros_like(var)).sample_probs(3)
    torch.testing.assert_close(zero, torch.softmax(mean, 1)[:, None].expand(3, 3, 4), rtol=0, atol=1e-15)
