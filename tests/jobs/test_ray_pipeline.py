"""The Ray path: same factors as the local runner, and exactly-once output when a model actor is SIGKILLed."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import embed, fit_posterior, make_world
from pipeline.artifacts.factors import load_factors

MODEL = "factory:tests.stages.standin:load"
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def actor_pids() -> list[int]:
    """Pids of live Ray Data map actors (their process title names the actor class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"MapWorker(MapBatches(_StageActor))" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_ray_matches_local_and_survives_actor_kill(ray_session: None, tmp_path: Path) -> None:
    world = tmp_path / "world"
    assert (
        make_world.main(["--out", str(world), "--n", "1200", "--per-file", "400", "--corrupt", "0.02"]) == 0
    )
    fit = ["--pairs", str(world), "--model", MODEL, "--block-size", "50", "--no-tracking"]
    assert fit_posterior.main([*fit, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    assert fit_posterior.main([*fit, "--out", str(tmp_path / "local"), "--executor", "local"]) == 0
    for tower in ("image", "text"):
        a = load_factors(tmp_path / "ray" / f"{tower}.safetensors")
        b = load_factors(tmp_path / "local" / f"{tower}.safetensors")
        torch.testing.assert_close(a.A, b.A, rtol=1e-6, atol=1e-6 * float(b.A.abs().max()))
        torch.testing.assert_close(a.B, b.B, rtol=1e-6, atol=1e-6 * float(b.B.abs().max()))
        assert a.n == b.n

    out = tmp_path / "emb"
    args = [
        "--images",
        str(world),
        "--posterior",
        str(tmp_path / "ray"),
        "--out",
        str(out),
        "--rows-per-shard",
        "40",
        "--batch-size",
        "40",
        "--no-tracking",
    ]
    result: dict[str, int] = {}
    run = threading.Thread(target=lambda: result.setdefault("rc", embed.main(args)))
    run.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and run.is_alive() and time.monotonic() < deadline:
        done = len(list((out / "_done").glob("*.json"))) if (out / "_done").exists() else 0
        pids = actor_pids()
        if pids and done >= 2:
            os.kill(pids[0], signal.SIGKILL)
            killed = (pids[0], done)
        time.sleep(0.05)
    run.join(timeout=300)
    assert result.get("rc") == 0
    assert killed is not None and killed[1] < 30, (
        f"the actor must be killed mid-run (30 shards), got {killed}"
    )
    ids = pa.concat_tables(pq.read_table(f) for f in sorted(out.glob("part-*.parquet")))[
        "sample_id"
    ].to_pylist()
    quarantined = (
        pq.read_table(out / "quarantine")["sample_id"].to_pylist() if (out / "quarantine").exists() else []
    )
    assert len(ids) == len(set(ids)), "a sample was written twice"
    assert len(ids) + len(quarantined) == 1200, "a sample was lost"
    assert killed[0] not in actor_pids()
