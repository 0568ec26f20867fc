"""The one place that writes: paths and URIs through `pyarrow.fs`, every write atomic.

Local paths, `file://`, `s3://` and `gs://` URIs all go through here. A reader never sees half a file and a
killed job leaves no partial output: locally the bytes land in a temporary sibling and are renamed into
place (`os.replace`); object stores have no rename, but a PUT is atomic (the object appears whole or not at
all), so there the bytes are buffered and sent in one upload only when the write completed without an
error. `local_target` gives tools that need a real filename (sqlite, matplotlib) the same guarantee.

Object stores are configured the way the AWS SDKs are, from the environment, so pyarrow (the data path)
and boto3 (the conditional writes below) always talk to the same store: `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`) for an S3-compatible server such as MinIO or Ceph (`http://host:9000`; its scheme
picks http or https), `AWS_REGION`, and the credentials (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`,
a profile or an instance role). With an endpoint set, both use path-style addressing.

Leases need writes that fail when someone else got there first: `create_exclusive` (create only if absent:
a hard link locally, `If-None-Match: *` on S3), and on S3 `read_versioned`, `conditional_put` and
`conditional_delete`, which compare the object's ETag (`If-Match`). pyarrow cannot send those headers,
so they go through boto3.

Every completed write passes `faults.checkpoint`, so crash tests can kill a process between any two writes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.io import faults

PathLike = str | os.PathLike[str]
BUCKET_SCHEMES = ("s3", "gs", "gcs")  # `scheme://bucket/key` stores whose filesystem is shared per bucket


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(root: str, settings: tuple[str | None, ...]) -> pafs.FileSystem:
    """The filesystem of `scheme://bucket`, made once per process and store settings (an S3 client costs
    ~40 ms to build); `settings` (endpoint, region, key id from the environment) only keys the cache."""
    return pafs.FileSystem.from_uri(root)[0]


def _store_settings() -> tuple[str | None, ...]:
    names = (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
    )
    return tuple(os.environ.get(name) for name in names)


def resolve(uri: PathLike) -> tuple[pafs.FileSystem, str]:
    """Filesystem and in-filesystem path for a local path, `file://` URI or any pyarrow URI (s3, gs, hdfs)."""
    text = os.fspath(uri)
    if not text:
        raise ValueError("empty path or URI")
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    scheme, _, rest = text.partition("://")
    try:
        if scheme in BUCKET_SCHEMES and "?" not in rest and rest.strip("/"):
            path = "/".join(part for part in rest.split("/") if part)
            return _bucket_filesystem(f"{scheme}://{path.split('/', 1)[0]}", _store_settings()), path
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"cannot open URI {text!r}: {exc}") from None


def is_local(uri: PathLike) -> bool:
    """True for plain paths and `file://` URIs."""
    return isinstance(resolve(uri)[0], pafs.LocalFileSystem)


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` for paths and URIs alike (never drops the scheme, unlike `os.path.join`)."""
    out = os.fspath(base).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""


