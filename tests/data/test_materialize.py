"""materialize: curated picks become WebDataset tars or Parquet parts that the project's own reader reads back
byte for byte; shards by rank, safe unique keys, resumable reruns, unusable images reported, not written."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.materialize import MaterializeFormat, materialize
from pipeline.data.sources import plan_shards, read_shard
from pipeline.data.writers import CorpusRecord, write_corpus
from pipeline.io import faults, storage
from tests.fixtures_s3 import S3Server

FORMATS = [f.value for f in MaterializeFormat]
EXT_OF = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp"}


def _image(color: tuple[int, int, int], kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, format=kind)
    return buffer.getvalue()


@dataclass(frozen=True)
class Corpus:
    """Rows as the project's reader yields them (sample_id -> row, with `source` and `image`) and 7 picks."""

    rows: dict[str, dict[str, Any]]
    picks: list[dict[str, Any]]
    root: Path


def _read_all(uri: str, fmt: str) -> list[dict[str, Any]]:
    rows = []
    for shard in plan_shards(uri, fmt, rows_per_shard=2):
        rows += read_shard(shard).to_pylist()
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    kinds = ["PNG", "JPEG", "GIF", "WEBP"]
    folder = [
        CorpusRecord(f"f{i}", _image((40 * i, 10, 200), kinds[i]), f"folder {i}" if i != 1 else None, {}, ext)
        for i, ext in enumerate(["png", "jpg", "gif"])
    ]
    folder.append(CorpusRecord("corrupt", b"\x89PNG\r\n\x1a\n but not really", "broken", {}, "png"))
    noise = Image.frombytes("RGB", (32, 32), bytes(range(256)) * 12)
    whole = io.BytesIO()
    noise.save(whole, format="PNG")
    # A valid header but half the pixel data: only a full decode notices.
    folder.append(CorpusRecord("truncated", whole.getvalue()[: len(whole.getvalue()) // 2], None, {}, "png"))
    parquet = [
        CorpusRecord(f"p{i}", _image((10, 50 * i, 30), kinds[i]), None if i == 2 else f"parquet {i}")
        for i in range(4)
    ]
    write_corpus(folder, str(root / "folder"), "folder", per_file=10)
    write_corpus(parquet, str(root / "parquet"), "parquet", per_file=3)
    rows = {r["sample_id"]: r for r in _read_all(str(root / "folder"), "folder")}
    rows |= {r["sample_id"]: r for r in _read_all(str(root / "parquet"), "parquet")}
    assert set(rows) == {"f0", "f1", "f2", "corrupt", "truncated", "p0", "p1", "p2", "p3"}
    order = ["p2", "f0", "p0", "f1", "p3", "f2", "p1"]  # rank order, both corpora interleaved
    picks = [
        {
            "sample_id": sid,
            "source": rows[sid]["source"],
            "caption": rows[sid]["caption"],
            "rank": rank,
            "score": 1.0 / (rank + 1),
            "predicted": f"class-{rank % 3}",
            "confident": rank % 2 == 0,
        }
        for rank, sid in enumerate(order)
    ]
    return Corpus(rows, picks, root)


def _tar_ids(path: str) -> list[str]:
    """Original sample ids of a tar, in member order (from the `.json` members)."""
    with tarfile.open(path) as tar:
        members = [tar.extractfile(m) for m in tar if m.name.endswith(".json")]
        return [json.load(handle)["sample_id"] for handle in members if handle is not None]


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file under `out`, hidden ones included (a partial or temporary file would show here)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- WebDataset


def test_webdataset_round_trips_through_the_project_reader(corpus: Corpus, tmp_path: Path) -> None:
    out = str(tmp_path / "wds")
    result = materialize(corpus.picks, out, "webdataset", shard_size=3)

    assert result.files == [f"{out}/shard-{i:05d}.tar" for i in range(3)]
    assert result.rows == 7 and result.missing == {}
    ids = [p["sample_id"] for p in corpus.picks]
    assert [_tar_ids(f) for f in result.files] == [ids[0:3], ids[3:6], ids[6:7]]  # by rank: i // 3

    back = _read_all(out, "webdataset")
    assert sorted(r["sample_id"] for r in back) == sorted(ids)
    for row in back:
        pick = next(p for p in corpus.picks if p["sample_id"] == row["sample_id"])
        assert row["image"] == corpus.rows[row["sample_id"]]["image"]  # byte-identical, never re-encoded
        assert row["caption"] == pick["caption"]
        assert row["read_error"] is None
        assert (row["rank"], row["predicted"]) == (str(pick["rank"]), pick["predicted"])
        assert float(row["score"]) == pick["score"]


def test_tar_members_are_key_ext_with_safe_unique_keys(corpus: Corpus, tmp_path: Path) -> None:
    sources = [corpus.rows[s]["source"] for s in ("f0", "f1", "f2", "p3", "p0")]
    ids = ["a/b.png", "a_b.png", "a.b", "plain-id_7", "x." * 200]
    picks = [
        {"sample_id": sid, "source": src, "caption": None if i == 1 else f"caption {i}", "rank": i}
        for i, (sid, src) in enumerate(zip(ids, sources, strict=True))
    ]
    result = materialize(picks, str(tmp_path / "wds"), "webdataset", shard_size=10)

    with tarfile.open(result.files[0]) as tar:
        names = tar.getnames()
    keys = list(dict.fromkeys(name.split(".", 1)[0] for name in names))
    assert len(keys) == len(ids)  # "a/b.png" and "a_b.png" (both "a_b_png" once made safe) stay apart
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,128}", k) for k in keys)
    assert keys[3] == "plain-id_7"  # a safe id is its own key
    expected = []
    for i, (key, sid) in enumerate(zip(keys, ["f0", "f1", "f2", "p3", "p0"], strict=True)):
        kind = Image.open(io.BytesIO(corpus.rows[sid]["image"])).format
        expected += [f"{key}.{EXT_OF[kind]}"] + ([f"{key}.txt"] if i != 1 else []) + [f"{key}.json"]
    assert names == expected

    back = _read_all(str(tmp_path / "wds"), "webdataset")
    assert sorted(r["sample_id"] for r in back) == sorted(ids)  # the original ids, from the .json members


# ------------------------------------------------------------------------------------------------- Parquet


def test_parquet_parts_hold_images_and_metadata_in_rank_order(corpus: Corpus, tmp_path: Path) -> None:
    out = str(tmp_path / "pq")
    result = materialize(corpus.picks, out, MaterializeFormat.PARQUET, shard_size=3)

    assert result.files == [f"{out}/part-{i:05d}.parquet" for i in range(3)]
    assert result.rows == 7 and result.missing == {}
    tables = [pq.read_table(f) for f in result.files]
    assert [t.num_rows for t in tables] == [3, 3, 1]
    assert all(t.schema == tables[0].schema for t in tables)  # parts of one data set concatenate
    assert tables[0].schema.names == [
        "sample_id",
        "image",
        "caption",
        "rank",
        "score",
        "predicted",
        "confident",
    ]
    rows = [r for t in tables for r in t.to_pylist()]
    for row, pick in zip(rows, corpus.picks, strict=True):
        assert row["image"] == corpus.rows[pick["sample_id"]]["image"]
        assert {k: row[k] for k in pick if k != "source"} == {k: v for k, v in pick.items() if k != "source"}

    whole = storage.read_parquet(out)  # the folder as a dataset: the markers are not mistaken for data
    assert whole.column("sample_id").to_pylist() == [p["sample_id"] for p in corpus.picks]
    back = {r["sample_id"]: r for r in _read_all(out, "parquet")}
    assert {s: r["image"] for s, r in back.items()} == {s: corpus.rows[s]["image"] for s in back}


# ------------------------------------------------------------------------------------------- resumability


@pytest.mark.parametrize("fmt", FORMATS)
def test_rerun_rewrites_only_the_deleted_shard_with_identical_bytes(
    corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    out = tmp_path / "out"
    first = materialize(corpus.picks, str(out), fmt, shard_size=3)
    before = _snapshot(out)
    log = tmp_path / "writes.log"
    monkeypatch.setenv(faults.CHECKPOINT_LOG, str(log))

    assert materialize(corpus.picks, str(out), fmt, shard_size=3) == first
    assert not log.exists()  # nothing left to do: not a single write

    os.remove(first.files[1])
    again = materialize(corpus.picks, str(out), fmt, shard_size=3)
    written = [Path(line.split("\t", 1)[1]) for line in log.read_text().splitlines()]
    assert [p.name for p in written if p.parent == out] == [Path(first.files[1]).name]
    assert again == first
    assert _snapshot(out) == before


def test_crash_mid_shard_leaves_no_partial_shard(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    real_addfile = tarfile.TarFile.addfile

    def crash_in_shard_1(self: tarfile.TarFile, info: tarfile.TarInfo, fileobj: Any = None) -> None:
        if info.name.startswith(corpus.picks[4]["sample_id"] + "."):  # the second sample of shard 1
            raise RuntimeError("killed")
        real_addfile(self, info, fileobj)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tarfile.TarFile, "addfile", crash_in_shard_1)
        with pytest.raises(RuntimeError, match="killed"):
            materialize(corpus.picks, str(out), "webdataset", shard_size=3)
    left = _snapshot(out)
    assert [name for name in left if not name.startswith("_materialize/")] == ["shard-00000.tar"]

    materialize(corpus.picks, str(out), "webdataset", shard_size=3)
    materialize(corpus.picks, str(tmp_path / "clean"), "webdataset", shard_size=3)
    assert _snapshot(out) == _snapshot(tmp_path / "clean")
    assert _snapshot(out)["shard-00000.tar"] == left["shard-00000.tar"]  # kept, not rewritten differently


def test_other_picks_into_the_same_folder_are_refused(corpus: Corpus, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    materialize(corpus.picks, out, "webdataset", shard_size=3)
    with pytest.raises(ValueError, match=r"already holds another materialization.*rows of shard 0"):
        materialize(corpus.picks[::-1], out, "webdataset", shard_size=3)  # re-ranked: rows would move shard
    with pytest.raises(ValueError, match="shard_size 3 != 2"):
        materialize(corpus.picks, out, "webdataset", shard_size=2)
    with pytest.raises(ValueError, match="format 'webdataset' != 'parquet'"):
        materialize(corpus.picks, out, "parquet", shard_size=3)


# ------------------------------------------------------------------------------------ unusable images


@pytest.mark.parametrize("fmt", FORMATS)
def test_unreadable_and_undecodable_images_go_to_missing(corpus: Corpus, tmp_path: Path, fmt: str) -> None:
    ppm = corpus.root / "odd.ppm"
    if not ppm.exists():
        Image.new("RGB", (8, 6), (1, 2, 3)).save(ppm, format="PPM")
    parquet_file = corpus.rows["p0"]["source"].rsplit("#", 1)[0]
    picks = [
        {"sample_id": "f0", "source": corpus.rows["f0"]["source"]},
        {"sample_id": "corrupt", "source": corpus.rows["corrupt"]["source"]},
        {"sample_id": "p1", "source": corpus.rows["p1"]["source"]},
        {"sample_id": "gone", "source": str(corpus.root / "no-such-image.png")},
        {"sample_id": "no-row", "source": f"{parquet_file}#99"},
        {"sample_id": "p3", "source": corpus.rows["p3"]["source"]},
        {"sample_id": "odd", "source": str(ppm)},
        {"sample_id": "truncated", "source": corpus.rows["truncated"]["source"]},
    ]
    out = str(tmp_path / "out")
    result = materialize(picks, out, fmt, shard_size=3)

    assert list(result.missing) == ["corrupt", "gone", "no-row", "odd", "truncated"]  # rank order
    assert result.missing["corrupt"].startswith("undecodable: ")
    assert result.missing["truncated"].startswith("undecodable: ")
    assert result.missing["gone"].startswith("unreadable: ") and "no-such-image.png" in result.missing["gone"]
    assert result.missing["no-row"].startswith("unreadable: ") and "#99" in result.missing["no-row"]
    assert result.missing["odd"].startswith("unsupported_format: ") and "PPM" in result.missing["odd"]
    assert result.rows == 3 and len(result.files) == 3  # shards stay by rank, shard 2 is empty
    if fmt == "webdataset":
        per_shard = [_tar_ids(f) for f in result.files]
    else:
        per_shard = [pq.read_table(f).column("sample_id").to_pylist() for f in result.files]
    assert per_shard == [["f0", "p1"], ["p3"], []]


# ----------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"shard_size": 0}, "shard_size must be an integer >= 1, got 0"),
        ({"fmt": "zip"}, "unknown materialize format 'zip'"),
        ({"row": {"sample_id": ""}}, r"rows\[1\] has an empty sample_id \(''\)"),
        ({"row": {"sample_id": None}}, r"rows\[1\] has an empty sample_id \(None\)"),
        ({"row": {"sample_id": "p2"}}, r"sample_id 'p2' appears twice \(rows\[0\] and rows\[1\]\)"),
        ({"row": {"source": None}}, r"rows\[1\] \(sample_id 'f0'\) has no image source \(got None\)"),
        ({"row": {"tags": ["a", "b"]}}, "metadata 'tags' of sample 'f0' is a list"),
        ({"row": {"rank": "first"}}, r"metadata 'rank' mixes value types \['int', 'str'\]"),
        ({"row": {"image": b"x"}}, "has a field 'image'"),
    ],
)
def test_bad_arguments_raise_naming_the_value(
    corpus: Corpus, tmp_path: Path, change: dict[str, Any], match: str
) -> None:
    picks = [dict(p) for p in corpus.picks]
    picks[1].update(change.get("row", {}))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        materialize(picks, str(out), change.get("fmt", "webdataset"), shard_size=change.get("shard_size", 3))
    assert not out.exists()  # checked before anything is written


# ---------------------------------------------------------------------------------------------- on S3


def test_materializes_to_s3(corpus: Corpus, s3_server: S3Server) -> None:
    for fmt in FORMATS:
        out = s3_server.uri(fmt)
        result = materialize(corpus.picks, out, fmt, shard_size=3)
        assert result.files == [storage.join(out, MaterializeFormat(fmt).shard_name(i)) for i in range(3)]
        back = {r["sample_id"]: r["image"] for r in _read_all(out, fmt)}
        assert back == {p["sample_id"]: corpus.rows[p["sample_id"]]["image"] for p in corpus.picks}
        assert materialize(corpus.picks, out, fmt, shard_size=3) == result  # resumed: all shards skipped
