"""Curated picks -> a data set a fine-tuning job reads: the chosen images as WebDataset tars or Parquet parts.

Shards are a pure function of the picks: `rows[i]` goes to shard `i // shard_size` (`shard-00000.tar`,
`part-00000.parquet`, ...), so a rerun plans the same shards. Each shard is written atomically, then a marker
`_materialize/<shard>.json` (its row count and the images that could not be used); a rerun skips a shard whose
file and marker both exist. `_materialize/manifest.json`, written before any shard, fingerprints the whole
plan, and a rerun with other picks, format or shard size into the same folder is refused: skipping the
finished shards of another plan would mix two selections and could write a row twice. The underscore keeps
the markers out of Parquet dataset readers; `sources.plan_shards` only lists `.tar`/`.parquet` files anyway.

Images are read one shard at a time (`sources.read_images`, bounded memory) and decode-checked with PIL. An
image that cannot be read, is not an image, or is in a format WebDataset readers do not know by extension
goes to `missing` with the reason instead of into a shard, in both formats alike, so the same picks always
give the same rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pyarrow as pa
from PIL import Image

from pipeline.data.quarantine import Reason
from pipeline.data.sources import read_images
from pipeline.io import storage

MARKER_DIR = "_materialize"
# PIL format -> the extension written; these are the image extensions `sources` (and WebDataset's decoders)
# recognise. MPO is how PIL names multi-picture JPEGs, as many phone cameras write them.
EXTENSIONS: dict[str, str] = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
}
KEY_MAX = 128  # characters of a WebDataset key: extracting a tar needs names well under 255 bytes
RESERVED = ("sample_id", "source", "caption")  # row fields that are not metadata
CLASHING = ("image", "read_error")  # metadata names that would overwrite a column of the output / reader
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# What `read_images` raises for a location it cannot read: its own ValueError, a missing or unreadable file
# (OSError, Arrow's IO errors), a corrupt tar or Parquet file.
_READ_ERRORS = (OSError, ValueError, tarfile.TarError, pa.ArrowException)


class MaterializeFormat(str, Enum):
    """Layout of a materialized data set."""

    WEBDATASET = "webdataset"
    """Tar shards `shard-NNNNN.tar`: `<key>.<ext>` image bytes, `<key>.txt` caption (when any), `<key>.json`
    with the original `sample_id` and the metadata."""
    PARQUET = "parquet"
    """Parquet parts `part-NNNNN.parquet`: `sample_id`, `image` (binary), `caption`, one column per metadata
    field."""

    def shard_name(self, index: int) -> str:
        return (
            f"shard-{index:05d}.tar" if self is MaterializeFormat.WEBDATASET else f"part-{index:05d}.parquet"
        )


@dataclass(frozen=True)
class MaterializeResult:
    """What `materialize` produced (the same on a rerun that skipped finished shards)."""

    files: list[str]  # every shard, in shard order: rows[i] is in files[i // shard_size] unless missing
    rows: int  # rows written, over all shards
    missing: dict[str, str]  # sample_id -> why its image could not be used (it is in no shard), rank order


@dataclass(frozen=True)
class _Pick:
    sample_id: str
    source: str  # the image location as `embed` records it, readable by `read_images`
    caption: str | None
    meta: dict[str, Any]  # scalar metadata: None, bool, int, float or str


def webdataset_key(sample_id: str) -> str:
    """A WebDataset key for `sample_id`: no dots (a key ends at the first dot) or slashes (a key would become
    a folder). Ids that need changing get a hash of the original appended, so "a/b.png" and "a_b.png" stay
    apart; safe ids are kept as they are."""
    safe = _UNSAFE.sub("_", sample_id)
    if safe == sample_id and len(safe) <= KEY_MAX:
        return safe
    return f"{safe[: KEY_MAX - 13]}-{hashlib.sha256(sample_id.encode()).hexdigest()[:12]}"


def materialize(
    rows: Sequence[Mapping[str, Any]], out: str, fmt: MaterializeFormat | str, *, shard_size: int = 1000
) -> MaterializeResult:
    """Write the images of `rows` (curated picks in rank order) under `out` (local path or URI) in `fmt`.

    Each row has `sample_id` and `source`, optionally `caption`, and any scalar metadata (rank, score,
    predicted, ...), which goes into the `.json` member or into columns. Resumable: finished shards are
    skipped, so a crashed run is completed by running it again.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    try:
        fmt = MaterializeFormat(fmt)
    except ValueError:
        choices = [f.value for f in MaterializeFormat]
        raise ValueError(f"unknown materialize format {fmt!r}; choose one of {choices}") from None
    picks = _picks(rows)
    keys = _keys(picks) if fmt is MaterializeFormat.WEBDATASET else {}
    schema = _schema(picks)  # for both formats, so that both accept the same picks
    chunks = [picks[start : start + shard_size] for start in range(0, len(picks), shard_size)]
    fingerprints = [_fingerprint(fmt, chunk, schema) for chunk in chunks]
    _claim(out, fmt, shard_size, len(picks), fingerprints)

    files: list[str] = []
    missing: dict[str, str] = {}
    written = 0
    for index, (chunk, fingerprint) in enumerate(zip(chunks, fingerprints, strict=True)):
        name = fmt.shard_name(index)
        path, marker = storage.join(out, name), storage.join(out, MARKER_DIR, f"{name}.json")
        done = _finished(path, marker, fingerprint)
        if done is None:
            done = {"fingerprint": fingerprint, **_write_shard(fmt, chunk, path, keys, schema)}
            storage.write_json(marker, done)
        files.append(path)
        written += int(done["rows"])
        missing.update(done["missing"])
    return MaterializeResult(files, written, missing)


