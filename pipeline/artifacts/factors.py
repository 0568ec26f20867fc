"""KFAC factor files: one safetensors file per tower (tensors `A`, `B`, the `KronFactors` header)."""

from __future__ import annotations

from typing import Any

from pipeline.bayes.kron import KronFactors
from pipeline.io import storage, tensors


def save_factors(path: storage.PathLike, factors: KronFactors) -> str:
    """Write `factors` atomically to `path`; returns the file's SHA-256."""
    return tensors.save(path, factors.tensors(), factors.header())


def load_factors(
    path: storage.PathLike, expect: dict[str, Any] | None = None, *, sha256: str | None = None
) -> KronFactors:
    """Read factors written by `save_factors`; `expect` and `sha256` as in `KronFactors.from_tensors` and
    `pipeline.io.tensors.load`."""
    if not storage.is_file(path):
        raise FileNotFoundError(f"KFAC factors file {str(path)!r} does not exist")
    found, header = tensors.load(path, sha256=sha256)
    return KronFactors.from_tensors(found, header, expect=expect, where=str(path))
