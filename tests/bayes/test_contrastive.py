"""Contrastive-block factors against a plain per-block sum (MATH §1 end, §2), float64."""

from __future__ import annotations

import pytest
import torch

from pipeline.bayes.contrastive import contrastive_factors
from pipeline.bayes.curvature import infonce_ggn, siglip_ggn

N, d, dt, D, C = 23, 5, 4, 3, 8


def _pairs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(N, k, generator=g, dtype=torch.float64) for k in (d, D, dt, D))


@pytest.mark.parametrize("likelihood", ["infonce", "siglip"])
def test_matches_per_block_sum_and_block_ids(likelihood: str) -> None:
    ia, ie, ta, te = _pairs()
    image, text = contrastive_factors(ia, ie, ta, te, likelihood, 7.0, -1.5, block_size=C)
    b_img = torch.zeros(D, D, dtype=torch.float64)
    b_txt = torch.zeros(D, D, dtype=torch.float64)
    for lo in range(0, N, C):  # blocks 0..7, 8..15, 16..22 (a smaller last block)
        x, y = ie[lo : lo + C], te[lo : lo + C]
        if likelihood == "infonce":
            b_img += infonce_ggn(x, y, 7.0)
            b_txt += infonce_ggn(y, x, 7.0)
        else:
            b_img += siglip_ggn(x, y, 7.0, -1.5)
            b_txt += siglip_ggn(y, x, 7.0, -1.5)
    torch.testing.assert_close(image.B, b_img, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(text.B, b_txt, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(image.A, ia.T @ ia, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(text.A, ta.T @ ta, rtol=1e-12, atol=1e-14)
    assert image.n == text.n == N and image.meta["tower"] == "image" and text.meta["tower"] == "text"

    # The same grouping given as block ids, rows shuffled: identical factors.
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    blocks = torch.arange(N)[perm] // C
    image2, text2 = contrastive_factors(
        ia[perm], ie[perm], ta[perm], te[perm], likelihood, 7.0, -1.5, blocks=blocks
    )
    torch.testing.assert_close(image2.B, image.B, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(text2.A, text.A, rtol=1e-12, atol=1e-14)


def test_halves_merge_to_the_whole() -> None:
    ia, ie, ta, te = _pairs(1)
    whole = contrastive_factors(ia, ie, ta, te, "infonce", 5.0, block_size=C)
    first = contrastive_factors(ia[:16], ie[:16], ta[:16], te[:16], "infonce", 5.0, block_size=C)
    rest = contrastive_factors(ia[16:], ie[16:], ta[16:], te[16:], "infonce", 5.0, block_size=C)
    for tower in range(2):
        merged = first[tower] + rest[tower]
        torch.testing.assert_close(merged.A, whole[tower].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(merged.B, whole[tower].B, rtol=1e-12, atol=1e-14)
        assert merged.n == whole[tower].n


def test_rejects_misaligned_pairs_and_bad_blocks() -> None:
    ia, ie, ta, te = _pairs()
    with pytest.raises(ValueError, match="pairs must align"):
        contrastive_factors(ia[:-1], ie, ta, te, "infonce", 5.0, block_size=C)
    with pytest.raises(ValueError, match="exactly one"):
        contrastive_factors(ia, ie, ta, te, "infonce", 5.0)
    with pytest.raises(ValueError, match="at least 2"):
        contrastive_factors(ia, ie, ta, te, "infonce", 5.0, block_size=1)
