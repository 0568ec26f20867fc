"""How a campaign loads its embeddings: activations and offsets only, the stored variances never read."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.io.vectors import vector_column
from pipeline.rounds.data import CHUNK, ModelCache, load_rows
from pipeline.selection import read_embeddings

N, d, D = CHUNK * 2 + 1234, 9, 6  # three chunks, the last one short


def _cache(weight: torch.Tensor) -> ModelCache:
    return ModelCache(
        text_acts=torch.zeros(2, 3, dtype=torch.float64),
        text_offset=None,
        image_weight=weight,
        text_weight=torch.zeros(D, 3, dtype=torch.float64),
        classes=["a", "b"],
        label_column=None,
        identity={},
        posterior_id="start",
    )


def _write(
    folder: Path, mean: torch.Tensor, acts: torch.Tensor, meta: dict[str, object], wide: bool = False
) -> list[str]:
    """Two part files without a `var` column, as a writer that left it out would; returns the ids. `wide`:
    the means as float64 lists (another writer's choice; ours are float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"s{i:06d}" for i in range(len(acts))]
    for part, rows in enumerate((slice(0, N // 3), slice(N // 3, N))):
        table = pa.table(
            {
                "sample_id": ids[rows],
                "mean": _doubles(mean[rows]) if wide else vector_column(mean[rows]),
                "acts": vector_column(acts[rows]),
                "domain": ["blur" if i % 3 else "clean" for i in range(len(acts))][rows],
            }
        ).replace_schema_metadata({b"bayescurate": json.dumps(meta).encode()})
        pq.write_table(table, folder / f"part-{part:05d}.parquet")
    return ids


def _doubles(values: torch.Tensor) -> pa.Array:
    flat = pa.array(values.double().contiguous().numpy().reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


@pytest.mark.parametrize(
    ("residual", "wide", "from_row"),
    [(False, False, 0), (True, False, 0), (True, True, 0), (True, False, CHUNK + 7)],
    ids=["clip", "siglip-residual", "siglip-residual-float64-file", "residual-after-the-first-chunk"],
)
def test_offsets_are_recovered_a_chunk_at_a_time_and_variances_are_never_read(
    tmp_path: Path, residual: bool, wide: bool, from_row: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(N, d, generator=gen, dtype=torch.float64).float().double()  # float32 on disk
    weight = torch.randn(D, d, generator=gen, dtype=torch.float64)
    offset = 0.3 * torch.randn(N, D, generator=gen, dtype=torch.float64) if residual else torch.zeros(N, D)
    offset[:from_row] = 0  # rows whose offsets are rounding only, in chunks of their own
    mean = acts @ weight.T + offset
    ids = _write(tmp_path / "emb", mean, acts, {"posterior_id": "start"}, wide)

    rows = load_rows(str(tmp_path / "emb"), _cache(weight), {"posterior_id": "start"}, "pool")
    assert rows.sample_ids == ids and rows.acts.dtype == torch.float64
    assert torch.equal(rows.acts, acts)  # float32 values, exactly
    assert rows.columns == {"domain": ["blur" if i % 3 else "clean" for i in range(N)]}
    stored = mean if wide else mean.float().double()  # what the file holds (never rounded on reading)
    if residual:
        # The dense twin: the whole [N, D] array at once, in float64.
        assert rows.offsets is not None
        torch.testing.assert_close(rows.offsets, stored - acts @ weight.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(acts @ weight.T + rows.offsets, stored, rtol=0, atol=1e-12)
    else:
        assert rows.offsets is None  # float32 rounding of the means is not an offset

    picked = rows.take(torch.tensor([N - 1, 0, CHUNK]))
    assert picked.sample_ids == [ids[N - 1], ids[0], ids[CHUNK]]
    assert torch.equal(picked.acts, acts[[N - 1, 0, CHUNK]])
    assert picked.columns["domain"] == [rows.columns["domain"][i] for i in (N - 1, 0, CHUNK)]
    assert (picked.offsets is None) is (not residual)

    with pytest.raises(ValueError, match="has no 'var' column"):  # what the selection job does need
        read_embeddings(str(tmp_path / "emb"))


def test_embeddings_of_another_projection_are_refused(tmp_path: Path) -> None:
    acts = torch.ones(N, d, dtype=torch.float64)
    weight = torch.ones(D, d, dtype=torch.float64)
    _write(tmp_path / "emb", acts @ weight.T, acts, {"posterior_id": "refit", "projection_sha256": "ab" * 32})
    with pytest.raises(ValueError, match="another image projection than the starting posterior start"):
        load_rows(str(tmp_path / "emb"), _cache(weight), {"posterior_id": "start"}, "pool")
