"""Tensor files: named tensors plus a JSON header in one safetensors file, written through `storage`.

The header is stored as the string metadata entry `bayescurate`. Files are serialised in memory and
written with one atomic write, so they work on object stores as well as local disks; `save` returns the
SHA-256 of the bytes written, which artifacts record and `load` verifies.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch

from pipeline.io import storage

META_KEY = "bayescurate"


def save(uri: storage.PathLike, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> str:
    """Write `tensors` and `header` to `uri` atomically; returns the file's SHA-256."""
    from safetensors.torch import save as to_bytes

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = to_bytes(cpu, metadata={META_KEY: json.dumps(header, sort_keys=True, default=str)})
    storage.write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors byte string (8-byte little-endian length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("truncated safetensors header")
    header = json.loads(data[8 : 8 + length])
    return dict(header.get("__metadata__") or {})


def load(
    uri: storage.PathLike, *, sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, header) of a file written by `save`.

    `sha256`: the digest recorded when it was written; a mismatch raises ValueError naming the file.
    Unreadable files raise ValueError; a missing one FileNotFoundError.
    """
    from safetensors.torch import load as from_bytes

    where = str(uri)
    if not storage.is_file(uri):
        raise FileNotFoundError(f"tensor file {where!r} does not exist")
    data = storage.read_bytes(uri)
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ValueError(
                f"{where!r} is corrupt or was modified: its SHA-256 is {actual[:16]}..., "
                f"but {sha256[:16]}... was recorded when it was written"
            )
    try:
        meta = _metadata(data)
        tensors = from_bytes(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{where!r} is not a readable safetensors file: {exc}") from None
    raw = meta.get(META_KEY)
    if raw is None:
        raise ValueError(f"{where!r} has no bayescurate header")
    return tensors, json.loads(raw)