def exists(uri: PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


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
    """Sorted paths of the files under `uri` whose name ends with `suffix` (same scheme as `uri`).

    Hidden files (leading dot: temporaries of in-flight writes) are never listed.
    """
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
    if "://" in text and not isinstance(fs, pafs.LocalFileSystem):
        scheme = text.split("://", 1)[0]
        return [f"{scheme}://{p}" for p in found]
    return found


def _temp_sibling(path: str) -> str:
    return f"{_parent(path)}/.{Path(path).name}.{uuid.uuid4().hex}.tmp"


@contextmanager
def local_target(path: PathLike, *, private: bool = False) -> Iterator[Path]:
    """A temporary local file that replaces `path` when the block exits without an error.

    For tools that write by filename. `private`: created 0600, never readable by others in between.
    """
    target = Path(path).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(_temp_sibling(str(target)))
    try:
        if private:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    faults.checkpoint(str(target))


@contextmanager
def atomic_output(uri: PathLike, *, private: bool = False) -> Iterator[BinaryIO]:
    """Writable stream that becomes visible at `uri` only when the block exits without an error."""
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        if private:
            raise ValueError(f"cannot write a private (0600) file to an object store: {os.fspath(uri)!r}")
        # Buffered: closing pyarrow's stream completes the upload even when the block raised, which would
        # publish a partial object. Only a block that finished sends its bytes, in one upload.
        buffer = io.BytesIO()
        yield buffer
        parent = _parent(path)
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(buffer.getbuffer())
        faults.checkpoint(os.fspath(uri))
        return
    with local_target(path, private=private) as tmp, open(tmp, "wb") as out:
        yield out


def write_bytes(uri: PathLike, data: bytes, *, private: bool = False) -> None:
    with atomic_output(uri, private=private) as out:
        out.write(data)


def read_bytes(uri: PathLike) -> bytes:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{os.fspath(uri)!r} is not a file")
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_text(uri: PathLike, text: str, *, private: bool = False) -> None:
    write_bytes(uri, text.encode("utf-8"), private=private)


def read_text(uri: PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def write_json(uri: PathLike, obj: Any, *, indent: int | None = 2, private: bool = False) -> None:
    write_text(uri, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n", private=private)


def read_json(uri: PathLike) -> Any:
    return json.loads(read_text(uri))


def write_parquet(table: pa.Table, uri: PathLike, **kwargs: Any) -> None:
    """Write one Parquet file atomically; `kwargs` go to `pyarrow.parquet.write_table`."""
    with atomic_output(uri) as out:
        pq.write_table(table, out, **kwargs)


def read_parquet(uri: PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file or a directory of Parquet files (hidden and temporary files skipped)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{os.fspath(uri)!r} does not exist")
    return pq.read_table(path, filesystem=fs, columns=columns)


def sha256(uri: PathLike) -> str:
    """Hex SHA-256 of a file's bytes, streamed."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{os.fspath(uri)!r} is not a file")
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def create_exclusive(uri: PathLike, data: bytes) -> bool:
    """Write `data` at `uri` only if nothing is there; True if this call created it.

    Locally the complete file is written aside and hard-linked into place, which fails if the name exists,
    so two racing callers cannot both win and nobody sees a half-written file. On S3 it is one PUT with
    `If-None-Match: *`, which the store decides atomically.
    """
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        return conditional_put(uri, data) is not None
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(_temp_sibling(str(target)))
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    faults.checkpoint(str(target))
    return True


# ------------------------------------------------------------------------ conditional writes (S3, boto3)


@dataclass(frozen=True)
class Versioned:
    """An object's bytes with what a conditional write compares against."""

    data: bytes
    etag: str  # the store's entity tag of exactly these bytes (quotes included, as the store sends it)
    age_s: float  # seconds since it was last written, on the store's clock (Date minus Last-Modified, 1 s)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=8)
def _s3_client_for(endpoint: str | None, region: str | None, key_id: str | None) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise RuntimeError(
            "leases and other conditional writes on s3:// need boto3: pip install boto3"
        ) from None
    # Path-style addressing for a custom endpoint, as pyarrow does: MinIO and Ceph need no wildcard DNS.
    config = Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}) if endpoint else None
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _s3(uri: PathLike) -> tuple[Any, str, str]:
    """(boto3 client, bucket, key) of an s3:// URI; the client is configured from the environment."""
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.S3FileSystem):
        raise NotImplementedError(
            f"conditional writes need a local path or an s3:// URI (S3, MinIO, Ceph), got {os.fspath(uri)!r}"
        )
    bucket, _, key = path.partition("/")
    if not key:
        raise ValueError(f"{os.fspath(uri)!r} names a bucket, not an object")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or fs.region or None
    return _s3_client_for(_endpoint(), region, os.environ.get("AWS_ACCESS_KEY_ID")), bucket, key


def _error_code(exc: Exception) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _lost_race(exc: Exception) -> bool:
    """True when a conditional request failed because the object is not (or no longer) as expected."""
    code, status = _error_code(exc)
    return status in (404, 409, 412) or code in (
        "PreconditionFailed",
        "ConditionalRequestConflict",
        "NoSuchKey",
        "NotFound",
    )


def _unsupported(exc: Exception, uri: PathLike, what: str) -> NotImplementedError | None:
    code, status = _error_code(exc)
    if status == 501 or code in ("NotImplemented", "InvalidArgument"):
        return NotImplementedError(
            f"the object store at {_endpoint() or 'AWS S3'} refused a conditional {what} on "
            f"{os.fspath(uri)!r} ({code or status}): leases need a store with S3 conditional writes"
        )
    return None


def read_versioned(uri: PathLike) -> Versioned | None:
    """The object at s3 `uri` with its ETag and age on the store's clock; None when there is none."""
    client, bucket, key = _s3(uri)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _error_code(exc)[1] == 404 or _error_code(exc)[0] in ("NoSuchKey", "NotFound"):
            return None
        raise OSError(f"cannot read {os.fspath(uri)!r}: {exc}") from None
    except BotoCoreError as exc:  # no connection, bad credentials, timeouts
        raise OSError(f"cannot read {os.fspath(uri)!r}: {exc}") from None
    data = response["Body"].read()
    now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
    age = max(0.0, (now - response["LastModified"]).total_seconds())
    return Versioned(data, str(response["ETag"]), age)


def conditional_put(uri: PathLike, data: bytes, *, if_match: str | None = None) -> str | None:
    """One PUT of `data` at s3 `uri` that the store applies only if its condition holds.

    `if_match` None: only if no object is there (`If-None-Match: *`); else only if the object's ETag is
    `if_match` (`If-Match`: nobody replaced it since it was read). Returns the new ETag, or None when the
    condition failed (someone else won). Raises NotImplementedError for a store without conditional writes.
    """
    client, bucket, key = _s3(uri)
    from botocore.exceptions import BotoCoreError, ClientError

    condition = {"IfNoneMatch": "*"} if if_match is None else {"IfMatch": if_match}
    try:
        response = client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except ClientError as exc:
        if (unsupported := _unsupported(exc, uri, "PUT")) is not None:
            raise unsupported from None
        if _lost_race(exc):
            return None
        raise OSError(f"cannot write {os.fspath(uri)!r}: {exc}") from None
    except BotoCoreError as exc:
        raise OSError(f"cannot write {os.fspath(uri)!r}: {exc}") from None
    faults.checkpoint(os.fspath(uri))
    return str(response["ETag"])


def conditional_delete(uri: PathLike, etag: str) -> bool:
    """Delete the object at s3 `uri` only if its ETag is still `etag`; False when it changed or is gone.

    Raises NotImplementedError where the store does not support `If-Match` on DELETE.
    """
    client, bucket, key = _s3(uri)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
    except ClientError as exc:
        if (unsupported := _unsupported(exc, uri, "DELETE")) is not None:
            raise unsupported from None
        if _lost_race(exc):
            return False
        raise OSError(f"cannot delete {os.fspath(uri)!r}: {exc}") from None
    except BotoCoreError as exc:
        raise OSError(f"cannot delete {os.fspath(uri)!r}: {exc}") from None
    faults.checkpoint(os.fspath(uri))
    return True


def rename(src: PathLike, dst: PathLike) -> bool:
    """Move a file to a new name on the same filesystem; False if `src` was already gone (lost a race)."""
    fs, src_path = resolve(src)
    _, dst_path = resolve(dst)
    try:
        fs.move(src_path, dst_path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if fs.get_file_info(src_path).type == pafs.FileType.NotFound:
            return False
        raise exc
    return True


class FileLock:
    """An exclusive `flock` on a local file, held until `release()`; the file holds the owner's note."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def release(self) -> None:
        """Clear the owner's note and unlock (a crashed owner's note stays, with its dead pid)."""
        import fcntl

        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.flush()
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def try_lock(uri: PathLike, note: str) -> tuple[FileLock | None, str]:
    """Take an exclusive lock on the local file `uri` without waiting.

    Returns (the lock, note) after writing `note` into the file, or (None, the holder's note) when another
    open file holds it. The kernel drops the lock when its process ends, however it ends.
    """
    import fcntl

    fs, path = resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise NotImplementedError(f"file locks need a local or mounted path, got {os.fspath(uri)!r}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held open for the lifetime of the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        held_by = handle.read()
        handle.close()
        return None, held_by
    handle.seek(0)
    handle.truncate()
    handle.write(note)
    handle.flush()
    faults.checkpoint(path)
    return FileLock(handle), note
