"""Posterior directories: a re-fitted projection round-trips, enters the id, makes old embeddings stale;
every recorded SHA-256 is verified on load; lineage is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipeline.artifacts.posterior import (
    Lineage,
    image_weight,
    load_posterior,
    read_info,
    write_posterior,
)
from pipeline.bayes.curvature import infonce_ggn
from pipeline.bayes.kron import KronFactors, KronPosterior
from pipeline.flows.zeroshot import check_fresh
from tests.stages.standin import DI, DT, D, StandInAdapter

MODEL = StandInAdapter().identity()


def _posteriors(adapter: StandInAdapter, weight: torch.Tensor | None = None) -> tuple[KronPosterior, ...]:
    g = torch.Generator().manual_seed(3)
    out = []
    for d, w in ((DI, adapter.image_weight() if weight is None else weight), (DT, adapter.text_weight())):
        acts = torch.randn(64, d, generator=g, dtype=torch.float64)
        emb = torch.randn(64, D, generator=g, dtype=torch.float64)
        factors = KronFactors.from_batch(acts, infonce_ggn(emb, emb, 20.0))
        out.append(KronPosterior(factors, w.double(), 0.5))
    return tuple(out)


def _write(directory: Path, adapter: StandInAdapter, **kwargs: object) -> dict:
    image, text = _posteriors(adapter, kwargs.pop("weight", None))  # type: ignore[arg-type]
    return write_posterior(
        directory,
        image,
        text,
        likelihood="infonce",
        scale=20.0,
        bias=0.0,
        model=MODEL,
        provenance={},
        **kwargs,
    )  # type: ignore[arg-type]


def test_refitted_projection_round_trips_and_is_used_in_place_of_the_model(tmp_path: Path) -> None:
    adapter = StandInAdapter()
    base = _write(tmp_path / "round0", adapter)
    refit = adapter.image_weight().double() + 0.01 * torch.randn(D, DI, dtype=torch.float64)
    lineage = Lineage(parent=base["posterior_id"], round=1, labels=16, labels_digest="ab" * 32)
    info = _write(tmp_path / "round1", adapter, weight=refit, image_projection=refit, lineage=lineage)

    assert (tmp_path / "round1" / "image_projection.safetensors").is_file()
    assert info["posterior_id"] != base["posterior_id"]  # the projection enters the id
    head = load_posterior(tmp_path / "round1", adapter)
    torch.testing.assert_close(head.image.weight, refit, rtol=0, atol=0)
    torch.testing.assert_close(image_weight(tmp_path / "round1", adapter), refit, rtol=0, atol=0)
    stored = read_info(tmp_path / "round1")
    assert stored["lineage"] == {
        "parent": base["posterior_id"],
        "round": 1,
        "labels": 16,
        "labels_digest": "ab" * 32,
    }
    # Without a projection the posterior uses the model's, and its id is computed as it always was.
    head0 = load_posterior(tmp_path / "round0", adapter)
    torch.testing.assert_close(head0.image.weight, adapter.image_weight().double(), rtol=0, atol=0)
    assert read_info(tmp_path / "round0")["image_projection"] is None
    # The same projection with different values is a different posterior.
    other = _write(tmp_path / "round1b", adapter, weight=refit * 1.01, image_projection=refit * 1.01)
    assert other["posterior_id"] != info["posterior_id"]


def test_embeddings_made_under_another_projection_are_stale(tmp_path: Path) -> None:
    adapter = StandInAdapter()
    base = _write(tmp_path / "round0", adapter)
    refit = adapter.image_weight().double() * 1.1
    info = _write(tmp_path / "round1", adapter, weight=refit, image_projection=refit)

    def table(meta: dict) -> pa.Table:
        return pa.table({"sample_id": ["a"]}).replace_schema_metadata(
            {b"bayescurate": json.dumps(meta).encode()}
        )

    made_before = table({"posterior_id": base["posterior_id"], "projection_sha256": None})
    check_fresh(made_before, "old", read_info(tmp_path / "round0"))  # fresh for its own posterior
    with pytest.raises(ValueError, match=r"'old' was embedded under another image projection.*stale"):
        check_fresh(made_before, "old", read_info(tmp_path / "round1"))
    made_after = table(
        {"posterior_id": info["posterior_id"], "projection_sha256": info["image_projection"]["sha256"]}
    )
    check_fresh(made_after, "new", read_info(tmp_path / "round1"))


@pytest.mark.parametrize("name", ["image.safetensors", "text.safetensors", "image_projection.safetensors"])
def test_a_flipped_byte_in_any_file_is_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    adapter = StandInAdapter()
    refit = adapter.image_weight().double() + 0.5
    _write(tmp_path, adapter, weight=refit, image_projection=refit)
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a tensor byte: the file still parses, only the digest can tell
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{name}.*corrupt or was modified"):
        load_posterior(tmp_path, adapter)


def test_projection_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    adapter = StandInAdapter()
    with pytest.raises(ValueError, match=r"image projection has shape \[8, 3\]"):
        _write(tmp_path, adapter, image_projection=torch.zeros(D, 3))
