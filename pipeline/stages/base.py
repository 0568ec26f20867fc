"""The stage interface: a callable on column batches that declares its resources and columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

Batch = dict[str, np.ndarray]
# Columns the runners add to every row; stages pass them through untouched.
SHARD = "_shard"  # shard id
SHARD_ROWS = "_shard_rows"  # number of input rows of the shard (to know when it is complete)
ROW = "_row"  # row index inside the shard (restores input order after parallel processing)


@dataclass(frozen=True)
class Resources:
    """What one instance of a stage needs; the Ray adapter turns this into `map_batches` arguments."""

    num_cpus: float = 1.0  # logical CPUs per task/actor
    num_gpus: float = 0.0  # GPUs per actor (model stages set 1 when the cluster has GPUs)
    stateful: bool = False  # True: holds a loaded model -> run in an actor pool, `setup` once per actor
    batch_size: int | None = 256  # rows per call; None = whatever block arrives


class Stage:
    """Base class: subclasses set `name`, `resources`, the column lists and implement `process`.

    `setup` is called once per process (per actor for stateful stages) before the first batch; it must be
    idempotent. `process` must be retry-safe: a pure function of its input batch.
    """

    name: ClassVar[str] = "stage"
    input_columns: ClassVar[tuple[str, ...]] = ()
    output_columns: ClassVar[tuple[str, ...]] = ()
    resources: Resources = Resources()

    _ready: bool = False

    def setup(self) -> None:
        """Load heavy state (a model); default: nothing."""

    def process(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state.pop("_ready", None)  # a copy shipped to a worker runs its own setup
        return state

    def __call__(self, batch: Batch) -> Batch:
        if not self._ready:
            self.setup()
            self._ready = True
        missing = [c for c in self.input_columns if c not in batch]
        if missing:
            raise ValueError(f"stage {self.name!r} needs columns {missing}; batch has {sorted(batch)}")
        return self.process(batch)


def num_rows(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def take(batch: Batch, index: np.ndarray) -> Batch:
    """Rows `index` (int indices or a boolean mask) of every column."""
    return {k: v[index] for k, v in batch.items()}


def concat(batches: list[Batch]) -> Batch:
    """Concatenate batches with the same columns (columns missing in some batches are dropped)."""
    if not batches:
        return {}
    keys = [k for k in batches[0] if all(k in b for b in batches)]
    return {k: np.concatenate([b[k] for b in batches]) for k in keys}


def object_array(values: list[object]) -> np.ndarray:
    """A 1-D object array (numpy would turn a list of equal-length bytes into a 2-D array otherwise)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