# --------------------------------------------------------------------------------------- validating picks


def _picks(rows: Sequence[Mapping[str, Any]]) -> list[_Pick]:
    """The rows as picks, checked at the boundary: ids present and unique, a source, scalar metadata."""
    picks: list[_Pick] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        raw_id = row.get("sample_id")
        sample_id = "" if raw_id is None else str(raw_id)
        if not sample_id:
            raise ValueError(f"rows[{i}] has an empty sample_id ({raw_id!r})")
        if sample_id in seen:
            raise ValueError(f"sample_id {sample_id!r} appears twice (rows[{seen[sample_id]}] and rows[{i}])")
        seen[sample_id] = i
        source = row.get("source")
        if not isinstance(source, str) or not source:
            raise ValueError(f"rows[{i}] (sample_id {sample_id!r}) has no image source (got {source!r})")
        caption = row.get("caption")
        if caption is not None and not (isinstance(caption, float) and math.isnan(caption)):
            caption = str(caption)
        else:
            caption = None  # NaN: a null that crossed pandas
        meta = {}
        for name, value in row.items():
            if name in RESERVED:
                continue
            if name in CLASHING:
                raise ValueError(
                    f"rows[{i}] (sample_id {sample_id!r}) has a field {name!r}, which would clash with the "
                    f"{name!r} column of the output; rename it"
                )
            meta[name] = _scalar(value, name, sample_id)
        picks.append(_Pick(sample_id, source, caption, meta))
    return picks


def _scalar(value: Any, name: str, sample_id: str) -> Any:
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy / torch scalars
        value = value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise ValueError(
        f"metadata {name!r} of sample {sample_id!r} is a {type(value).__name__}, not a scalar "
        "(None, bool, int, float or str)"
    )


def _keys(picks: list[_Pick]) -> dict[str, str]:
    keys: dict[str, str] = {}
    owner: dict[str, str] = {}
    for pick in picks:
        key = webdataset_key(pick.sample_id)
        if key in owner:  # only a crafted id can hit this: a safe id that looks like another's key + hash
            raise ValueError(f"sample ids {owner[key]!r} and {pick.sample_id!r} map to the same key {key!r}")
        owner[key] = pick.sample_id
        keys[pick.sample_id] = key
    return keys


