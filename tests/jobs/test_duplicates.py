"""Duplicate sample ids across shards and files: the first occurrence in shard order wins, every later one is
quarantined as a duplicate; the same verdicts with either executor, in any completion order, on reruns and
resumed runs, and for the posterior fit as for embeddings."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import embed, fit_posterior
from pipeline.artifacts.posterior import read_info
from pipeline.data.sources import plan_shards, read_shard, shard_ids
from pipeline.data.writers import CorpusRecord, write_parquet, write_webdataset
from pipeline.flows.world import MakeWorldConfig, records
from pipeline.io import storage
from pipeline.stages.shards import DUPLICATES_FILE, find_repeats
from tests.fixtures_s3 import S3Server

MODEL = "factory:tests.stages.standin:load"
N, PER_FILE, PER_SHARD = 24, 12, 4
# Position -> sample id where it is not `s<position>`. Parquet: files of 12 rows, shards of 4 rows.
REPEATED = {
    3: "dup-x",  # first in file 0 ...
    17: "dup-x",  # ... repeated in file 1
    5: "dup-y",  # first in shard 1 of file 0 ...
    9: "dup-y",  # ... repeated in shard 2 of the same file
    20: "dup-y",  # ... and in the other file
    14: "dup-z",  # twice in one shard
    15: "dup-z",
    1: "dup-w",  # first occurrence undecodable: it still wins, so dup-w is in no output
    22: "dup-w",
}
CORRUPT = {1}
FIRST = {"dup-x": 3, "dup-y": 5, "dup-z": 14}  # the occurrences that reach the output
LATER = [17, 9, 20, 15, 22]  # quarantined as duplicates


def _id(i: int) -> str:
    return REPEATED.get(i, f"s{i}")


def _records() -> list[CorpusRecord]:
    out = []
    for i, r in enumerate(records(MakeWorldConfig(n=N, out="unused"))):
        image = r.image[: len(r.image) // 2] if i in CORRUPT else r.image
        out.append(CorpusRecord(_id(i), image, r.caption, {"pos": str(i), "shape": r.labels["shape"]}))
    return out


def parquet_corpus(root: str) -> str:
    write_parquet(_records(), root, rows_per_file=PER_FILE, row_group_size=PER_SHARD)
    return root


def folder_corpus(root: str) -> str:
    """An image folder whose captions file gives the sample ids (file names are all distinct)."""
    lines = []
    for i, r in enumerate(_records()):
        name = f"images/{i:03d}.png"
        storage.write_bytes(storage.join(root, name), r.image)
        lines.append(json.dumps({"file": name, "sample_id": r.sample_id, "caption": r.caption, **r.labels}))
    storage.write_text(storage.join(root, "captions.jsonl"), "\n".join(lines) + "\n")
    return root


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _embed(corpus: str, out: str, executor: str) -> list[str]:
    return [
        "--images", corpus, "--model", MODEL, "--no-variance", "--out", out,
        "--rows-per-shard", str(PER_SHARD), "--executor", executor, "--no-tracking",
    ]  # fmt: skip


def _table(directory: str, quarantined: bool = False) -> pa.Table:
    files = storage.list_files(directory, suffix=".parquet")
    files = [f for f in files if ("/quarantine/" in f) == quarantined]
    parts = []
    for path in files:
        fs, p = storage.resolve(path)
        parts.append(pq.read_table(p, filesystem=fs))
    return pa.concat_tables(parts, promote_options="default")


def check_output(out: str) -> None:
    """Each id exactly once, the first occurrence's row; the later ones in the quarantine as duplicates."""
    table = _table(out)
    ids, positions = table["sample_id"].to_pylist(), [int(p) for p in table["pos"].to_pylist()]
    assert sorted(ids) == sorted({_id(i) for i in range(N)} - {"dup-w"})
    assert Counter(ids).most_common(1)[0][1] == 1
    for sid, first in FIRST.items():
        assert positions[ids.index(sid)] == first, sid
    quarantine = _table(out, quarantined=True).to_pylist()
    duplicates = [q for q in quarantine if q["reason"] == "duplicate_id"]
    assert sorted(q["sample_id"] for q in duplicates) == sorted(_id(i) for i in LATER)
    assert all("first at row" in q["error"] for q in duplicates)
    assert [q["reason"] for q in quarantine if q not in duplicates] == ["undecodable"]  # dup-w's first
    assert len(ids) + len(quarantine) == N  # exactly once: every row is in one of the two


