"""`bayescurate curate` on Ray: the same batch as in-process, every row scored exactly once when a scoring
worker is SIGKILLed mid-task, and the run in MLflow with its figures and contact sheet."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from jobs import curate
from tests.fixtures_world import World

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _args(world: World, out: Path, *extra: str) -> list[str]:
    return [
        "--pool", str(world.pool), "--targets", str(world.targets), "--posterior", str(world.posterior),
        "--classes", str(world.classes), "--out", str(out), "--budget", "16", "--batch", "stochastic",
        "--draws", "16", "--whole-pool", "--rows-per-shard", "8", "--batch-size", "8", *extra,
    ]  # fmt: skip


def test_ray_equals_local_and_survives_a_killed_scoring_worker(
    campaign_world: World, ray_faults: Path, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    assert curate.main([*_args(campaign_world, local), "--executor", "local", "--no-tracking"]) == 0
    out = tmp_path / "ray"
    db = tmp_path / "mlflow.db"
    args = [*_args(campaign_world, out), "--tracking-uri", f"sqlite:///{db}", "--experiment", "curate-test"]
    result: dict[str, int] = {}
    run = threading.Thread(target=lambda: result.setdefault("rc", curate.main(args)))
    run.start()
    armed_after = None
    deadline = time.monotonic() + 240
    done_dir = out / "scores" / "_done"
    while armed_after is None and run.is_alive() and time.monotonic() < deadline:
        done = len(list(done_dir.glob("*.json"))) if done_dir.exists() else 0
        if done >= 2:  # the next scoring task to start SIGKILLs its worker (`faults.kill_once`)
            (ray_faults / "score").touch()
            armed_after = done
        time.sleep(0.02)
    run.join(timeout=300)
    assert result.get("rc") == 0
    shards = len(list((local / "scores").glob("part-*.parquet")))
    fired = ray_faults / "score.fired"
    assert armed_after is not None and armed_after < shards, f"armed too late ({shards} shards)"
    assert fired.exists(), "no scoring worker took the crash"
    killed = int(fired.read_text())
    assert killed != os.getpid() and not Path(f"/proc/{killed}").exists()  # a worker, and it died

    def scored_ids(folder: Path) -> list[str]:
        parts = sorted((folder / "scores").glob("part-*.parquet"))
        return pa.concat_tables(pq.read_table(p) for p in parts)["sample_id"].to_pylist()

    ids = scored_ids(out)
    assert len(ids) == len(set(ids)), "a row was scored twice"
    assert sorted(ids) == sorted(scored_ids(local)), "a row was lost"
    picks = pq.read_table(out / "curated.parquet")["sample_id"].to_pylist()
    assert picks == pq.read_table(local / "curated.parquet")["sample_id"].to_pylist()

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("curate-test")
    assert experiment is not None
    (run_info,) = client.search_runs([experiment.experiment_id])
    assert run_info.data.metrics["picks"] == 16 and run_info.data.params["selection.batch"] == "stochastic"
    artifacts = {a.path for a in client.list_artifacts(run_info.info.run_id)}
    assert {"curate.json", "scores.png", "domains.png", "picks.png"} <= artifacts
    assert run_info.data.metrics["share_blur"] + run_info.data.metrics["share_clean"] == pytest.approx(1.0)


def test_the_progress_line_counts_the_candidates_not_the_pool(
    campaign_world: World, ray_session: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "targeted"
    args = [a for a in _args(campaign_world, out) if a != "--whole-pool"]
    assert curate.main([*args, "--neighbours", "2", "--no-tracking"]) == 0
    report = json.loads((out / "curate.json").read_text())
    assert 0 < report["candidates"] < report["rows"]  # the neighbour step kept some of the pool
    n = report["candidates"]
    assert f"score: {n}/{n} rows in" in capfd.readouterr().err
