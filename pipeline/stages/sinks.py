"""Sinks: what happens to a complete shard on the driver. Each writes its outputs atomically, then the marker.

`EmbeddingSink`: `part-<shard>.parquet` (sample_id, mean [D], var [D], optional acts, passthrough columns;
file metadata names the posterior and model) + `quarantine/part-<shard>.parquet`.
`FactorSink`: `part-<shard>.{image,text}.safetensors` (KronFactors of the shard) + quarantine.
Markers carry the per-shard counts, so the final report (and the provenance) is the sum over markers.
Rows whose sample id an earlier row of the corpus carries (the plan's verdicts, `Ledger.repeats`) are
quarantined as duplicates by both sinks, so they reach neither the embeddings nor the factors.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.artifacts.factors import save_factors
from pipeline.data import quarantine
from pipeline.io import storage
from pipeline.io.vectors import vector_column
from pipeline.stages.base import ROW, SHARD, SHARD_ROWS, Batch, take
from pipeline.stages.decode import ERROR, OK, PIXELS, REASON
from pipeline.stages.embed import (
    ACTS,
    IMAGE_ACTS,
    IMAGE_EMB,
    IMAGE_OFFSET,
    MEAN,
    TEXT_ACTS,
    TEXT_EMB,
    TEXT_OFFSET,
    VAR,
)
from pipeline.stages.factors import factor_path, shard_factors
from pipeline.stages.shards import Ledger, Repeat

META_KEY = b"bayescurate"
INTERNAL = {
    SHARD,
    SHARD_ROWS,
    ROW,
    OK,
    REASON,
    ERROR,
    PIXELS,
    "image",
    "read_error",
    MEAN,
    VAR,
    ACTS,
    IMAGE_ACTS,
    IMAGE_EMB,
    IMAGE_OFFSET,
    TEXT_ACTS,
    TEXT_EMB,
    TEXT_OFFSET,
}


def split_verdicts(rows: Batch, repeats: Mapping[int, Repeat] | None = None) -> tuple[Batch, pa.Table]:
    """(usable rows, quarantine table) of one complete shard.

    Quarantined: rows a stage found unusable, and duplicates: the rows `repeats` names (by `ROW`: the
    plan's verdicts across shards and files) and any row whose sample id an earlier row of the shard has.
    The first occurrence wins whatever becomes of it, so a duplicate is quarantined as one even when it
    would not have decoded.
    """
    ok = np.asarray(rows[OK], dtype=bool).copy()
    reasons = [str(r) for r in rows[REASON]]
    errors = [str(e) for e in rows[ERROR]]
    ids = [str(s) for s in rows["sample_id"]]
    positions = np.asarray(rows[ROW], dtype=np.int64) if ROW in rows else np.arange(len(ids))
    repeats = repeats or {}
    seen: set[str] = set()
    for i, sid in enumerate(ids):
        repeat = repeats.get(int(positions[i]))
        if repeat is not None or sid in seen:
            ok[i], reasons[i] = False, quarantine.Reason.DUPLICATE.value
            errors[i] = repeat.note() if repeat is not None else f"sample id {sid!r} repeated in its shard"
        seen.add(sid)
    bad = np.flatnonzero(~ok)
    sources = rows.get("source", np.array([""] * len(ok), dtype=object))
    table = quarantine.table(
        [ids[i] for i in bad],
        [str(sources[i]) for i in bad],
        [reasons[i] for i in bad],
        [errors[i] for i in bad],
    )
    return take(rows, ok), table


def _string_column(values: np.ndarray) -> pa.Array:
    return pa.array([None if v is None else str(v) for v in values], pa.string())


class _QuarantiningSink:
    def __init__(self, out: str) -> None:
        self.out = out.rstrip("/")
        self.ledger = Ledger(self.out)

    def _quarantine(self, shard_id: str, table: pa.Table) -> dict[str, Any]:
        if table.num_rows:
            storage.write_parquet(table, f"{self.out}/quarantine/part-{shard_id}.parquet")
        return dict(Counter(table.column("reason").to_pylist()))


class EmbeddingSink(_QuarantiningSink):
    """Writes one embeddings Parquet per shard; `metadata` goes into the file's key-value metadata."""

    def __init__(self, out: str, metadata: dict[str, Any]) -> None:
        super().__init__(out)
        self.metadata = {META_KEY: json.dumps(metadata, sort_keys=True, default=str).encode()}

    def __call__(self, shard_id: str, rows: Batch) -> dict[str, Any]:
        good, bad = split_verdicts(rows, self.ledger.repeats(shard_id))
        columns: dict[str, pa.Array] = {"sample_id": _string_column(good["sample_id"])}
        for name in (MEAN, VAR, ACTS):
            if name in good:
                columns[name] = vector_column(good[name])
        for name, values in good.items():
            if name not in INTERNAL and name not in columns and not name.startswith("_"):
                columns[name] = _string_column(values)
        table = pa.table(columns).replace_schema_metadata(self.metadata)
        storage.write_parquet(table, f"{self.out}/part-{shard_id}.parquet")
        info = {"rows": len(rows[OK]), "ok": table.num_rows, "quarantined": self._quarantine(shard_id, bad)}
        self.ledger.mark(shard_id, info)
        return info


def write_shard_factors(
    out: str, shard_id: str, rows: Batch, params: dict[str, Any], info: dict[str, Any]
) -> dict[str, Any]:
    """Accumulate and save one shard's factors, then its marker (a retry-safe unit of work)."""
    factors = shard_factors(rows, **params)
    for tower, f in factors.items():
        save_factors(factor_path(out, shard_id, tower), f)
    Ledger(out).mark(shard_id, info)
    return info


class FactorSink(_QuarantiningSink):
    """Per shard: quarantine on the driver, factor accumulation through `submit` (a Ray task or a call)."""

    def __init__(
        self,
        out: str,
        params: dict[str, Any],
        submit: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(out)
        self.params = params
        self.submit = submit or write_shard_factors
        self.results: list[Any] = []

    def __call__(self, shard_id: str, rows: Batch) -> None:
        good, bad = split_verdicts(rows, self.ledger.repeats(shard_id))
        keep = {k: v for k, v in good.items() if k in (OK, ROW, IMAGE_ACTS, IMAGE_EMB, TEXT_ACTS, TEXT_EMB)}
        info = {"rows": len(rows[OK]), "ok": len(good[OK]), "quarantined": self._quarantine(shard_id, bad)}
        self.results.append(self.submit(self.out, shard_id, keep, self.params, info))
