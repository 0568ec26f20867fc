"""Read stage: shard descriptors -> the shard's rows, tagged with shard id, shard size and row index."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from pipeline.data.sources import Shard, read_shard
from pipeline.stages.base import ROW, SHARD, SHARD_ROWS, Batch, Resources, Stage, concat, object_array

SHARD_COLUMN = "shard"  # input column: `Shard.to_json()` per row


def shard_batch(shards: list[Shard]) -> Batch:
    """The input batch of the read stage: one row per shard."""
    return {SHARD_COLUMN: object_array([s.to_json() for s in shards])}


class ReadStage(Stage):
    """Reads whole shards (I/O bound; half a CPU so reads overlap with decoding on small machines)."""

    name: ClassVar[str] = "read"
    input_columns: ClassVar[tuple[str, ...]] = (SHARD_COLUMN,)
    output_columns: ClassVar[tuple[str, ...]] = ("sample_id", "image", "caption", "source", "read_error")

    def __init__(self, num_cpus: float = 0.5) -> None:
        self.resources = Resources(num_cpus=num_cpus, batch_size=1)

    def process(self, batch: Batch) -> Batch:
        parts = []
        for text in batch[SHARD_COLUMN]:
            shard = Shard.from_json(str(text))
            table = read_shard(shard)
            if table.num_rows != shard.rows:
                raise ValueError(
                    f"shard {shard.shard_id} of {shard.path!r} has {table.num_rows} rows, "
                    f"planned {shard.rows}: the input changed since the run was planned"
                )
            # Strings carry "" for null: all-null object columns do not survive Ray's Arrow round trip.
            cols: Batch = {
                name: object_array([("" if v is None else v) if name != "image" else v for v in values])
                for name, values in ((n, table.column(n).to_pylist()) for n in table.column_names)
            }
            cols[SHARD] = object_array([shard.shard_id] * table.num_rows)
            cols[SHARD_ROWS] = np.full(table.num_rows, shard.rows, dtype=np.int64)
            cols[ROW] = np.arange(table.num_rows, dtype=np.int64)
            parts.append(cols)
        return concat(parts)
