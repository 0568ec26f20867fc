"""Corpus readers: Parquet, image folders and WebDataset tars, cut into deterministic shards of rows.

Every reader yields the same row schema (`ROW_SCHEMA` plus label columns as strings):
`sample_id` (given, else a content hash), `image` (encoded bytes, null when they could not be read),
`caption` (null when absent), `source` (where the row came from, for the quarantine) and `read_error`.

Shards are the unit of exactly-once work: a shard is a pure function of the input listing and
`rows_per_shard` (Parquet: a row range of one file; folder: a slice of the sorted file list; WebDataset:
a slice of one tar's sorted sample keys), so a rerun plans the same shards with the same ids and can skip
the ones whose output already exists. Reading a shard holds only that shard in memory.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.formats import CorpusFormat
from pipeline.io import storage

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")
# Column names recognised in Parquet inputs, in order of preference.
ID_COLUMNS: tuple[str, ...] = ("sample_id", "id", "key")
IMAGE_COLUMNS: tuple[str, ...] = ("image", "image_bytes", "jpg", "png", "img")
PATH_COLUMNS: tuple[str, ...] = ("image_path", "image_uri", "path", "uri", "url", "file")
CAPTION_COLUMNS: tuple[str, ...] = ("caption", "text", "txt")

ROW_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("source", pa.string()),
        ("read_error", pa.string()),
    ]
)
DEFAULT_ROWS_PER_SHARD = 1024


@dataclass(frozen=True)
class Shard:
    """A deterministic slice of the input: the unit that is processed, written and skipped as a whole."""

    shard_id: str  # filesystem-safe, stable across runs: "<file index>-<first row>"
    format: str  # CorpusFormat value
    path: str  # the Parquet/tar file, or the folder root
    start: int  # first row (Parquet row, sorted file index, sorted tar key index)
    stop: int  # one past the last row
    root: str = ""  # folder root for relative paths (Parquet path columns, folder files)

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Shard:
        return cls(**json.loads(text))


def content_id(data: bytes) -> str:
    """Stable sample id of a row that has none: a hash of its content."""
    return "sha256-" + hashlib.sha256(data).hexdigest()[:32]


def detect_format(uri: str) -> CorpusFormat:
    """Guess the format of `uri` from its files: Parquet files, tar files, else a folder of images."""
    files = storage.list_files(uri)
    if not files:
        raise ValueError(f"input {uri!r} holds no files")
    if any(f.endswith(".parquet") for f in files):
        return CorpusFormat.PARQUET
    if any(f.endswith(".tar") for f in files):
        return CorpusFormat.WEBDATASET
    if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
        return CorpusFormat.FOLDER
    raise ValueError(f"input {uri!r} holds no Parquet, tar or image files")


def plan_shards(
    uri: str, fmt: CorpusFormat | str | None = None, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
) -> list[Shard]:
    """The deterministic shard list of a corpus (sorted by shard id)."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    fmt = CorpusFormat(fmt) if fmt is not None else detect_format(uri)
    if fmt is CorpusFormat.PARQUET:
        shards = _plan_parquet(uri, rows_per_shard)
    elif fmt is CorpusFormat.FOLDER:
        shards = _plan_folder(uri, rows_per_shard)
    else:
        shards = _plan_webdataset(uri, rows_per_shard)
    if not shards:
        raise ValueError(f"input {uri!r} holds no rows")
    return shards


