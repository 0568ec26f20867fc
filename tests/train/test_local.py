"""refit_local: it reaches a stationary point of refit_loss, respects a dominant prior, and early-stops
on the held-back NLL returning the best held-back weights."""

from __future__ import annotations

import pytest
import torch

from pipeline.bayes.online import data_nll, refit_loss
from pipeline.train import RefitConfig, refit_local, split_holdout
from tests.train import problems

TOL_GRAD = 1e-9  # max |∂loss/∂P| at the returned MAP (loss values are O(10–100))


def _loss_and_grad(weight: torch.Tensor, prior, data) -> tuple[float, torch.Tensor]:
    _, text = problems.world()
    w = weight.clone().requires_grad_(True)
    loss = refit_loss(w, prior, text, data.acts, data.labels, problems.SCALE, 0.0, data.offsets)
    (grad,) = torch.autograd.grad(loss, w)
    return float(loss.detach()), grad


@pytest.mark.parametrize("damping", ["paper", "exact"])
def test_converges_to_a_stationary_point_below_the_start(damping: str) -> None:
    prior = problems.prior(damping=damping)
    data = problems.labelled(n=40, noise=0.2, offsets=True)
    cfg = RefitConfig(max_steps=3000, holdout=0.0, tolerance=1e-11, eval_every=10)
    result = refit_local(prior, problems.world()[1], problems.SCALE, 0.0, data, cfg)

    assert result.converged and not result.stopped_early
    assert result.steps_run < cfg.max_steps and result.best_step == result.steps_run
    assert result.weight.dtype == torch.float64 and tuple(result.weight.shape) == (problems.D, problems.d)
    start_loss, _ = _loss_and_grad(prior.weight, prior, data)
    end_loss, grad = _loss_and_grad(result.weight, prior, data)
    assert float(grad.abs().max()) < TOL_GRAD
    assert end_loss < start_loss - 1.0
    assert result.history[0]["step"] == 0 and result.history[0]["train_loss"] == pytest.approx(
        start_loss, rel=1e-13
    )
    assert result.history[-1]["train_loss"] == pytest.approx(end_loss, rel=1e-13)
    assert all(r["val_nll"] is None for r in result.history)


def test_a_dominant_prior_keeps_the_pretrained_weights() -> None:
    prior = problems.prior(prior_precision=1e12)
    data = problems.labelled(n=40, noise=0.5)
    text = problems.world()[1]
    cfg = RefitConfig(holdout=0.0, tolerance=1e-9)
    result = refit_local(prior, text, problems.SCALE, 0.0, data, cfg)
    assert result.converged
    # Λ ⪰ 1e12·I and the data gradient is O(10): the MAP moves by O(1e-11)
    torch.testing.assert_close(result.weight, prior.weight, rtol=0, atol=1e-10)
    # with held-back rows the held-back NLL does not move by min_delta: P̂ itself (step 0) is returned
    held_out = refit_local(prior, text, problems.SCALE, 0.0, data, RefitConfig(min_holdout=1))
    assert held_out.stopped_early and held_out.best_step == 0
    assert torch.equal(held_out.weight, prior.weight)


def test_early_stopping_returns_the_best_held_back_weights() -> None:
    # A weak prior (20 pretraining sources, λ = 0.01) and 30% random labels: the fit first improves the
    # held-back NLL, then over-fits the noise.
    prior = problems.prior(n_pretrain=20, prior_precision=1e-2, seed=2)
    data = problems.labelled(n=40, noise=0.3, seed=2)
    text = problems.world(2)[1]
    cfg = RefitConfig(max_steps=400, eval_every=5, patience=3, holdout=0.2, min_holdout=1)
    result = refit_local(prior, text, problems.SCALE, 0.0, data, cfg)

    assert result.stopped_early and result.steps_run < cfg.max_steps
    steps = [r["step"] for r in result.history]
    vals = [float(r["val_nll"]) for r in result.history]  # type: ignore[arg-type]
    at = steps.index(result.best_step)
    assert result.best_step > 0 and vals[at] == min(vals)
    assert len(vals) - 1 - at == cfg.patience  # stopped right after `patience` evaluations without a gain
    assert all(v > vals[at] - cfg.min_delta for v in vals[at + 1 :])
    _, held = split_holdout(data, cfg.holdout, cfg.seed, cfg.min_holdout)
    held_nll = data_nll(result.weight, text, held.acts, held.labels, problems.SCALE) / len(held)
    assert float(held_nll) == pytest.approx(vals[at], rel=1e-12)
    # the stopped run's weights are those of step best_step of an unstopped run
    longer = refit_local(prior, text, problems.SCALE, 0.0, data, cfg.model_copy(update={"patience": None}))
    assert longer.steps_run == cfg.max_steps and not longer.stopped_early
    assert [r["val_nll"] for r in longer.history[: len(vals)]] == vals


