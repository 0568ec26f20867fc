"""What long jobs print: progress (a rich bar on a terminal, periodic plain lines otherwise) and no noise.

`RowProgress` counts rows against a known total (rows done/total, rate, ETA). `quiet_ray` removes the two
lines Ray prints for every pipeline run whatever the run does: the core worker's "constructor arguments
in the object store" error for every actor pool (Ray Data itself passes its map transformer by reference,
ray-project/ray#57733: nothing a caller can change, and restarts work, as the actor-kill test shows), and
Ray Data's "Progress bars disabled" warning (we draw our own bar) and its per-dataset INFO notes. The
first is written by Ray's C++ core straight to file descriptor 2, so it is filtered at that level;
everything else passes through unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, TypeVar

T = TypeVar("T")

# Lines Ray prints on every run that carry no information for the user (see the module docstring).
RAY_NOISE = (re.compile(rb"has constructor arguments in the object store and max_restarts > 0"),)
# Ray Data loggers and the least level shown: its bar warning, its per-dataset "execution finished" notes.
RAY_QUIET_LOGGERS = {
    "ray.data._internal.progress": logging.ERROR,
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
}


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


class RowProgress:
    """Rows done out of a known total: a rich bar (done/total, rate, ETA) on a terminal, else a plain line
    every `every_s` seconds and one at the end."""

    def __init__(
        self, total: int, description: str, *, stream: IO[str] | None = None, every_s: float = 10.0
    ) -> None:
        self.total = int(total)
        self.description = description
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.done = 0
        self._start = self._last = time.monotonic()
        self._bar = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._task = self._bar.add_task(description, total=self.total, rate="")
            self._bar.start()

    def _rate(self) -> float:
        elapsed = time.monotonic() - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, rows: int) -> None:
        self.done += int(rows)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self._rate():.0f}/s")
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            eta = (self.total - self.done) / self._rate() if self._rate() > 0 else float("nan")
            print(
                f"{self.description}: {self.done}/{self.total} rows ({self._rate():.0f}/s, ETA {eta:.0f} s)",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            return
        elapsed = time.monotonic() - self._start
        print(
            f"{self.description}: {self.done}/{self.total} rows in {elapsed:.1f} s ({self._rate():.0f}/s)",
            file=self.stream,
            flush=True,
        )


@contextmanager
def quiet_ray() -> Iterator[IO[str]]:
    """Drop Ray's per-run noise (see the module docstring) for the duration of the block.

    Yields a text stream on the original stderr (a terminal keeps being one) for progress bars.
    """
    for name, level in RAY_QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        buffer = b""
        while chunk := os.read(read_end, 65536):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not any(p.search(line) for p in RAY_NOISE):
                    os.write(original, line + b"\n")
        if buffer and not any(p.search(buffer) for p in RAY_NOISE):
            os.write(original, buffer)
        os.close(read_end)

    thread = threading.Thread(target=pump, name="quiet-ray-stderr", daemon=True)
    thread.start()
    stream = os.fdopen(os.dup(original), "w", buffering=1)
    try:
        yield stream
    finally:
        stream.flush()
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the pump drains and exits
        thread.join(timeout=5)
        os.close(original)
        stream.close()