def _schema(picks: list[_Pick]) -> pa.Schema:
    """One schema for every part (metadata columns in first-seen order), typed from all picks, so parts of
    the same data set concatenate."""
    fields = [
        pa.field("sample_id", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("caption", pa.string()),
    ]
    for name in dict.fromkeys(name for pick in picks for name in pick.meta):
        kinds = {type(p.meta[name]) for p in picks if p.meta.get(name) is not None}
        fields.append(pa.field(name, _arrow_type(name, kinds)))
    return pa.schema(fields)


def _arrow_type(name: str, kinds: set[type]) -> pa.DataType:
    if not kinds or kinds == {str}:
        return pa.string()
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    found = sorted(k.__name__ for k in kinds)
    raise ValueError(f"metadata {name!r} mixes value types {found}; give it one type")


# ------------------------------------------------------------------------------------------ resumability


def _fingerprint(fmt: MaterializeFormat, chunk: list[_Pick], schema: pa.Schema) -> str:
    """Hash of everything that decides a shard's bytes (bar the images themselves, named by their source);
    a Parquet part's column types depend on the other parts' rows too."""
    plan = {
        "format": fmt.value,
        "schema": schema.to_string() if fmt is MaterializeFormat.PARQUET else None,
        "rows": [[p.sample_id, p.source, p.caption, p.meta] for p in chunk],
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def _claim(out: str, fmt: MaterializeFormat, shard_size: int, rows: int, fingerprints: list[str]) -> None:
    """Write the plan's manifest, or check that `out` already holds this very plan."""
    manifest = {"format": fmt.value, "shard_size": shard_size, "rows": rows, "shards": fingerprints}
    path = storage.join(out, MARKER_DIR, "manifest.json")
    if not storage.is_file(path):
        storage.write_json(path, manifest)
        return
    found = storage.read_json(path)
    if found == manifest:
        return
    if not isinstance(found, dict):
        found = {}
    diffs = [
        f"{k} {found.get(k)!r} != {manifest[k]!r}"
        for k in ("format", "shard_size", "rows")
        if found.get(k) != manifest[k]
    ]
    if not diffs:
        old = found.get("shards") or []
        index = next((i for i, f in enumerate(fingerprints) if i >= len(old) or old[i] != f), None)
        diffs = [f"the rows of shard {index} differ" if index is not None else "its manifest differs"]
    raise ValueError(
        f"{out!r} already holds another materialization ({'; '.join(diffs)}); "
        "write to a new folder or remove the old one"
    )


def _finished(path: str, marker: str, fingerprint: str) -> dict[str, Any] | None:
    """The marker of a finished shard, or None when it has to be (re)written."""
    if not (storage.is_file(path) and storage.is_file(marker)):
        return None
    done = storage.read_json(marker)
    return done if isinstance(done, dict) and done.get("fingerprint") == fingerprint else None


# ---------------------------------------------------------------------------------------- writing shards


def _write_shard(
    fmt: MaterializeFormat, chunk: list[_Pick], path: str, keys: dict[str, str], schema: pa.Schema
) -> dict[str, Any]:
    """Read, check and write one shard's images; its row count and missing images, for the marker."""
    images, missing = _load(chunk)
    kept = [p for p in chunk if p.sample_id in images]
    if fmt is MaterializeFormat.WEBDATASET:
        _write_tar(path, kept, images, keys)
    else:
        _write_parquet(path, kept, images, schema)
    return {"rows": len(kept), "missing": missing}


def _load(chunk: list[_Pick]) -> tuple[dict[str, tuple[bytes, str]], dict[str, str]]:
    """sample_id -> (image bytes, extension) for the usable images; sample_id -> reason for the others."""
    found, errors = _read(list(dict.fromkeys(p.source for p in chunk)))
    images: dict[str, tuple[bytes, str]] = {}
    missing: dict[str, str] = {}
    for pick in chunk:
        if pick.source in errors:
            missing[pick.sample_id] = errors[pick.source]
            continue
        ext, problem = _check_image(found[pick.source])
        if problem:
            missing[pick.sample_id] = problem
        else:
            images[pick.sample_id] = (found[pick.source], ext)
    return images, missing


def _read(sources: list[str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """Image bytes per source, and the reason per source that cannot be read.

    `read_images` stops at the first bad location, so a failing batch is halved until the bad ones stand
    alone: k bad images cost O(k log n) batch reads rather than one read per image.
    """
    try:
        return read_images(sources), {}
    except _READ_ERRORS as exc:
        if len(sources) == 1:
            return {}, {sources[0]: f"{Reason.UNREADABLE.value}: {type(exc).__name__}: {exc}"[:500]}
    mid = len(sources) // 2
    first, first_errors = _read(sources[:mid])
    second, second_errors = _read(sources[mid:])
    return first | second, first_errors | second_errors


def _check_image(data: bytes) -> tuple[str, str]:
    """(extension, "") for bytes PIL fully decodes in a known format, else ("", reason)."""
    if not data:
        return "", f"{Reason.EMPTY.value}: no image bytes"
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
            image.load()  # the header alone does not catch a truncated file
    except Image.DecompressionBombError as exc:
        return "", f"{Reason.ABSURD_SIZE.value}: {exc}"[:500]
    except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for bytes that are not an image
        return "", f"{Reason.UNDECODABLE.value}: {type(exc).__name__}: {exc}"[:500]
    if kind not in EXTENSIONS:
        known = sorted(set(EXTENSIONS))
        return "", f"unsupported_format: the image is {kind!r}, not one of {known}"
    return EXTENSIONS[kind], ""


def _json_value(value: Any) -> Any:
    """Strict JSON has no NaN or infinity: those become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _write_tar(
    path: str, kept: list[_Pick], images: dict[str, tuple[bytes, str]], keys: dict[str, str]
) -> None:
    """Members in rank order; fixed mode and mtime, so the same picks give the same bytes."""
    with (
        storage.atomic_output(path) as out,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for pick in kept:
            data, ext = images[pick.sample_id]
            meta = {name: _json_value(value) for name, value in pick.meta.items()}
            members = [(ext, data)]
            if pick.caption is not None:
                members.append(("txt", pick.caption.encode("utf-8")))
            members.append(
                ("json", json.dumps({**meta, "sample_id": pick.sample_id}, sort_keys=True).encode())
            )
            for member_ext, payload in members:
                info = tarfile.TarInfo(f"{keys[pick.sample_id]}.{member_ext}")
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                tar.addfile(info, io.BytesIO(payload))


def _write_parquet(
    path: str, kept: list[_Pick], images: dict[str, tuple[bytes, str]], schema: pa.Schema
) -> None:
    columns: dict[str, list[Any]] = {
        "sample_id": [p.sample_id for p in kept],
        "image": [images[p.sample_id][0] for p in kept],
        "caption": [p.caption for p in kept],
    }
    for name in schema.names[3:]:
        columns[name] = [p.meta.get(name) for p in kept]
    storage.write_parquet(pa.Table.from_pydict(columns, schema=schema), path)
