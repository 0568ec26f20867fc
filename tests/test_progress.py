"""Progress and noise: the row bar (done/total, rate, ETA) on a terminal, plain lines otherwise, and
Ray's per-run noise dropped at the file-descriptor level while everything else passes."""

from __future__ import annotations

import io
import logging
import os

import pytest

from pipeline.progress import RAY_NOISE, RowProgress, quiet_ray


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_shows_rows_done_of_total_rate_and_eta() -> None:
    stream = Terminal()
    progress = RowProgress(1000, "embed", stream=stream)
    progress.update(250)
    progress.update(250)
    progress.close()
    text = stream.getvalue()
    assert "embed" in text and "500/1000" in text and "rows" in text and "ETA" in text and "/s" in text


def test_in_a_log_the_progress_is_plain_lines() -> None:
    stream = io.StringIO()
    progress = RowProgress(10, "embed", stream=stream, every_s=0.0)
    progress.update(4)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("embed: 4/10 rows (") and "ETA" in lines[0]
    assert lines[-1].startswith("embed: 4/10 rows in ")


def test_ray_noise_is_dropped_and_everything_else_passes(capfd: pytest.CaptureFixture[str]) -> None:
    noise = (
        "[2026-12-01 22:52:04,009 E 19887 19887] core_worker.cc:2465: Actor with class name: 'MapWorker' and "
        "ID: 'c48d' has constructor arguments in the object store and max_restarts > 0. If the arguments..."
    )
    assert any(p.search(noise.encode()) for p in RAY_NOISE)
    with quiet_ray() as console:
        os.write(2, (noise + "\n").encode())  # what Ray's C++ core does: straight to fd 2
        os.write(2, b"a real error line\n")
        logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, ...")
        console.write("progress on the original stderr\n")
    err = capfd.readouterr().err
    assert "constructor arguments" not in err and "Progress bars disabled" not in err
    assert "a real error line" in err and "progress on the original stderr" in err
    os.write(2, b"after the block\n")
    assert "after the block" in capfd.readouterr().err
