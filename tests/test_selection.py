"""`choose` on a small float64 problem against direct computations: the kNN candidates by brute-force
2-Wasserstein distances, the top entropies of the probit predictive, the plain greedy loop, and a power
sample with a huge beta, which is the top scores."""

from __future__ import annotations

import pytest
import torch

from pipeline.bayes.acquisition import select_batch_reference
from pipeline.bayes.head import Activations, BayesHead
from pipeline.bayes.metrics import entropy
from pipeline.selection import EmbeddingSet, SelectionSettings, choose
from tests.bayes.test_acquisition import small_head, small_world

CLASSES = ["a", "b", "c", "d"]
EXACT = {"precision": "float64", "norm": "exact"}
Problem = tuple[BayesHead, Activations, EmbeddingSet, EmbeddingSet]


@pytest.fixture(scope="module")
def problem() -> Problem:
    """(head, text rows, pool, targets): 40 pool rows and 12 targets with offsets, as embed writes them."""
    head, world = small_head("exact"), small_world(offsets=True)

    def rows(name: str) -> EmbeddingSet:
        acts, offsets = world[f"{name}_acts"], world[f"{name}_offsets"]
        assert acts is not None and offsets is not None
        mean, var = head.image_embeddings(acts, offsets)
        ids = [f"{name}-{i:02d}" for i in range(len(acts))]
        return EmbeddingSet(ids, mean, var, acts, {}, offsets=offsets)

    text = Activations(world["text_acts"], world["text_offset"])  # type: ignore[arg-type]
    return head, text, rows("pool"), rows("target")


def _probit(head: BayesHead, text: Activations, pool: EmbeddingSet) -> torch.Tensor:
    return head.logits(pool.acts, text.acts, image_offset=pool.offsets, text_offset=text.offsets).probit()


def test_top_k_entropy_picks_the_most_uncertain_rows_and_shows_their_prediction(problem: Problem) -> None:
    head, text, pool, _ = problem
    settings = SelectionSettings(budget=5, method="entropy", batch="top-k", **EXACT)
    choice = choose(head, text, CLASSES, pool, settings)

    probs = _probit(head, text, pool)  # [40, C]
    h = entropy(probs)
    top = torch.argsort(h, descending=True)[:5].tolist()
    assert [p.sample_id for p in choice.picks] == [pool.sample_ids[i] for i in top]
    assert [p.rank for p in choice.picks] == list(range(5)) and choice.candidates == 40
    for pick, i in zip(choice.picks, top, strict=True):
        assert pick.score == pytest.approx(float(h[i]), rel=1e-10) and pick.entropy == pytest.approx(
            float(h[i])
        )
        assert pick.predicted == CLASSES[int(probs[i].argmax())]
        assert pick.confidence == pytest.approx(float(probs[i].max()))


def test_targets_narrow_the_pool_to_each_targets_nearest_rows(problem: Problem) -> None:
    head, text, pool, targets = problem
    settings = SelectionSettings(budget=4, method="entropy", batch="top-k", neighbours=3, **EXACT)
    choice = choose(head, text, CLASSES, pool, settings, targets=targets)

    # Squared 2-Wasserstein distance of diagonal Gaussians, every target against every pool row.
    w2 = torch.cdist(targets.mean, pool.mean) ** 2 + torch.cdist(targets.var.sqrt(), pool.var.sqrt()) ** 2
    near = sorted({int(i) for row in w2.argsort(dim=1)[:, :3] for i in row})  # [12, 3] -> the union
    assert choice.candidates == len(near) < 40
    h = entropy(_probit(head, text, pool))
    best = sorted(near, key=lambda i: -float(h[i]))[:4]  # the top entropies among the candidates only
    assert [p.sample_id for p in choice.picks] == [pool.sample_ids[i] for i in best]


@pytest.mark.parametrize("method", ["epig", "bald"])
def test_a_greedy_batch_is_the_plain_conditioning_loop(problem: Problem, method: str) -> None:
    head, text, pool, targets = problem
    settings = SelectionSettings(budget=6, method=method, batch="greedy", whole_pool=True, draws=16, seed=3)
    choice = choose(head, text, CLASSES, pool, settings, targets=targets)

    plain = select_batch_reference(
        head, pool.acts, text.acts, 6, method=method, target_acts=targets.acts, k=16,
        generator=torch.Generator().manual_seed(3), pool_offsets=pool.offsets, text_offset=text.offsets,
        target_offsets=targets.offsets,
    )  # fmt: skip
    assert [p.sample_id for p in choice.picks] == [pool.sample_ids[i] for i in plain.indices]
    assert [p.score for p in choice.picks] == pytest.approx(plain.scores, rel=1e-10)
    assert len(set(plain.indices)) == 6


def test_a_power_sample_with_a_huge_beta_is_the_top_scores_and_random_scores_nothing(
    problem: Problem,
) -> None:
    head, text, pool, _ = problem
    power = SelectionSettings(budget=5, method="entropy", batch="stochastic", beta=1e6, **EXACT)
    top = SelectionSettings(budget=5, method="entropy", batch="top-k", **EXACT)
    picked = [p.sample_id for p in choose(head, text, CLASSES, pool, power).picks]
    assert picked == [p.sample_id for p in choose(head, text, CLASSES, pool, top).picks]

    random = SelectionSettings(budget=5, method="random")
    a = choose(head, text, CLASSES, pool, random, seed=1)
    assert a.picks == choose(head, text, CLASSES, pool, random.model_copy(update={"seed": 1})).picks
    assert all(p.score == 0.0 for p in a.picks) and len({p.sample_id for p in a.picks}) == 5
    assert [p.sample_id for p in choose(head, text, CLASSES, pool, random, seed=2).picks] != [
        p.sample_id for p in a.picks
    ]


def test_an_empty_pool_and_contradicting_settings_are_refused(problem: Problem) -> None:
    head, text, pool, _ = problem
    with pytest.raises(ValueError, match="the pool is empty"):
        choose(head, text, CLASSES, pool.take(torch.tensor([], dtype=torch.long)), SelectionSettings())
    greedy = SelectionSettings(budget=3, method="bald", batch="greedy", dedupe_cosine=0.9)
    with pytest.raises(ValueError, match="--dedupe-cosine needs --batch stochastic or top-k"):
        choose(head, text, CLASSES, pool, greedy)
