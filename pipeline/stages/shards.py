"""Exactly-once bookkeeping: reassemble shards from out-of-order batches; completion markers; run plans.

A shard's rows arrive in batches in any order (parallel decode, actor pools, retries). The assembler
buffers them per shard and releases a shard once all `SHARD_ROWS` rows are in; a row seen twice (a retried
task whose first output also got through) is dropped by its `ROW` index, so the sink gets every row once.
The sink writes the shard's outputs atomically to deterministic paths and then its marker: a rerun skips
marked shards, a crash before the marker redoes the shard and overwrites the same paths.

Duplicate sample ids are decided once per run plan, before any shard is processed, so the verdict cannot
depend on which shard completes first: the ids of every shard are scanned in shard order, the first row
carrying an id wins, and every later row with it (in the same shard or another file) is a `Repeat`. The
verdicts are written to `_duplicates.json` beside the plan; reruns and resumed runs read them back, and the
sinks quarantine those rows as duplicates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.sources import Shard, shard_ids
from pipeline.io import storage
from pipeline.stages.base import ROW, SHARD, SHARD_ROWS, Batch, concat, num_rows, take

DONE_DIR = "_done"
PLAN_FILE = "_plan.json"
DUPLICATES_FILE = "_duplicates.json"
DUPLICATES_FORMAT = "bayescurate.duplicates/1"
SCAN_THREADS = 8  # shards whose ids are read at once when the plan is made (I/O bound)

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


@dataclass(frozen=True)
class Repeat:
    """A row whose sample id an earlier row of the corpus already carries (in shard order)."""

    sample_id: str
    first_shard: str  # shard id of the first row with this id
    first_row: int  # its row inside that shard

    def note(self) -> str:
        where = f"row {self.first_row} of shard {self.first_shard}"
        return f"sample id {self.sample_id!r} repeated: first at {where}"


Repeats = dict[str, dict[int, Repeat]]  # shard id -> row inside the shard -> the id's first occurrence


def find_repeats(ids: Iterable[tuple[str, Sequence[str]]]) -> Repeats:
    """Every later occurrence of a sample id in `(shard id, ids in row order)` taken in the order given.

    The first row carrying an id wins, whatever becomes of it later (a row that turns out undecodable
    still wins), so the verdict is a function of the ids alone. Holds one entry per distinct id.
    """
    first: dict[str, tuple[str, int]] = {}
    out: Repeats = {}
    for shard_id, values in ids:
        for row, sample_id in enumerate(values):
            seen = first.setdefault(sample_id, (shard_id, row))
            if seen != (shard_id, row):
                out.setdefault(shard_id, {})[row] = Repeat(sample_id, *seen)
    return out


class Ledger:
    """Run plan, duplicate verdicts and completion markers of one output directory."""

    def __init__(self, out: str) -> None:
        self.out = out.rstrip("/")
        self._repeats: Repeats | None = None

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

    def check_plan(
        self,
        inputs: str,
        shards: list[Shard],
        params: dict[str, Any],
        scan: Callable[[Shard], list[str]] | None = shard_ids,
    ) -> None:
        """Write the plan on the first run; on a rerun, refuse if inputs, shards or params changed.

        Then settle the plan's duplicate verdicts (`plan_repeats`, with `scan` reading a shard's ids; None:
        the inputs are known to hold each sample id once, e.g. an embeddings directory).
        """
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
        else:
            storage.write_json(path, json.loads(json.dumps(plan, default=str)))
        if scan is not None:
            self.plan_repeats(shards, scan)

    @property
    def duplicates_file(self) -> str:
        return f"{self.out}/{DUPLICATES_FILE}"

    def plan_repeats(
        self, shards: Sequence[Shard], scan: Callable[[Shard], list[str]] = shard_ids
    ) -> Repeats:
        """The duplicate verdicts of the run: read back from `_duplicates.json`, or found by scanning the
        ids of every shard (in shard order, `SCAN_THREADS` at a time) and written there first."""
        if storage.is_file(self.duplicates_file):
            return self._load_repeats()
        ordered = sorted(shards, key=lambda s: s.shard_id)
        with ThreadPoolExecutor(max_workers=max(1, min(SCAN_THREADS, len(ordered)))) as pool:
            ids = list(pool.map(scan, ordered))
        for shard, values in zip(ordered, ids, strict=True):
            if len(values) != shard.rows:
                raise ValueError(
                    f"shard {shard.shard_id} of {shard.path!r} has {len(values)} rows, planned {shard.rows}: "
                    "the input changed while the run was being planned"
                )
        found = find_repeats((s.shard_id, v) for s, v in zip(ordered, ids, strict=True))
        record = {
            "format": DUPLICATES_FORMAT,
            "rows": sum(s.rows for s in ordered),
            "repeated": sum(len(rows) for rows in found.values()),
            "shards": {
                shard: [[row, r.sample_id, r.first_shard, r.first_row] for row, r in sorted(rows.items())]
                for shard, rows in sorted(found.items())
            },
        }
        storage.write_json(self.duplicates_file, record, indent=None)
        self._repeats = found
        return found

    def _load_repeats(self) -> Repeats:
        if self._repeats is None:
            if not storage.is_file(self.duplicates_file):
                self._repeats = {}
                return self._repeats
            record = storage.read_json(self.duplicates_file)
            if record.get("format") != DUPLICATES_FORMAT:
                raise ValueError(
                    f"{self.duplicates_file!r} has format {record.get('format')!r}, "
                    f"expected {DUPLICATES_FORMAT!r}"
                )
            self._repeats = {
                shard: {int(row): Repeat(str(sid), str(first), int(at)) for row, sid, first, at in rows}
                for shard, rows in record["shards"].items()
            }
        return self._repeats

    def repeats(self, shard_id: str) -> dict[int, Repeat]:
        """Rows of `shard_id` whose sample id an earlier row has (none when the plan recorded no verdicts)."""
        return self._load_repeats().get(shard_id, {})


def pending_shards(ledger: Ledger, shards: Iterable[Shard]) -> list[Shard]:
    done = ledger.completed()
    return [s for s in shards if s.shard_id not in done]
