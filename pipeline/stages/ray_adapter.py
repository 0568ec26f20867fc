"""The one place stages meet Ray: each stage becomes a `map_batches` operator with its declared resources.

Why Ray Data over hand-rolled tasks: its streaming executor already gives back-pressure (bounded memory
regardless of corpus size), overlaps reading, decoding (CPU tasks) and the model (actor pool, model loaded
once per actor), and restarts dead actors and retries their batches. Exactly-once comes from the driver
side: shards are reassembled from the output stream (`ShardAssembler`) and committed atomically by a sink
with a completion marker, so a retried batch can never duplicate a row in the output, and a rerun skips
committed shards.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray

from pipeline.data.sources import Shard
from pipeline.progress import RowProgress, quiet_ray
from pipeline.stages.base import Batch, Stage, num_rows, object_array, record_output
from pipeline.stages.read import ReadStage, shard_batch
from pipeline.stages.shards import ShardAssembler

NODE_PREFIX = "_node_"  # column `_node_<stage>`: the Ray node that ran the stage on that row


def _tag_node(batch: Batch, stage: str) -> Batch:
    batch[NODE_PREFIX + stage] = object_array([ray.get_runtime_context().get_node_id()] * num_rows(batch))
    return batch


class _StageActor:
    """Actor wrapper of a stateful stage: `setup` (model load) once, then one call per batch."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        stage.setup()
        stage._ready = True

    def __call__(self, batch: Batch) -> Batch:
        return _tag_node(self.stage(batch), self.stage.name)


def _task_fn(stage: Stage) -> Callable[[Batch], Batch]:
    def run(batch: Batch) -> Batch:
        return _tag_node(stage(batch), stage.name)

    # Ray Data names the operator (and a worker's process title while it runs) after the function.
    run.__name__ = run.__qualname__ = stage.name
    return run


def map_stage(ds: ray.data.Dataset, stage: Stage, *, pool_size: int = 1) -> ray.data.Dataset:
    """`ds.map_batches` for `stage`: an actor pool of `pool_size` for stateful stages, tasks otherwise."""
    r = stage.resources
    common: dict[str, Any] = {"batch_size": r.batch_size, "batch_format": "numpy", "num_cpus": r.num_cpus}
    if r.stateful:
        return ds.map_batches(
            _StageActor,
            fn_constructor_args=(stage,),
            compute=ray.data.ActorPoolStrategy(size=pool_size),
            num_gpus=r.num_gpus,
            **common,
        )
    return ds.map_batches(_task_fn(stage), **common)


def run_ray(
    shards: Sequence[Shard],
    stages: Sequence[Stage],
    sink: Callable[[str, Batch], Any],
    *,
    pool_size: int = 1,
    read: ReadStage | None = None,
    total: int | None = None,
) -> dict[str, set[str]]:
    """Stream `shards` through read -> `stages` on Ray and hand every complete shard to `sink` (driver side).

    `total`: the rows the read yields, for the progress line (default: every row of the shards; less when
    the read keeps only some). Returns {stage name: node ids that ran it}.
    """
    if not shards:
        return {}
    read = read or ReadStage()
    ds = ray.data.from_items(
        [{k: v[0] for k, v in shard_batch([s]).items()} for s in shards], override_num_blocks=len(shards)
    )
    for stage in [read, *stages]:
        ds = map_stage(ds, stage, pool_size=pool_size)
    assembler = ShardAssembler()
    nodes: dict[str, set[str]] = {}
    with quiet_ray() as console:
        label = stages[-1].name if stages else "rows"
        progress = RowProgress(sum(s.rows for s in shards) if total is None else total, label, stream=console)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                for key in [k for k in batch if k.startswith(NODE_PREFIX)]:
                    found = np.unique(batch.pop(key)).tolist()
                    nodes.setdefault(key.removeprefix(NODE_PREFIX), set()).update(found)
                record_output(batch)
                progress.update(num_rows(batch))
                for shard_id, rows in assembler.add(batch):
                    sink(shard_id, rows)
        finally:
            progress.close()
    if assembler.pending():
        raise RuntimeError(f"shards left incomplete after the stream ended: {assembler.pending()}")
    return nodes


class RayShared:
    """A value in Ray's object store: pickles as its reference, so workers fetch it once each (`get`).

    A worker process keeps the last few values it fetched, so the tasks of one run that land on the same
    worker deserialise each once (values in the store are immutable; callers must not change them)."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    @classmethod
    def put(cls, value: Any) -> RayShared:
        return cls(ray.put(value))

    def get(self) -> Any:
        key = self.ref.hex()
        if key in _FETCHED:
            _FETCHED.move_to_end(key)
        else:
            _FETCHED[key] = ray.get(self.ref)
            while len(_FETCHED) > _KEEP_FETCHED:
                _FETCHED.popitem(last=False)  # a later run's values replace an earlier run's
        return _FETCHED[key]


_KEEP_FETCHED = 4  # shared values a worker process keeps (a task reads at most two)
_FETCHED: OrderedDict[str, Any] = OrderedDict()  # object id -> value, least recently used first


def call_on_node(fn: Callable[..., Any], *args: Any) -> tuple[Any, str]:
    """`(fn(*args), id of the node that ran it)`: the body of helper tasks whose placement is reported."""
    return fn(*args), ray.get_runtime_context().get_node_id()


class RayTasks:
    """Helper tasks as Ray tasks with retries (also on exceptions): they must be retry-safe.

    The `runtime.Tasks` protocol; `runtime.tasks("ray")` makes one.
    """

    def __init__(self, *, num_cpus: float = 0.25, max_retries: int = 3, spread: bool = False) -> None:
        options: dict[str, Any] = {"scheduling_strategy": "SPREAD"} if spread else {}
        self._task = ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=True, **options)(
            call_on_node
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._task.remote(fn, *args)

    def gather(self, handles: Sequence[Any]) -> list[tuple[Any, str]]:
        return list(ray.get(list(handles)))

    def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        return [result for result, _ in self.gather([self.submit(fn, item) for item in items])]
