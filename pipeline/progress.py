"""Progress reporting: a rich bar in a terminal, plain periodic lines otherwise (CI logs, pipes)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(
    items: Iterable[T], description: str, total: int | None = None, every_s: float = 10.0
) -> Iterator[T]:
    """Yield `items`, showing progress. Plain lines are printed at most every `every_s` seconds."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from rich.progress import track as rich_track

        yield from rich_track(items, description=description, total=total, transient=False)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            print(f"{description}: {done}{of} ({done / (now - start):.1f}/s)", file=sys.stderr, flush=True)
    print(f"{description}: {done} done in {time.monotonic() - start:.1f}s", file=sys.stderr, flush=True)