def test_no_early_stopping_below_ten_rows_and_bad_labels_fail_first() -> None:
    prior = problems.prior()
    data = problems.labelled(n=9)
    result = refit_local(prior, problems.world()[1], problems.SCALE, 0.0, data, RefitConfig(max_steps=20))
    assert result.steps_run == 20 and not result.stopped_early
    assert all(r["val_nll"] is None for r in result.history)
    bad = problems.labelled(n=12)
    bad.labels[3] = problems.C
    with pytest.raises(ValueError, match=r"label 4 at row 3 is outside \[0, 4\)"):
        refit_local(prior, problems.world()[1], problems.SCALE, 0.0, bad, RefitConfig())


@pytest.mark.parametrize("offsets", [False, True], ids=["clip", "offsets"])
@pytest.mark.parametrize("damping", ["paper", "exact"])
def test_the_loop_frame_evaluates_the_objective_without_forming_the_weight(
    damping: str, offsets: bool
) -> None:
    """EigenFrame's terms at Y equal refit_loss's at P = P̂ + V (S ⊙ Y) Uᵀ = P̂ + Λ^{-1/2}[V Y Uᵀ] (float64)."""
    from pipeline.bayes.online import Whitening, data_nll, prior_penalty
    from pipeline.train.loop import EigenFrame, Objective

    prior = problems.prior(damping=damping)
    data = problems.labelled(n=30, noise=0.2, offsets=offsets)
    text = problems.world()[1]
    frame = EigenFrame.of(Objective(prior, text, problems.SCALE, 0.3))
    y = 0.7 * torch.randn(
        problems.D, problems.d, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    weight = frame.weight(y)
    whiten = Whitening.of(prior)
    torch.testing.assert_close(
        weight, prior.weight + whiten(whiten.V @ y @ whiten.U.T), rtol=1e-12, atol=1e-13
    )
    rows = frame.rows(data)
    expected = data_nll(weight, text, data.acts, data.labels, problems.SCALE, 0.3, data.offsets)
    assert float(frame.data_term(y, rows)) == pytest.approx(float(expected), rel=1e-12)
    assert float(frame.prior_term(y)) == pytest.approx(float(prior_penalty(weight, prior)), rel=1e-10)


def test_the_written_out_adam_is_torch_adam() -> None:
    """Same moments, bias correction and step as `torch.optim.Adam` with its defaults (float64, exact)."""
    from pipeline.train.loop import Adam

    g = torch.Generator().manual_seed(3)
    ours = torch.randn(5, 4, generator=g, dtype=torch.float64)
    theirs = ours.clone().requires_grad_(True)
    adam, reference = Adam(ours), torch.optim.Adam([theirs], lr=0.1)
    for step in range(25):
        grad = torch.randn(5, 4, generator=g, dtype=torch.float64)
        lr = 0.1 * (1 - step / 30)
        adam.step(ours, grad, lr)
        reference.param_groups[0]["lr"] = lr
        theirs.grad = grad.clone()
        reference.step()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-14, atol=1e-15)


class _EighCounter:
    """Counts `torch.linalg.eigh` calls (monkeypatched) and passes them on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._eigh = torch.linalg.eigh
        monkeypatch.setattr(torch.linalg, "eigh", self)

    def __call__(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self._eigh(matrix)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_round_decomposes_only_its_new_posterior(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-fit moves the prior (`Objective.to`) and whitens with its cached eigendecomposition: no eigh.

    A round's update then costs the two eigh of its new posterior (new factors) and nothing else; before,
    `Whitening.of` re-ran both eigh and `Objective.to` rebuilt a prior that was not float64 (two more).
    """
    from pipeline.bayes.online import Whitening, labelled_factors, updated_posterior
    from pipeline.train.loop import EigenFrame, Objective

    prior = problems.prior(damping="exact").to(dtype)
    data = problems.labelled(n=30, noise=0.2, offsets=True)
    text = problems.world()[1]
    eigh = _EighCounter(monkeypatch)
    moved = Objective(prior, text, problems.SCALE, 0.0).to(torch.device("cpu"))
    frame = EigenFrame.of(moved)
    assert eigh.calls == 0
    assert moved.prior.weight.dtype == torch.float64 and moved.prior.factors.A.dtype == torch.float64
    assert (moved.prior is prior) == (dtype == torch.float64)
    expected = Whitening.of(prior)
    for name in ("U", "V", "S"):  # the prior's own decomposition, bit for bit
        assert torch.equal(getattr(frame.whiten, name), getattr(expected, name))

    result = refit_local(prior, text, problems.SCALE, 0.0, data, RefitConfig(max_steps=20))
    assert eigh.calls == 0
    extra = labelled_factors(result.weight, data.acts, text, "infonce", problems.SCALE, 0.0, data.offsets)
    updated_posterior(prior, result.weight.to(dtype), extra)
    assert eigh.calls == 2
