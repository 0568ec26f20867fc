"""What a campaign computes from: cached activations, so that no round ever runs an encoder.

`campaign init` runs the model once to write `cache/model.safetensors`: the class text activations (and
offsets), the starting posterior's image projection, the text projection and the model identity. Every
step then loads only tensors: the pool, targets and evaluation embeddings (`embed --activations`), whose
per-row offsets `mean − P̂ a` (zero for CLIP, SigLIP's attention-pool residual) are recovered once against
the starting projection, and a round's posterior re-scores them as `P* a + offset` with its variance
(MATH §9) by matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.artifacts.posterior import image_weight, load_head, projection_sha256, read_info
from pipeline.bayes.head import BayesHead
from pipeline.classes import ClassSpec, class_text_features, read_classes
from pipeline.io import tensors, vectors
from pipeline.rounds.layout import CACHE_FILE, CampaignDir
from pipeline.selection import EmbeddingSet, read_embedding_table, scalar_columns

CACHE_FORMAT = "bayescurate.campaign-cache/1"
CHUNK = 8192  # rows re-scored at a time


@dataclass(frozen=True)
class ModelCache:
    """The model-dependent tensors a campaign needs, computed once at init."""

    text_acts: Tensor  # [C, dt] class text activations (prompt-averaged)
    text_offset: Tensor | None  # [C, D]
    image_weight: Tensor  # [D, d] the starting posterior's image projection
    text_weight: Tensor  # [D, dt]
    classes: list[str]
    label_column: str | None
    identity: dict[str, Any]
    posterior_id: str  # the starting posterior

    def head(self, posterior_dir: str) -> BayesHead:
        """The head of a posterior directory of this campaign (the start, or a round's update)."""
        return load_head(
            posterior_dir,
            image_weight=self.image_weight,
            text_weight=self.text_weight,
            identity=self.identity,
        )


def write_cache(directory: str, posterior: str, spec: ClassSpec) -> ModelCache:
    """Run the model once (class prompts through the text tower) and cache what every step needs."""
    from pipeline.stages.embed import ModelSpec

    info = read_info(posterior)
    adapter = ModelSpec(info["model"].get("name"), info["model"].get("pretrained")).load()
    text_acts, text_offset = class_text_features(adapter, spec)
    found = {
        "text_acts": text_acts,
        "image_weight": image_weight(posterior, adapter),
        "text_weight": adapter.text_weight().detach().double().cpu(),
    }
    if text_offset is not None:
        found["text_offset"] = text_offset
    header = {
        "format": CACHE_FORMAT,
        "classes": spec.names,
        "label_column": spec.label_column,
        "identity": adapter.identity(),
        "posterior_id": info["posterior_id"],
    }
    tensors.save(CampaignDir(directory).cache, found, header)
    return read_cache(directory)


def read_cache(directory: str) -> ModelCache:
    found, header = tensors.load(CampaignDir(directory).cache)
    if header.get("format") != CACHE_FORMAT:
        raise ValueError(
            f"{directory!r}: {CACHE_FILE} has format {header.get('format')!r}, expected {CACHE_FORMAT!r}"
        )
    return ModelCache(
        text_acts=found["text_acts"],
        text_offset=found.get("text_offset"),
        image_weight=found["image_weight"],
        text_weight=found["text_weight"],
        classes=list(header["classes"]),
        label_column=header.get("label_column"),
        identity=dict(header["identity"]),
        posterior_id=str(header["posterior_id"]),
    )


@dataclass(frozen=True)
class Rows:
    """Rows of an embeddings directory as a campaign computes from them: ids, activations, the scalar
    columns, and the offsets against the starting projection (None: CLIP, no offset).

    The stored Gaussian embeddings are not kept: every round re-scores the rows under its own posterior
    (`rescored`), so holding them would only double the memory of a large pool.
    """

    sample_ids: list[str]
    acts: Tensor  # [N, d] float64
    columns: dict[str, list]  # the scalar columns (source, domain, labels, ...)
    meta: dict[str, Any]  # the `bayescurate` metadata of the files
    offsets: Tensor | None  # [N, D] float64

    def __len__(self) -> int:
        return len(self.sample_ids)

    def take(self, index: Tensor) -> Rows:
        at = index.tolist()
        return Rows(
            [self.sample_ids[i] for i in at],
            self.acts[index],
            {k: [v[i] for i in at] for k, v in self.columns.items()},
            self.meta,
            None if self.offsets is None else self.offsets[index],
        )

    def rescored(self, head: BayesHead) -> EmbeddingSet:
        """The rows with the Gaussian embeddings of `head` (`P a + offset`, and its variance) and their
        offsets: the embedding set selection works on."""
        means, variances = [], []
        for lo in range(0, len(self), CHUNK):
            acts = self.acts[lo : lo + CHUNK]
            offset = None if self.offsets is None else self.offsets[lo : lo + CHUNK]
            mean, var = head.image_embeddings(acts, offset)
            means.append(mean)
            variances.append(var)
        empty = torch.zeros(0, head.dim, dtype=self.acts.dtype)
        mean = torch.cat(means) if means else empty
        var = torch.cat(variances) if variances else empty
        return EmbeddingSet(self.sample_ids, mean, var, self.acts, self.columns, self.meta, self.offsets)


def load_rows(uri: str, cache: ModelCache, start_info: dict[str, Any], what: str) -> Rows:
    """An embeddings directory of the campaign, checked to come from the starting posterior.

    Reads the activations and the stored means only (never the variances). The means serve once, to recover
    the offsets `mean − P̂ a` against the starting projection, a chunk at a time: a CLIP pool (no offsets)
    never holds an [N, D] array.
    """
    table, meta = read_embedding_table(uri, ("mean", "acts"))
    wanted = projection_sha256(start_info)
    if meta.get("projection_sha256") != wanted:
        raise ValueError(
            f"the {what} embeddings {uri!r} were made under another image projection than the starting "
            f"posterior {start_info['posterior_id']} (they name {meta.get('posterior_id')}): re-embed"
        )
    acts = vectors.tensor(table, "acts")  # [N, d] float64
    stored = vectors.matrix(table, "mean", None)  # [N, D], as stored (float32 when we wrote it)
    sample_ids, columns = table.column("sample_id").to_pylist(), scalar_columns(table)
    del table
    weight = cache.image_weight.T.to(acts.dtype)  # [d, D]

    def offset(lo: int) -> Tensor:
        return torch.from_numpy(stored[lo : lo + CHUNK].astype(np.float64)) - acts[lo : lo + CHUNK] @ weight

    # Offsets below 1e-5 of the largest |mean| are the rounding of float32 means: no offsets. A chunk is
    # kept only when it holds a real offset, so a CLIP pool never holds them and the product runs once.
    starts = range(0, len(acts), CHUNK)
    scale = max([1.0, *(float(np.abs(stored[lo : lo + CHUNK]).max()) for lo in starts)])
    kept: dict[int, Tensor] = {}
    for lo in starts:
        off = offset(lo)
        if float(off.abs().max()) > 1e-5 * scale:
            kept[lo] = off
    offsets = torch.cat([kept[lo] if lo in kept else offset(lo) for lo in starts]) if kept else None
    return Rows(sample_ids, acts, columns, meta, offsets)


def read_spec(classes: str) -> ClassSpec:
    return read_classes(classes)
