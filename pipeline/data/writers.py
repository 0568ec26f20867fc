"""Corpus writers for the three input formats `pipeline.data.sources` reads (used by `make-world`).

A record is `CorpusRecord(sample_id, image_bytes, caption, labels, ext)`. Writers stream: they hold one
output file's worth of records at a time, and every file is written atomically (temporary + rename).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import pyarrow as pa

from pipeline.data.formats import CorpusFormat
from pipeline.io import storage


@dataclass(frozen=True)
class CorpusRecord:
    """One sample as stored: encoded image bytes, optional caption, string labels."""

    sample_id: str
    image: bytes
    caption: str | None
    labels: dict[str, str] = field(default_factory=dict)
    ext: str = "png"  # file extension of the encoded image


def _chunks(records: Iterable[CorpusRecord], size: int) -> Iterator[list[CorpusRecord]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def write_parquet(
    records: Iterable[CorpusRecord], out: str, rows_per_file: int = 10_000, row_group_size: int = 256
) -> int:
    """Write Parquet files; small row groups let readers cut shards without reading whole files."""
    n = 0
    for i, chunk in enumerate(_chunks(records, rows_per_file)):
        label_names = sorted({k for r in chunk for k in r.labels})
        columns: dict[str, pa.Array] = {
            "sample_id": pa.array([r.sample_id for r in chunk], pa.string()),
            "image": pa.array([r.image for r in chunk], pa.binary()),
            "caption": pa.array([r.caption for r in chunk], pa.string()),
        }
        for name in label_names:
            columns[name] = pa.array([r.labels.get(name) for r in chunk], pa.string())
        storage.write_parquet(pa.table(columns), f"{out}/part-{i:05d}.parquet", row_group_size=row_group_size)
        n += len(chunk)
    return n


def write_folder(records: Iterable[CorpusRecord], out: str) -> int:
    """Write one image file per record and a `captions.jsonl` index (written last, atomically)."""
    lines = []
    for r in records:
        name = f"images/{r.sample_id}.{r.ext}"
        storage.write_bytes(f"{out}/{name}", r.image)
        entry: dict[str, str | None] = {"file": name, "sample_id": r.sample_id, **r.labels}
        if r.caption is not None:
            entry["caption"] = r.caption
        lines.append(json.dumps(entry, sort_keys=True))
    storage.write_text(f"{out}/captions.jsonl", "\n".join(lines) + "\n")
    return len(lines)


def write_webdataset(records: Iterable[CorpusRecord], out: str, samples_per_tar: int = 1000) -> int:
    """Write WebDataset tars: members `<key>.<ext>`, `<key>.txt` (if captioned), `<key>.json`."""
    n = 0
    for i, chunk in enumerate(_chunks(records, samples_per_tar)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for r in chunk:
                key = r.sample_id.replace(".", "_")  # the key ends at the first dot
                members = {
                    r.ext: r.image,
                    "json": json.dumps({"sample_id": r.sample_id, **r.labels}).encode(),
                }
                if r.caption is not None:
                    members["txt"] = r.caption.encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        storage.write_bytes(f"{out}/shard-{i:05d}.tar", buffer.getvalue())
        n += len(chunk)
    return n


def write_corpus(records: Iterable[CorpusRecord], out: str, fmt: CorpusFormat | str, per_file: int) -> int:
    """Write `records` under `out` in `fmt`; returns the number written."""
    fmt = CorpusFormat(fmt)
    if fmt is CorpusFormat.PARQUET:
        return write_parquet(records, out, rows_per_file=per_file)
    if fmt is CorpusFormat.FOLDER:
        return write_folder(records, out)
    return write_webdataset(records, out, samples_per_tar=per_file)
