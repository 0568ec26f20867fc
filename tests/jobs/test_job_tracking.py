"""`embed` and `select` log a run to MLflow, as `fit-posterior` and `curate` do; `--no-tracking` logs none.

`embed` against a `sqlite:///` store (no server), `select` against the REAL MLflow server of the session
(its artifacts go through the server's proxy).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from jobs import embed, select
from pipeline.artifacts.posterior import read_info
from tests.fixtures_world import World

pytestmark = pytest.mark.slow


def _runs(uri: str, experiment: str) -> list:  # type: ignore[type-arg]
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def test_embed_logs_its_settings_counts_and_throughput(
    campaign_world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    corpus = campaign_world.images / "pool"
    posterior_id = read_info(campaign_world.posterior)["posterior_id"]
    args = ["--images", str(corpus), "--posterior", str(campaign_world.posterior), "--executor", "local"]
    args += ["--rows-per-shard", "100", "--tracking-uri", uri, "--experiment", "embed-test"]

    assert embed.main([*args, "--out", str(tmp_path / "off"), "--no-tracking"]) == 0
    assert "MLflow run" not in capsys.readouterr().out
    assert _runs(uri, "embed-test") == []

    assert embed.main([*args, "--out", str(tmp_path / "emb")]) == 0
    assert "MLflow run" in capsys.readouterr().out
    [run] = _runs(uri, "embed-test")
    params, metrics = run.data.params, run.data.metrics
    assert run.info.run_name == "embed" and run.info.status == "FINISHED"
    assert run.data.tags["command"] == "embed"
    assert params["model"] == "bayescurate-tiny" and params["posterior_id"] == posterior_id
    assert params["images"] == str(corpus) and params["executor"] == "local"
    assert metrics["rows"] == metrics["processed_rows"] == 240  # the pool: 120 clean + 120 blurred
    assert metrics["shards"] == metrics["processed_shards"] >= 2
    assert 0 < metrics["quarantined"] == 240 - metrics["embedded"]
    assert metrics["rows_per_s"] > 0 and metrics["seconds"] > 0
    client = MlflowClient(tracking_uri=uri)
    summary = client.download_artifacts(run.info.run_id, "embed.json", str(tmp_path / "dl"))
    assert '"posterior_id"' in Path(summary).read_text()


@pytest.mark.services
def test_select_logs_its_settings_score_summary_and_picks(
    campaign_world: World, mlflow_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = f"select-test-{tmp_path.name}"
    args = [
        "--pool", str(campaign_world.pool), "--targets", str(campaign_world.targets),
        "--posterior", str(campaign_world.posterior), "--classes", str(campaign_world.classes),
        "--budget", "5", "--draws", "8", "--tracking-uri", mlflow_server, "--experiment", experiment,
    ]  # fmt: skip
    assert select.main([*args, "--out", str(tmp_path / "off"), "--no-tracking"]) == 0
    assert _runs(mlflow_server, experiment) == []

    out = tmp_path / "sel"
    assert select.main([*args, "--out", str(out)]) == 0
    assert "MLflow run" in capsys.readouterr().out
    [run] = _runs(mlflow_server, experiment)
    params, metrics = run.data.params, run.data.metrics
    assert run.info.run_name == "select" and run.info.status == "FINISHED"
    assert params["selection.method"] == "epig" and params["selection.budget"] == "5"
    assert params["batch_resolved"] == "greedy"
    assert params["posterior_id"] == read_info(campaign_world.posterior)["posterior_id"]
    assert metrics["selected"] == 5 and metrics["score_min"] <= metrics["score_mean"] <= metrics["score_max"]
    client = MlflowClient(tracking_uri=mlflow_server)
    logged = client.download_artifacts(run.info.run_id, "selection.parquet", str(tmp_path / "dl"))
    assert pq.read_table(logged).equals(pq.read_table(out / "selection.parquet"))
