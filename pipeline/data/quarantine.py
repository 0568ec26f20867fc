"""The quarantine: rows that cannot be used, kept with the reason instead of failing the run.

A job writes one quarantine Parquet per shard (`quarantine/part-<shard>.parquet`, same exactly-once rules as
its main output) with `sample_id`, `source`, `reason` and `error`, and prints the counts per reason.
"""

from __future__ import annotations

from collections import Counter
from enum import Enum

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import storage


class Reason(str, Enum):
    """Why a row was quarantined."""

    UNREADABLE = "unreadable"
    """The image file/URI could not be read."""
    EMPTY = "empty"
    """The image bytes are missing or zero-length."""
    UNDECODABLE = "undecodable"
    """The bytes are not an image PIL can decode (truncated, corrupt, unknown format)."""
    WRONG_MODE = "wrong_mode"
    """The pixel mode has no faithful RGB conversion (16-bit, float, ...)."""
    ABSURD_SIZE = "absurd_size"
    """Width/height/pixel count/aspect ratio outside the configured limits (read from the header only)."""
    MISSING_CAPTION = "missing_caption"
    """The row needs a caption (image–text pairs) and has none."""
    DUPLICATE = "duplicate_id"
    """A later row with a sample id seen before in shard order, in any shard or file (the first wins)."""


SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("source", pa.string()), ("reason", pa.string()), ("error", pa.string())]
)


def table(sample_ids: list[str], sources: list[str], reasons: list[str], errors: list[str]) -> pa.Table:
    return pa.Table.from_pydict(
        {"sample_id": sample_ids, "source": sources, "reason": reasons, "error": errors}, schema=SCHEMA
    )


def counts(directory: str) -> Counter[str]:
    """Quarantined rows per reason over every part file under `directory` (empty when there is none)."""
    if not storage.exists(directory):
        return Counter()
    total: Counter[str] = Counter()
    for path in storage.list_files(directory, suffix=".parquet"):
        fs, p = storage.resolve(path)
        reasons = pq.read_table(p, filesystem=fs, columns=["reason"]).column("reason").to_pylist()
        total.update(reasons)
    return total


def format_counts(counted: Counter[str] | dict[str, int]) -> str:
    if not counted:
        return "quarantined: 0"
    parts = ", ".join(f"{reason}={n}" for reason, n in sorted(counted.items()))
    return f"quarantined: {sum(counted.values())} ({parts})"
