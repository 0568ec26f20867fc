"""Row-by-row scoring against `score_pool`, the probit predictive and a dense expected-norm twin."""

from __future__ import annotations

import pytest
import torch

from pipeline.bayes.acquisition import score_pool
from pipeline.bayes.head import Activations
from pipeline.bayes.metrics import entropy
from pipeline.bayes.scoring import Norm, RowScorer
from tests.bayes.test_acquisition import small_head, small_world

TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64, same draws: only summation order differs


def _rows(world: dict, name: str) -> Activations:
    return Activations(world[f"{name}_acts"], world[f"{name}_offsets"])


@pytest.mark.parametrize("offsets", [False, True], ids=["clip", "offsets"])
@pytest.mark.parametrize("method", ["epig", "bald"])
@pytest.mark.parametrize("damping", ["paper", "exact"])
def test_exact_row_scores_are_score_pools_in_any_blocks(damping: str, method: str, offsets: bool) -> None:
    head, world = small_head(damping), small_world(offsets)
    text = Activations(world["text_acts"], world["text_offset"])
    targets = _rows(world, "target")
    scorer = RowScorer(head, text, method, targets=targets, draws=16, seed=7)
    expected = score_pool(
        head,
        world["pool_acts"],
        world["text_acts"],
        method=method,
        target_acts=world["target_acts"],
        k=16,
        seed=7,
        pool_offsets=world["pool_offsets"],
        text_offset=world["text_offset"],
        target_offsets=world["target_offsets"],
    )
    pool = _rows(world, "pool")
    whole = scorer(pool).scores
    torch.testing.assert_close(whole, expected, **TOL)
    blocks = torch.cat(
        [scorer(pool.take(torch.arange(lo, min(lo + 7, 40)))).scores for lo in range(0, 40, 7)]
    )
    torch.testing.assert_close(blocks, expected, **TOL)


def test_predictive_and_entropy_are_the_heads_probit() -> None:
    head, world = small_head("paper"), small_world(offsets=True)
    text = Activations(world["text_acts"], world["text_offset"])
    pool = _rows(world, "pool")
    probit = head.logits(pool.acts, text.acts, pool.offsets, text.offsets).probit()
    out = RowScorer(head, text, "entropy")(pool)
    torch.testing.assert_close(out.probs, probit, **TOL)
    torch.testing.assert_close(out.scores, entropy(probit), **TOL)
    assert torch.equal(RowScorer(head, text, "random")(pool).scores, torch.ones(40, dtype=torch.float64))


@pytest.mark.parametrize("damping", ["paper", "exact"])
def test_expected_norm_scores_match_their_dense_twin(damping: str) -> None:
    """Draw the weights in full and divide each draw's numerators by √E‖g‖² from the posterior moments."""
    head, world = small_head(damping), small_world(offsets=True)
    text = Activations(world["text_acts"], world["text_offset"])
    pool = _rows(world, "pool")
    scorer = RowScorer(head, text, "bald", draws=16, seed=3, norm=Norm.EXPECTED)
    gen = torch.Generator().manual_seed(3)
    P = head.image.sample_weights(16, gen)  # [K, D, d]
    Q = head.text.sample_weights(16, gen)  # [K, D, dt]
    t = torch.einsum("ct,kdt->kcd", text.acts, Q) + text.offsets[None]  # [K, C, D]
    t = t / t.norm(dim=-1, keepdim=True)
    g = torch.einsum("nd,kDd->nkD", pool.acts, P) + pool.offsets[:, None]  # [N, K, D]
    mean, var = head.image_embeddings(pool.acts, pool.offsets)
    norm = ((mean * mean).sum(1) + var.sum(1)).sqrt()  # [N]
    logits = head.scale * torch.einsum("nkD,kcD->nkc", g, t) / norm[:, None, None] + head.bias
    probs = torch.softmax(logits, dim=-1)  # [N, K, C]
    mean_p = probs.mean(1)
    expected = entropy(mean_p) - entropy(probs).mean(1)
    torch.testing.assert_close(scorer(pool).scores, expected, **TOL)
    assert scorer.drawn is not None and scorer.drawn.image is None  # nothing of size K·D·d is held


def test_expected_norm_tends_to_the_exact_one_as_the_posterior_narrows() -> None:
    """The draws' norms deviate from √E‖g‖² by O(σ), σ ~ λ^(-1/2): 100x the prior precision, 10x closer."""
    head, world = small_head("paper"), small_world(offsets=False)
    text, pool = Activations(world["text_acts"]), _rows(world, "pool")

    def gap(prior_precision: float) -> float:
        narrow = head.with_image(type(head.image)(head.image.factors, head.image.weight, prior_precision))
        exact = RowScorer(narrow, text, "bald", draws=8, seed=1)
        fast = RowScorer(narrow, text, "bald", draws=8, seed=1, norm="expected")
        return float((exact._draw_probs(pool) - fast._draw_probs(pool)).abs().max())

    wide, narrow = gap(1e2), gap(1e4)
    assert 0 < narrow < 0.2 * wide  # expected ratio 0.1; 0.2 leaves room for the O(σ²) terms


def test_epig_without_targets_and_unknown_methods_are_refused() -> None:
    head, world = small_head("paper"), small_world(offsets=False)
    text = Activations(world["text_acts"])
    with pytest.raises(ValueError, match="EPIG scores rows against a target set"):
        RowScorer(head, text, "epig")
    with pytest.raises(ValueError, match="cannot be scored row by row"):
        RowScorer(head, text, "epig-independent")