def _ranges(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _plan_parquet(uri: str, rows_per_shard: int) -> list[Shard]:
    files = [f for f in storage.list_files(uri, suffix=".parquet")]
    shards = []
    for i, path in enumerate(files):
        fs, p = storage.resolve(path)
        rows = pq.ParquetFile(p, filesystem=fs).metadata.num_rows
        root = path.rsplit("/", 1)[0]
        for start, stop in _ranges(rows, rows_per_shard):
            shards.append(Shard(f"{i:05d}-{start:09d}", CorpusFormat.PARQUET.value, path, start, stop, root))
    return shards


def _folder_root(uri: str) -> str:
    """The folder as `storage.list_files` names its files: an absolute local path, or `scheme://path`."""
    fs, root = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return root
    return f"{os.fspath(uri).split('://', 1)[0]}://{root}"


def _folder_images(uri: str) -> list[str]:
    root = _folder_root(uri)
    files = storage.list_files(uri)
    return [f[len(root) :].lstrip("/") for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]


def _plan_folder(uri: str, rows_per_shard: int) -> list[Shard]:
    root = _folder_root(uri)
    n = len(_folder_images(uri))
    return [
        Shard(f"00000-{start:09d}", CorpusFormat.FOLDER.value, root, start, stop, root)
        for start, stop in _ranges(n, rows_per_shard)
    ]


def _tar_samples(path: str) -> dict[str, dict[str, tarfile.TarInfo]]:
    """Key -> {extension -> member} of a WebDataset tar (headers only; contents are not read)."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = PurePosixPath(member.name)
            if name.name.startswith("."):
                continue
            # WebDataset convention: key = path up to the first dot of the base name.
            base, _, ext = name.name.partition(".")
            key = str(name.parent / base) if str(name.parent) != "." else base
            samples.setdefault(key, {})[ext.lower()] = member
    return samples


def _plan_webdataset(uri: str, rows_per_shard: int) -> list[Shard]:
    shards = []
    for i, path in enumerate(storage.list_files(uri, suffix=".tar")):
        n = len(_tar_samples(path))
        for start, stop in _ranges(n, rows_per_shard):
            shards.append(Shard(f"{i:05d}-{start:09d}", CorpusFormat.WEBDATASET.value, path, start, stop))
    return shards


def read_shard(shard: Shard) -> pa.Table:
    """All rows of one shard as a table with `ROW_SCHEMA` columns first, then label columns (strings)."""
    fmt = CorpusFormat(shard.format)
    if fmt is CorpusFormat.PARQUET:
        rows = _read_parquet(shard)
    elif fmt is CorpusFormat.FOLDER:
        rows = _read_folder(shard)
    else:
        rows = _read_webdataset(shard)
    return _to_table(rows)


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    base = {name: [r.get(name) for r in rows] for name in ROW_SCHEMA.names}
    for r in rows:
        if r.get("sample_id") is None:
            locator = r["source"].encode()
            r["sample_id"] = content_id(r["image"] if r.get("image") else locator)
    base["sample_id"] = [r["sample_id"] for r in rows]
    label_names = sorted({k for r in rows for k in r if k not in ROW_SCHEMA.names})
    arrays = [pa.array(base[f.name], type=f.type) for f in ROW_SCHEMA]
    fields = list(ROW_SCHEMA)
    for name in label_names:
        values = [r.get(name) for r in rows]
        arrays.append(pa.array([None if v is None else str(v) for v in values], type=pa.string()))
        fields.append(pa.field(name, pa.string()))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _first(names: tuple[str, ...], available: list[str]) -> str | None:
    return next((n for n in names if n in available), None)


def _read_uri(uri: str, root: str) -> tuple[bytes | None, str | None]:
    """Bytes of an image path/URI (relative paths resolve against the Parquet file's folder)."""
    target = uri if "://" in uri or uri.startswith("/") else f"{root}/{uri}"
    try:
        return storage.read_bytes(target), None
    except (OSError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def shard_rows(pf: pq.ParquetFile, shard: Shard, columns: list[str] | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet shard, reading only the row groups that overlap them: memory stays
    one shard."""
    groups, first_row, offset = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset + n > shard.start and offset < shard.stop:
            groups.append(g)
            first_row = offset if first_row is None else first_row
        offset += n
    return pf.read_row_groups(groups, columns=columns).slice(shard.start - (first_row or 0), shard.rows)


def _read_parquet(shard: Shard) -> list[dict[str, Any]]:
    fs, path = storage.resolve(shard.path)
    pf = pq.ParquetFile(path, filesystem=fs)
    table = shard_rows(pf, shard)
    names = table.column_names
    id_col, img_col = _first(ID_COLUMNS, names), _first(IMAGE_COLUMNS, names)
    path_col, cap_col = _first(PATH_COLUMNS, names), _first(CAPTION_COLUMNS, names)
    if img_col is None and path_col is None:
        raise ValueError(
            f"Parquet file {shard.path!r} has no image column (one of {IMAGE_COLUMNS}) "
            f"and no path column (one of {PATH_COLUMNS}); columns: {names}"
        )
    used = {id_col, img_col, path_col, cap_col}
    label_cols = [
        n for n in names if n not in used and not n.startswith("_") and _is_scalar(table.schema.field(n).type)
    ]
    data = {n: table.column(n).to_pylist() for n in names if n in used or n in label_cols}
    rows = []
    for i in range(table.num_rows):
        row: dict[str, Any] = {"source": f"{shard.path}#{shard.start + i}", "read_error": None}
        row["sample_id"] = None if id_col is None or data[id_col][i] is None else str(data[id_col][i])
        image = data[img_col][i] if img_col else None
        if isinstance(image, dict):  # Hugging Face `Image` feature: struct<bytes, path>
            image = image.get("bytes") or None
            if image is None and image_path_of(data[img_col][i]):
                image, row["read_error"] = _read_uri(image_path_of(data[img_col][i]), shard.root)
        if image is None and path_col and data[path_col][i]:
            image, row["read_error"] = _read_uri(str(data[path_col][i]), shard.root)
            row["source"] = f"{shard.path}#{shard.start + i}:{data[path_col][i]}"
        row["image"] = image
        row["caption"] = data[cap_col][i] if cap_col else None
        for n in label_cols:
            row[n] = data[n][i]
        rows.append(row)
    return rows


def image_path_of(value: dict[str, Any]) -> str | None:
    path = value.get("path")
    return str(path) if path else None


def _is_scalar(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_integer(t)
        or pa.types.is_boolean(t)
    )


def _folder_captions(root: str) -> dict[str, dict[str, Any]]:
    """File name -> {caption, sample_id?, labels...} from `captions.jsonl` or `captions.csv`, if present."""
    out: dict[str, dict[str, Any]] = {}
    jsonl, csv_path = f"{root}/captions.jsonl", f"{root}/captions.csv"
    if storage.is_file(jsonl):
        for line_no, line in enumerate(storage.read_text(jsonl).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{jsonl}:{line_no} is not JSON: {exc}") from None
            if "file" not in record:
                raise ValueError(f"{jsonl}:{line_no} has no 'file' field")
            out[str(record.pop("file"))] = record
    elif storage.is_file(csv_path):
        for record in csv.DictReader(io.StringIO(storage.read_text(csv_path))):
            if "file" not in record:
                raise ValueError(f"{csv_path} has no 'file' column")
            out[str(record.pop("file"))] = dict(record)
    return out


def _read_folder(shard: Shard) -> list[dict[str, Any]]:
    files = _folder_images(shard.path)[shard.start : shard.stop]
    captions = _folder_captions(shard.root)
    rows = []
    for rel in files:
        full = f"{shard.root}/{rel}"
        image, error = _read_uri(full, shard.root)
        meta = dict(captions.get(rel, {}))
        caption = meta.pop("caption", None)
        if caption is None:
            stem = full.rsplit(".", 1)[0]
            for ext in CAPTION_EXTENSIONS:
                if storage.exists(stem + ext):
                    caption = storage.read_text(stem + ext).strip()
                    break
        row: dict[str, Any] = {"source": full, "read_error": error, "image": image, "caption": caption}
        row["sample_id"] = None if meta.get("sample_id") is None else str(meta.pop("sample_id"))
        meta.pop("sample_id", None)
        row.update({k: v for k, v in meta.items() if not isinstance(v, dict | list)})
        rows.append(row)
    return rows


def _read_webdataset(shard: Shard) -> list[dict[str, Any]]:
    samples = _tar_samples(shard.path)
    keys = sorted(samples)[shard.start : shard.stop]
    fs, p = storage.resolve(shard.path)
    rows = []
    with fs.open_input_file(p) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for key in keys:
            members = samples[key]

            def read(ext: str, members: dict[str, tarfile.TarInfo] = members) -> bytes:
                handle = tar.extractfile(members[ext])
                return handle.read() if handle is not None else b""

            row: dict[str, Any] = {"source": f"{shard.path}:{key}", "read_error": None, "sample_id": key}
            image_ext = next((e for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
            row["image"] = read(image_ext) if image_ext else None
            if image_ext is None:
                row["read_error"] = f"no image member for key {key!r} (members: {sorted(members)})"
            caption_ext = next((e for e in ("txt", "caption") if e in members), None)
            row["caption"] = read(caption_ext).decode("utf-8", "replace").strip() if caption_ext else None
            if "json" in members:
                try:
                    meta = json.loads(read("json"))
                except json.JSONDecodeError:
                    meta = {}
                if isinstance(meta, dict):
                    if meta.get("sample_id") is not None:
                        row["sample_id"] = str(meta.pop("sample_id"))
                    if row["caption"] is None and meta.get("caption") is not None:
                        row["caption"] = str(meta.pop("caption"))
                    meta.pop("caption", None)
                    row.update({k: v for k, v in meta.items() if not isinstance(v, dict | list)})
            if "cls" in members:
                row["cls"] = read("cls").decode("utf-8", "replace").strip()
            rows.append(row)
    return rows


def shard_ids(shard: Shard) -> list[str]:
    """The sample ids of a shard's rows, in row order, exactly as `read_shard` gives them.

    Reads only the ids where the input names them all (a Parquet id column, `sample_id` in a folder's
    captions file, WebDataset keys and `.json` members); otherwise, where some ids are content hashes,
    the whole shard.
    """
    fmt = CorpusFormat(shard.format)
    if fmt is CorpusFormat.PARQUET:
        fs, path = storage.resolve(shard.path)
        pf = pq.ParquetFile(path, filesystem=fs)
        id_col = _first(ID_COLUMNS, pf.schema_arrow.names)
        if id_col is not None:
            values = shard_rows(pf, shard, [id_col]).column(id_col).to_pylist()
            if None not in values:
                return [str(v) for v in values]
    elif fmt is CorpusFormat.FOLDER:
        captions = _folder_captions(shard.root)
        given = [
            captions.get(rel, {}).get("sample_id")
            for rel in _folder_images(shard.path)[shard.start : shard.stop]
        ]
        if None not in given:
            return [str(v) for v in given]
    else:
        ids = _webdataset_ids(shard)
        if ids is not None:
            return ids
    return [str(v) for v in read_shard(shard).column("sample_id").to_pylist()]


def _webdataset_ids(shard: Shard) -> list[str] | None:
    """Keys, or the `sample_id` of a `.json` member (read alone), as `_read_webdataset` decides them; None
    when a `.json` member sets `sample_id` to null (the row's id is then a content hash)."""
    samples = _tar_samples(shard.path)
    keys = sorted(samples)[shard.start : shard.stop]
    if not any("json" in samples[k] for k in keys):
        return keys
    fs, p = storage.resolve(shard.path)
    ids = []
    with fs.open_input_file(p) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for key in keys:
            meta: Any = {}
            if "json" in samples[key]:
                handle = tar.extractfile(samples[key]["json"])
                try:
                    meta = json.loads(handle.read() if handle is not None else b"")
                except json.JSONDecodeError:
                    meta = {}
            if isinstance(meta, dict) and "sample_id" in meta and meta["sample_id"] is None:
                return None
            ids.append(str(meta["sample_id"]) if isinstance(meta, dict) and "sample_id" in meta else key)
    return ids


def count_rows(shards: list[Shard]) -> int:
    return sum(s.rows for s in shards)


def os_path(uri: str) -> str:
    """Local path of a URI (for tools that need one); `uri` unchanged for remote filesystems."""
    fs, path = storage.resolve(uri)
    return path if isinstance(fs, pafs.LocalFileSystem) else os.fspath(uri)


def _parquet_images(path: str, rows: set[int]) -> dict[int, bytes | None]:
    """Image bytes of the given row indices of one Parquet file, reading only their row groups."""
    fs, p = storage.resolve(path)
    pf = pq.ParquetFile(p, filesystem=fs)
    names = pf.schema_arrow.names
    img_col, path_col = _first(IMAGE_COLUMNS, names), _first(PATH_COLUMNS, names)
    root = path.rstrip("/").rsplit("/", 1)[0]
    found: dict[int, bytes | None] = {}
    offset = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        wanted = sorted(r - offset for r in rows if offset <= r < offset + n)
        offset += n
        if not wanted:
            continue
        table = pf.read_row_group(g, columns=[c for c in (img_col, path_col) if c]).take(wanted)
        for local, row in zip(wanted, table.to_pylist(), strict=True):
            image = row.get(img_col) if img_col else None
            if isinstance(image, dict):  # Hugging Face `Image` feature: struct<bytes, path>
                image = image.get("bytes") or (
                    _read_uri(image_path_of(image), root)[0] if image_path_of(image) else None
                )
            if image is None and path_col and row.get(path_col):
                image = _read_uri(str(row[path_col]), root)[0]
            found[local + offset - n] = image
    return found


def read_images(sources: list[str]) -> dict[str, bytes]:
    """Image bytes at row locations as `embed` records them (its `source` column), reading only those rows.

    `file.parquet#ROW[:path]` (a Parquet row), `shard.tar:KEY` (a WebDataset sample) or a file path/URI.
    Raises ValueError naming the first location whose image cannot be read.
    """
    out: dict[str, bytes] = {}
    parquet: dict[str, dict[int, str]] = {}
    tars: dict[str, dict[str, str]] = {}
    for source in dict.fromkeys(sources):
        if "#" in source:
            path, _, rest = source.rpartition("#")
            parquet.setdefault(path, {})[int(rest.partition(":")[0])] = source
        elif ".tar:" in source:
            path, _, key = source.partition(".tar:")
            tars.setdefault(path + ".tar", {})[key] = source
        else:
            image, error = _read_uri(source, "")
            if image is None:
                raise ValueError(f"cannot read the image at {source!r}: {error}")
            out[source] = image
    for path, rows in parquet.items():
        images = _parquet_images(path, set(rows))
        for row, source in rows.items():
            if not images.get(row):
                raise ValueError(f"no image bytes at {source!r}")
            out[source] = images[row]  # type: ignore[assignment]
    for path, keys in tars.items():
        samples = _tar_samples(path)
        fs, p = storage.resolve(path)
        with fs.open_input_file(p) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for key, source in keys.items():
                members = samples.get(key, {})
                ext = next((e for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
                handle = tar.extractfile(members[ext]) if ext else None
                if handle is None:
                    raise ValueError(f"no image member for {source!r}")
                out[source] = handle.read()
    return out
