"""The stage interface: a callable on column batches that declares its resources and columns."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

Batch = dict[str, np.ndarray]
# Columns the runners add to every row; stages pass them through untouched.
SHARD = "_shard"  # shard id
SHARD_ROWS = "_shard_rows"  # number of input rows of the shard (to know when it is complete)
ROW = "_row"  # row index inside the shard (restores input order after parallel processing)
# Columns `_t_<what>`: seconds a stage spent on each row (its batch time split over the rows). Runners pop
# and sum them (`pop_timings`), so they never reach a sink; the benchmark reads the sums.
TIMING_PREFIX = "_t_"


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


def pop_timings(batch: Batch) -> dict[str, float]:
    """Remove the timing columns of `batch`; returns {what: summed seconds}."""
    keys = [k for k in batch if k.startswith(TIMING_PREFIX)]
    return {k.removeprefix(TIMING_PREFIX): float(np.sum(batch.pop(k))) for k in keys}


@dataclass
class RunTrace:
    """Driver-side timeline of the runs made while it is active: when output batches arrived, stage times."""

    started: float = field(default_factory=time.perf_counter)  # perf_counter at `trace()` entry
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, rows) per output batch
    stage_s: dict[str, float] = field(default_factory=dict)  # summed timing columns (`pop_timings`)

    def record(self, rows: int, timings: dict[str, float]) -> None:
        self.arrivals.append((time.perf_counter(), rows))
        for key, seconds in timings.items():
            self.stage_s[key] = self.stage_s.get(key, 0.0) + seconds


_TRACES: list[RunTrace] = []


@contextmanager
def trace() -> Iterator[RunTrace]:
    """`with trace() as t: run(...)`: the runners record into `t` (benchmarks; no cost when unused)."""
    t = RunTrace()
    _TRACES.append(t)
    try:
        yield t
    finally:
        _TRACES.remove(t)


def record_output(batch: Batch) -> None:
    """Runners call this on every output batch: pops its timing columns and feeds the active traces."""
    timings = pop_timings(batch)
    for t in _TRACES:
        t.record(num_rows(batch), timings)