def test_the_id_scan_reads_what_the_readers_read(tmp_path: Path) -> None:
    wds = str(tmp_path / "wds")
    write_webdataset(records(MakeWorldConfig(n=10, out="unused")), wds, samples_per_tar=6)
    storage.write_bytes(f"{wds}/no-json.tar", _tar({"k1.png": b"x", "k0.png": b"y", "k2.json": b"{}"}))
    for shard in plan_shards(wds, None, 4):
        assert shard_ids(shard) == read_shard(shard).column("sample_id").to_pylist()
    for corpus in (parquet_corpus(str(tmp_path / "pq")), folder_corpus(str(tmp_path / "folder"))):
        shards = plan_shards(corpus, None, PER_SHARD)
        for shard in shards:
            assert shard_ids(shard) == read_shard(shard).column("sample_id").to_pylist()
        found = find_repeats((s.shard_id, shard_ids(s)) for s in shards)
        assert sorted(r.sample_id for rows in found.values() for r in rows.values()) == sorted(
            _id(i) for i in LATER
        )


@pytest.mark.parametrize("make", [parquet_corpus, folder_corpus], ids=["two-parquet-files", "folder"])
def test_duplicates_across_shards_and_files_local(
    make: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = make(str(tmp_path / "corpus"))  # type: ignore[operator]
    out = str(tmp_path / "emb")
    assert embed.main(_embed(corpus, out, "local")) == 0
    assert "duplicate_id=5" in capsys.readouterr().out
    check_output(out)
    verdicts = storage.read_bytes(storage.join(out, DUPLICATES_FILE))

    # Resumed out of order: the shards holding the first occurrences are redone after the later ones are
    # complete, and from a fresh scan (no saved verdicts): the same output.
    for shard in ("00000-000000000", "00000-000000004"):
        storage.remove(storage.join(out, "_done", f"{shard}.json"))
        storage.remove(storage.join(out, f"part-{shard}.parquet"))
        storage.remove(storage.join(out, "quarantine", f"part-{shard}.parquet"))
    storage.remove(storage.join(out, DUPLICATES_FILE))
    assert embed.main(_embed(corpus, out, "local")) == 0
    assert "2 processed" in capsys.readouterr().out
    check_output(out)
    assert storage.read_bytes(storage.join(out, DUPLICATES_FILE)) == verdicts
    assert embed.main(_embed(corpus, out, "local")) == 0  # a rerun: nothing to do, nothing changes
    assert "0 processed" in capsys.readouterr().out
    check_output(out)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("make", [parquet_corpus, folder_corpus], ids=["two-parquet-files", "folder"])
def test_duplicates_across_shards_and_files_ray(make: object, ray_session: None, tmp_path: Path) -> None:
    corpus = make(str(tmp_path / "corpus"))  # type: ignore[operator]
    out = str(tmp_path / "emb")
    assert embed.main(_embed(corpus, out, "ray")) == 0
    check_output(out)
    local = str(tmp_path / "emb-local")
    assert embed.main(_embed(corpus, local, "local")) == 0
    assert storage.read_bytes(storage.join(out, DUPLICATES_FILE)) == storage.read_bytes(
        storage.join(local, DUPLICATES_FILE)
    )


def test_the_posterior_fit_counts_each_pair_once(tmp_path: Path) -> None:
    corpus = parquet_corpus(str(tmp_path / "corpus"))
    out = tmp_path / "post"
    args = ["--pairs", corpus, "--model", MODEL, "--out", str(out), "--block-size", str(PER_SHARD)]
    assert fit_posterior.main([*args, "--executor", "local", "--no-tracking"]) == 0
    info = read_info(out)
    assert info["data"]["quarantined"] == {"duplicate_id": 5, "undecodable": 1}
    assert info["data"]["pairs_used"] == info["n"]["image"] == N - 6


def test_a_folder_corpus_on_s3_with_duplicates(s3_server: S3Server) -> None:
    corpus = folder_corpus(s3_server.uri("folder"))
    out = s3_server.uri("emb")
    assert embed.main(_embed(corpus, out, "local")) == 0
    check_output(out)
