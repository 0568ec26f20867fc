"""The one Parquet codec for vector columns: `[N, D]` arrays <-> Arrow `fixed_size_list<float>[D]`.

Plain fixed-size lists are what any Parquet reader understands (pandas, DuckDB, Spark, Ray Data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # torch is imported where tensors are made: readers of plain arrays start without it
    import torch


def vector_column(values: np.ndarray | torch.Tensor) -> pa.Array:
    """[N, D] array -> `fixed_size_list<float>[D]` (zero-copy from a contiguous float32 array)."""
    if hasattr(values, "detach"):  # a torch.Tensor
        values = values.detach().cpu().numpy()
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"a vector column needs a [N, D] array, got shape {list(values.shape)}")
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def matrix(table: pa.Table, name: str, dtype: np.dtype | type | None = np.float64) -> np.ndarray:
    """A vector column of `table` as a [N, D] array of `dtype` (None: as stored, a read-only view)."""
    if name not in table.column_names:
        raise ValueError(f"no vector column {name!r}; columns: {table.column_names}")
    field = table.schema.field(name)
    if not pa.types.is_fixed_size_list(field.type):
        raise ValueError(f"column {name!r} has type {field.type}, expected fixed_size_list<float>[D]")
    width = field.type.list_size
    column = table.column(name).combine_chunks() if table.num_rows else pa.array([], field.type)
    values = np.asarray(column.flatten()).reshape(-1, width)
    return values if dtype is None else values.astype(dtype, copy=False)


def tensor(table: pa.Table, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A vector column of `table` as a [N, D] tensor of `dtype` (default float64)."""
    import torch

    values = torch.from_numpy(np.ascontiguousarray(matrix(table, name, np.float64)))
    return values.to(torch.float64 if dtype is None else dtype)
