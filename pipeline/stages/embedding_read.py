"""Reading an embeddings directory shard by shard, and where each row sits in the pool.

Torch-free on purpose: Ray Data's read tasks import this module alone, so they start without torch (on 2
cores, four quarter-CPU read workers each importing torch cost seconds of every scoring pass)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.sources import Shard, shard_rows
from pipeline.io import storage, vectors
from pipeline.stages.base import ROW, SHARD, SHARD_ROWS, Batch, Resources, Stage, concat, object_array
from pipeline.stages.read import SHARD_COLUMN

FILE = "_file"  # index of the row's pool file (in the plan's sorted file list)
POOL_ROW = "_pool_row"  # row inside that file


def file_index(shard: Shard) -> int:
    return int(shard.shard_id.split("-", 1)[0])


def global_rows(file: np.ndarray | int, row: np.ndarray | int) -> np.ndarray:
    """One int64 per pool row: file index in the high 32 bits, the row in the low ones."""
    return (np.asarray(file, dtype=np.int64) << 32) | np.asarray(row, dtype=np.int64)


def split_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`global_rows` inverted: (file index, row)."""
    rows = np.asarray(rows, dtype=np.int64)
    return rows >> 32, rows & 0xFFFFFFFF


class EmbeddingReadStage(Stage):
    """Reads whole shards of an embeddings directory: sample ids, the vector columns asked for, the scalar
    columns, and each row's place in the pool; `keep` narrows a shard to some of its rows (candidates) and
    `exclude` leaves out rows by sample id (an earlier round's picks)."""

    name: ClassVar[str] = "read-embeddings"
    input_columns: ClassVar[tuple[str, ...]] = (SHARD_COLUMN,)

    def __init__(
        self,
        vector_columns: Sequence[str],
        scalar_columns: Sequence[str],
        keep: Mapping[str, Sequence[int]] | None = None,
        *,
        exclude: frozenset[str] = frozenset(),
        num_cpus: float = 0.25,
    ) -> None:
        self.vector_columns = tuple(vector_columns)
        self.exclude = exclude
        self.scalar_columns = tuple(scalar_columns)
        self.keep = None if keep is None else {k: np.asarray(v, dtype=np.int64) for k, v in keep.items()}
        self.resources = Resources(num_cpus=num_cpus, batch_size=1)

    def process(self, batch: Batch) -> Batch:
        parts = []
        for text in batch[SHARD_COLUMN]:
            shard = Shard.from_json(str(text))
            table = read_embedding_shard(shard, ("sample_id", *self.vector_columns, *self.scalar_columns))
            local = np.arange(table.num_rows, dtype=np.int64)
            if self.keep is not None:
                local = self.keep.get(shard.shard_id, np.zeros(0, dtype=np.int64))
                table = table.take(pa.array(local))
            if self.exclude:
                ids = table.column("sample_id").to_pylist()
                kept = np.asarray([i for i, sid in enumerate(ids) if sid not in self.exclude], dtype=np.int64)
                if len(kept) < len(ids):
                    local, table = local[kept], table.take(pa.array(kept))
            cols: Batch = {"sample_id": object_array(table.column("sample_id").to_pylist())}
            for name in self.vector_columns:
                cols[name] = vectors.matrix(table, name, np.float32)
            for name in self.scalar_columns:
                cols[name] = object_array(["" if v is None else v for v in table.column(name).to_pylist()])
            n = table.num_rows
            cols[FILE] = np.full(n, file_index(shard), dtype=np.int64)
            cols[POOL_ROW] = shard.start + local
            cols[SHARD] = object_array([shard.shard_id] * n)
            cols[SHARD_ROWS] = np.full(n, n, dtype=np.int64)
            cols[ROW] = np.arange(n, dtype=np.int64)
            parts.append(cols)
        return concat(parts)


def read_embedding_shard(shard: Shard, columns: Sequence[str]) -> pa.Table:
    """Rows [start, stop) of one embeddings file, only `columns`, checked against the plan."""
    fs, path = storage.resolve(shard.path)
    try:
        table = shard_rows(pq.ParquetFile(path, filesystem=fs), shard, list(columns))
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"embeddings file {shard.path!r} cannot be read ({exc}): re-embed it") from exc
    if table.num_rows != shard.rows:
        raise ValueError(
            f"shard {shard.shard_id} of {shard.path!r} has {table.num_rows} rows, planned {shard.rows}: "
            "the pool changed since the run was planned"
        )
    return table
