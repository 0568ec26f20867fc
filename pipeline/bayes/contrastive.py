"""KFAC factors of both towers from image–text pairs cut into contrastive blocks (MATH §1 end, §2).

Within a block of `C` pairs, the image tower's sources are the block's image embeddings and its targets the
block's text embeddings; the text tower the reverse. `A = Σ a aᵀ` runs over every pair, `B` sums the blocks'
label-free GGNs, `N` counts pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.bayes.curvature import Likelihood, ggn
from pipeline.bayes.kron import KronFactors


def contrastive_factors(
    image_acts: Tensor,
    image_emb: Tensor,
    text_acts: Tensor,
    text_emb: Tensor,
    likelihood: Likelihood | str,
    scale: float,
    bias: float = 0.0,
    *,
    block_size: int | None = None,
    blocks: Tensor | None = None,
    meta: dict[str, str | int | float] | None = None,
) -> tuple[KronFactors, KronFactors]:
    """(image, text) factors, accumulated in float64.

    image_acts [N, d], image_emb [N, D], text_acts [N, dt], text_emb [N, D]: row i is a pair. Blocks are
    either consecutive runs of `block_size` rows (a trailing partial block is a smaller block) or given as
    `blocks` [N], a block id per row (rows sharing an id form one block, whatever their order).
    """
    n = image_acts.shape[0]
    if not (image_emb.shape[0] == text_acts.shape[0] == text_emb.shape[0] == n):
        raise ValueError(
            f"pairs must align: {n} image activations, {image_emb.shape[0]} image embeddings, "
            f"{text_acts.shape[0]} text activations, {text_emb.shape[0]} text embeddings"
        )
    if (block_size is None) == (blocks is None):
        raise ValueError("give exactly one of block_size and blocks")
    if blocks is None:
        if block_size is None or block_size < 2:
            raise ValueError(f"block_size must be at least 2 (a contrastive block), got {block_size}")
        blocks = torch.arange(n) // block_size
    g, h = image_emb.to(torch.float64), text_emb.to(torch.float64)
    dim = g.shape[1]
    b_image = torch.zeros(dim, dim, dtype=torch.float64)
    b_text = torch.zeros(dim, dim, dtype=torch.float64)
    for block in torch.unique(blocks):
        rows = torch.nonzero(blocks == block).squeeze(1)
        gb, hb = g[rows], h[rows]  # [C, D] each
        b_image += ggn(likelihood, gb, hb, scale, bias, accumulate_dtype=torch.float64)
        b_text += ggn(likelihood, hb, gb, scale, bias, accumulate_dtype=torch.float64)
    meta = dict(meta or {})
    image = KronFactors.from_batch(image_acts.to(torch.float64), b_image, {**meta, "tower": "image"})
    text = KronFactors.from_batch(text_acts.to(torch.float64), b_text, {**meta, "tower": "text"})
    return image, text
