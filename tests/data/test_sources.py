"""Sources: the three formats read back the same rows; shards are deterministic; ids from content hashes."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.sources import content_id, plan_shards, read_shard
from pipeline.data.writers import CorpusRecord, write_corpus


def _records(n: int) -> list[CorpusRecord]:
    return [
        CorpusRecord(
            f"id-{i}", f"bytes-{i}".encode(), None if i == 3 else f"caption {i}", {"shape": f"s{i % 2}"}
        )
        for i in range(n)
    ]


def _rows(uri: str, rows_per_shard: int) -> list[dict]:
    out = []
    for shard in plan_shards(uri, rows_per_shard=rows_per_shard):
        out += read_shard(shard).to_pylist()
    return sorted(out, key=lambda r: r["sample_id"])


@pytest.mark.parametrize("fmt", ["parquet", "folder", "webdataset"])
def test_formats_round_trip(tmp_path: Path, fmt: str) -> None:
    records = _records(7)
    write_corpus(records, str(tmp_path / fmt), fmt, per_file=3)
    rows = _rows(str(tmp_path / fmt), rows_per_shard=2)
    assert [r["sample_id"] for r in rows] == sorted(r.sample_id for r in records)
    by_id = {r["sample_id"]: r for r in rows}
    for rec in records:
        row = by_id[rec.sample_id]
        assert row["image"] == rec.image
        assert row["caption"] == rec.caption
        assert row["shape"] == rec.labels["shape"]
        assert row["read_error"] is None


def test_shards_are_deterministic_and_cover_rows(tmp_path: Path) -> None:
    write_corpus(_records(10), str(tmp_path), "parquet", per_file=4)
    first = plan_shards(str(tmp_path), rows_per_shard=3)
    assert first == plan_shards(str(tmp_path), rows_per_shard=3)
    assert [s.rows for s in first] == [3, 1, 3, 1, 2]  # files of 4, 4, 2 rows
    assert len({s.shard_id for s in first}) == len(first)


def test_parquet_paths_and_content_ids(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"aaa")
    table = pa.table({"path": ["img/a.png", "img/missing.png"], "text": ["x", "y"]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    rows = read_shard(plan_shards(str(tmp_path))[0]).to_pylist()
    assert rows[0]["image"] == b"aaa" and rows[0]["sample_id"] == content_id(b"aaa")
    assert rows[0]["caption"] == "x"
    assert rows[1]["image"] is None and "missing.png" in rows[1]["read_error"]


def test_no_image_column_is_a_clear_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no image column"):
        read_shard(plan_shards(str(tmp_path))[0])
