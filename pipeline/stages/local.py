"""In-process runner: the same stages as the Ray path, one shard at a time, no Ray.

Used by tests as the single-process reference, by `--executor local`, and for debugging a stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pipeline.data.sources import Shard
from pipeline.stages.base import Batch, Stage, concat, num_rows, record_output
from pipeline.stages.read import ReadStage, shard_batch
from pipeline.stages.shards import ShardAssembler


def run_local(
    shards: Sequence[Shard],
    stages: Sequence[Stage],
    sink: Callable[[str, Batch], Any],
    *,
    read: ReadStage | None = None,
) -> dict[str, set[str]]:
    """Read each shard, push it through `stages` in batches, hand each complete shard to `sink`.

    Returns {stage name: {"local"}} to mirror the node report of the Ray runner.
    """
    read = read or ReadStage()
    sizes = [s.resources.batch_size for s in stages if s.resources.batch_size]
    step = min(sizes) if sizes else 256
    assembler = ShardAssembler()
    for shard in shards:
        rows = read(shard_batch([shard]))
        outputs = []
        for start in range(0, num_rows(rows), step):
            batch = {k: v[start : start + step] for k, v in rows.items()}
            for stage in stages:
                batch = stage(batch)
            record_output(batch)
            outputs.append(batch)
        if not outputs:
            continue
        for shard_id, complete in assembler.add(concat(outputs)):
            sink(shard_id, complete)
    if assembler.pending():
        raise RuntimeError(f"shards left incomplete: {assembler.pending()}")
    return {s.name: {"local"} for s in [read, *stages]}
