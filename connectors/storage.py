"""Paths and URIs through `pyarrow.fs`: local paths now, `s3://` / `gs://` URIs for users, atomic writes.

Every writer goes through `_atomic_output`: the bytes land in a temporary sibling first and are renamed
into place, so a reader never sees half a file and a killed job leaves no partial output behind. Object
stores have no rename; there a single PUT is already atomic, so the file is written directly.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PathLike = str | os.PathLike[str]


def resolve(uri: PathLike) -> tuple[pafs.FileSystem, str]:
    """Filesystem and in-filesystem path for a local path, `file://` URI or any pyarrow URI (s3, gs, hdfs)."""
    text = os.fspath(uri)
    if not text:
        raise ValueError("empty path or URI")
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"cannot open URI {text!r}: {exc}") from None


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""


def exists(uri: PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: PathLike) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def remove(uri: PathLike) -> None:
    """Delete a file or a directory tree; a missing path is not an error."""
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: PathLike, suffix: str = "", recursive: bool = True) -> list[str]:
    """Sorted paths of the files under `uri` whose name ends with `suffix` (same scheme as `uri`)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{os.fspath(uri)!r} does not exist")
    if info.type == pafs.FileType.File:
        return [os.fspath(uri)] if info.path.endswith(suffix) else []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    found = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and not i.base_name.startswith(".")
    )
    text = os.fspath(uri)
    if "://" in text and not _is_local(fs):
        scheme = text.split("://", 1)[0]
        return [f"{scheme}://{p}" for p in found]
    return found


@contextmanager
def _atomic_output(uri: PathLike) -> Iterator[BinaryIO]:
    """Writable stream that becomes visible at `uri` only when the block exits without an error."""
    fs, path = resolve(uri)
    parent = _parent(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if not _is_local(fs):
        with fs.open_output_stream(path) as out:
            yield out  # type: ignore[misc]
        return
    tmp = f"{parent}/.{Path(path).name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(uri: PathLike, data: bytes) -> None:
    with _atomic_output(uri) as out:
        out.write(data)


def read_bytes(uri: PathLike) -> bytes:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{os.fspath(uri)!r} is not a file")
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_text(uri: PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_text(uri: PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def write_json(uri: PathLike, obj: Any, *, indent: int | None = 2) -> None:
    write_text(uri, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


def read_json(uri: PathLike) -> Any:
    return json.loads(read_text(uri))


def write_parquet(table: pa.Table, uri: PathLike, **kwargs: Any) -> None:
    """Write one Parquet file atomically; `kwargs` go to `pyarrow.parquet.write_table`."""
    with _atomic_output(uri) as out:
        pq.write_table(table, out, **kwargs)


def read_parquet(uri: PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file or a directory of Parquet files (hidden and temporary files skipped)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{os.fspath(uri)!r} does not exist")
    return pq.read_table(path, filesystem=fs, columns=columns)
