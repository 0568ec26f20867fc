from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.io import storage


def test_parquet_roundtrip_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    table = pa.table({"sample_id": ["a", "b"], "score": [0.5, 0.25]})
    target = tmp_path / "deep" / "rows.parquet"
    storage.write_parquet(table, target)
    assert storage.read_parquet(target).equals(table)
    assert storage.read_parquet(f"file://{target}", columns=["score"]).column_names == ["score"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["rows.parquet"]


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    storage.write_json(target, {"round": 1})
    with pytest.raises(TypeError), storage.atomic_output(target) as out:
        out.write(b"half a fi")
        raise TypeError("killed mid-write")
    assert storage.read_json(target) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_listing_existence_and_errors(tmp_path: Path) -> None:
    storage.write_text(tmp_path / "a" / "x.txt", "x")
    storage.write_bytes(tmp_path / "a" / "y.bin", b"y")
    storage.write_text(tmp_path / "b.txt", "b")
    assert storage.list_files(tmp_path, suffix=".txt") == [
        str(tmp_path / "a" / "x.txt"),
        str(tmp_path / "b.txt"),
    ]
    assert storage.exists(tmp_path / "a" / "y.bin") and not storage.exists(tmp_path / "nope")
    storage.remove(tmp_path / "a")
    assert not storage.exists(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_parquet(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.list_files(tmp_path / "missing")
    with pytest.raises(ValueError, match="empty"):
        storage.resolve("")
