"""Exactly-once bookkeeping: reassemble shards from out-of-order batches; completion markers; run plans.

A shard's rows arrive in batches in any order (parallel decode, actor pools, retries). The assembler
buffers them per shard and releases a shard once all `SHARD_ROWS` rows are in; a row seen twice (a retried
task whose first output also got through) is dropped by its `ROW` index, so the sink gets every row once.
The sink writes the shard's outputs atomically to deterministic paths and then its marker: a rerun skips
marked shards, a crash before the marker redoes the shard and overwrites the same paths.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from pipeline.data.sources import Shard
from pipeline.io import storage
from pipeline.stages.base import ROW, SHARD, SHARD_ROWS, Batch, concat, num_rows, take

DONE_DIR = "_done"
PLAN_FILE = "_plan.json"

Sink = Callable[[str, Batch], dict[str, Any]]  # (shard id, complete shard rows) -> marker info


class ShardAssembler:
    """Buffers batches per shard; `add` returns the shards that just became complete."""

    def __init__(self) -> None:
        self._parts: dict[str, list[Batch]] = {}
        self._seen: dict[str, set[int]] = {}
        self._expected: dict[str, int] = {}

    def add(self, batch: Batch) -> list[tuple[str, Batch]]:
        done = []
        shard_ids = np.asarray(batch[SHARD])
        for shard_id in np.unique(shard_ids):
            shard_id = str(shard_id)
            part = take(batch, shard_ids == shard_id)
            seen = self._seen.setdefault(shard_id, set())
            rows = np.asarray(part[ROW], dtype=np.int64)
            fresh = np.array([int(r) not in seen for r in rows], dtype=bool)
            if not fresh.all():
                part = take(part, fresh)
                rows = rows[fresh]
            _, first = np.unique(rows, return_index=True)  # duplicates inside one batch, too
            if len(first) != len(rows):
                part = take(part, np.sort(first))
                rows = rows[np.sort(first)]
            seen.update(int(r) for r in rows)
            self._expected[shard_id] = int(np.asarray(part[SHARD_ROWS])[0]) if num_rows(part) else 0
            self._parts.setdefault(shard_id, []).append(part)
            if len(seen) == self._expected[shard_id]:
                rows_all = concat(self._parts.pop(shard_id))
                order = np.argsort(np.asarray(rows_all[ROW]), kind="stable")
                done.append((shard_id, take(rows_all, order)))
        return done

    def pending(self) -> dict[str, int]:
        """Shards with some but not all rows: shard id -> rows received."""
        return {s: len(self._seen[s]) for s in self._parts}


class Ledger:
    """Run plan and completion markers of one output directory."""

    def __init__(self, out: str) -> None:
        self.out = out.rstrip("/")

    @property
    def done_dir(self) -> str:
        return f"{self.out}/{DONE_DIR}"

    def marker(self, shard_id: str) -> str:
        return f"{self.done_dir}/{shard_id}.json"

    def completed(self) -> set[str]:
        if not storage.exists(self.done_dir):
            return set()
        names = (p.rsplit("/", 1)[-1] for p in storage.list_files(self.done_dir, suffix=".json"))
        return {n.removesuffix(".json") for n in names}

    def mark(self, shard_id: str, info: dict[str, Any]) -> None:
        storage.write_json(self.marker(shard_id), {"shard": shard_id, **info})

    def markers(self) -> list[dict[str, Any]]:
        return [storage.read_json(self.marker(s)) for s in sorted(self.completed())]

    def check_plan(self, inputs: str, shards: list[Shard], params: dict[str, Any]) -> None:
        """Write the plan on the first run; on a rerun, refuse if inputs, shards or params changed."""
        plan = {"inputs": inputs, "shards": [s.shard_id for s in shards], "rows": sum(s.rows for s in shards)}
        plan["params"] = params
        path = f"{self.out}/{PLAN_FILE}"
        if storage.exists(path):
            old = storage.read_json(path)
            for key in ("inputs", "shards", "rows", "params"):
                if json.dumps(old.get(key), sort_keys=True) != json.dumps(
                    plan[key], sort_keys=True, default=str
                ):
                    what = "shard list" if key == "shards" else key
                    raise ValueError(
                        f"output {self.out!r} belongs to a run with a different {what} "
                        f"({str(old.get(key))[:200]} vs {str(plan[key])[:200]}); "
                        "use a new --out to start over"
                    )
            return
        storage.write_json(path, json.loads(json.dumps(plan, default=str)))


def pending_shards(ledger: Ledger, shards: Iterable[Shard]) -> list[Shard]:
    done = ledger.completed()
    return [s for s in shards if s.shard_id not in done]
