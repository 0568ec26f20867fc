"""BayesHead: embeddings with offsets, ProbCosine logits and joint posterior draws (MATH §3, §5–7)."""

from __future__ import annotations

import pytest
import torch

from pipeline.bayes.cosine import ProbLogits, prob_cosine
from pipeline.bayes.curvature import Likelihood
from pipeline.bayes.head import BayesHead
from pipeline.bayes.kron import KronFactors, KronPosterior

D, d_img, d_txt, C = 4, 6, 5, 3
SCALE, BIAS = 9.0, -1.5


def _posterior(d: int, seed: int, lam: float = 2.0) -> KronPosterior:
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(40, d, generator=g, dtype=torch.float64)
    b = torch.randn(D, D, generator=g, dtype=torch.float64)
    factors = KronFactors.from_batch(acts, b @ b.T)
    weight = torch.randn(D, d, generator=g, dtype=torch.float64)
    return KronPosterior(factors, weight, lam)


def _head(lam: float = 2.0, likelihood: str = "infonce") -> BayesHead:
    return BayesHead(_posterior(d_img, 0, lam), _posterior(d_txt, 1, lam), SCALE, BIAS, likelihood)


def _acts(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_embeddings_add_the_offset_to_the_mean_only() -> None:
    head = _head()
    acts, offset = _acts(3, d_img, 2), _acts(3, D, 3)
    mean, var = head.image_embeddings(acts, offset)
    torch.testing.assert_close(mean, acts @ head.image.weight.T + offset, rtol=0, atol=1e-15)
    torch.testing.assert_close(var, head.image.embedding_variance(acts), rtol=0, atol=0)
    t_mean, _ = head.text_embeddings(_acts(C, d_txt, 4))
    torch.testing.assert_close(t_mean, _acts(C, d_txt, 4) @ head.text.weight.T, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"image offset has shape \[2, 4\], expected \[3, 4\]"):
        head.image_embeddings(acts, offset[:2])


def test_logits_are_probcosine_scaled() -> None:
    head = _head()
    acts, text, offset = _acts(3, d_img, 2), _acts(C, d_txt, 4), _acts(3, D, 5)
    logits = head.logits(acts, text, image_offset=offset)
    mean, var = prob_cosine(*head.image_embeddings(acts, offset), *head.text_embeddings(text))
    assert isinstance(logits, ProbLogits)
    torch.testing.assert_close(logits.mean, SCALE * mean + BIAS, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(logits.var, SCALE**2 * var, rtol=1e-14, atol=1e-14)


def _reference_probs(head, acts, text, k, seed, img_offset=None, txt_offset=None) -> torch.Tensor:
    """Row by row, draw by draw, with the draws taken in the documented order (image, then text)."""
    g = torch.Generator().manual_seed(seed)
    P, Q = head.image.sample_weights(k, g), head.text.sample_weights(k, g)
    out = torch.empty(acts.shape[0], k, text.shape[0], dtype=torch.float64)
    for n in range(acts.shape[0]):
        for j in range(k):
            img = P[j] @ acts[n] + (0 if img_offset is None else img_offset[n])
            txt = text @ Q[j].T + (0 if txt_offset is None else txt_offset)
            cos = torch.nn.functional.cosine_similarity(img[None], txt, dim=1)
            out[n, j] = torch.softmax(SCALE * cos + BIAS, dim=0)
    return out


def test_sample_probs_uses_joint_draws_across_sets() -> None:
    head = _head()
    pool, target, text = _acts(5, d_img, 6), _acts(2, d_img, 7), _acts(C, d_txt, 8)
    offsets = [_acts(5, D, 9), None]
    txt_offset = _acts(C, D, 10)
    k = 6
    probs = head.sample_probs(
        [pool, target],
        text,
        k,
        generator=torch.Generator().manual_seed(11),
        image_offsets=offsets,
        text_offset=txt_offset,
        chunk_size=2,
    )
    assert [p.shape for p in probs] == [(5, k, C), (2, k, C)]
    torch.testing.assert_close(
        probs[0], _reference_probs(head, pool, text, k, 11, offsets[0], txt_offset), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        probs[1], _reference_probs(head, target, text, k, 11, None, txt_offset), rtol=1e-12, atol=1e-14
    )
    # the same activation in two sets gets the same draws, not merely the same distribution
    same = head.sample_probs([pool[:2], pool[1:3]], text, k, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(same[0][1], same[1][0], rtol=0, atol=0)
    assert not torch.allclose(same[0][1, 0], same[0][1, 1])  # the draws differ from each other


def test_sample_probs_average_near_probit_for_a_confident_posterior() -> None:
    head = _head(lam=200.0)
    acts, text = _acts(4, d_img, 13), _acts(C, d_txt, 14)
    mc = head.sample_probs([acts], text, 4000, generator=torch.Generator().manual_seed(15))[0].mean(1)
    # loose: probit and ProbCosine are approximations; the MC error is about 1e-3 here
    assert float((mc - head.logits(acts, text).probit()).abs().max()) < 0.03


def test_with_image_and_validation() -> None:
    head = _head(likelihood="siglip")
    assert head.likelihood is Likelihood.SIGLIP
    other = _posterior(d_img, 3)
    swapped = head.with_image(other)
    assert swapped.image is other and swapped.text is head.text and swapped.bias == BIAS
    with pytest.raises(ValueError, match="image embeddings have dimension 4 but text embeddings have 3"):
        BayesHead(head.image, KronPosterior(KronFactors.zeros(2, 3), torch.zeros(3, 2), 1.0), SCALE)
    with pytest.raises(ValueError, match="2 image offsets for 1 sets"):
        head.sample_probs([_acts(2, d_img, 0)], _acts(C, d_txt, 0), 2, image_offsets=[None, None])
    with pytest.raises(ValueError, match=r"expects \[N, 6\]"):
        head.sample_probs([_acts(2, d_txt, 0)], _acts(C, d_txt, 0), 2)
