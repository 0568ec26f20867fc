"""The demo end to end against the real services: world -> posterior -> embeddings -> calibration -> a
campaign of rounds through Label Studio (bot annotator), Ray Train and MLflow; a rerun adds nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from connectors.label_studio import LabelStudioClient
from jobs import demo
from pipeline.artifacts.posterior import read_info

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.services]

BUDGET, ROUNDS = 4, 2


def test_demo_campaign_reaches_label_studio_and_mlflow_and_reruns_idempotently(
    tmp_path: Path,
    services_state_dir: Path,
    mlflow_server: str,
    label_studio_client: LabelStudioClient,
    ray_session: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--state-dir", str(services_state_dir), "--pool", "300", "--pairs", "512"]
    argv += ["--targets", "60", "--eval", "80", "--budget", str(BUDGET), "--rounds", str(ROUNDS)]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| round | labels | accuracy MAP / Bayes |" in printed and "| 1 | 8 |" in printed

    # Label Studio: exactly the picks of both rounds, each once, each with the round's posterior as the
    # prediction's model version, numeric scores and the image by reference.
    picks = {
        r: pq.read_table(out / f"campaign/rounds/{r:03d}/picks.parquet").to_pylist() for r in range(ROUNDS)
    }
    project = label_studio_client.find_project("bayescurate-demo")
    assert project is not None
    tasks = label_studio_client.sample_ids(project)
    assert sorted(tasks) == sorted(p["sample_id"] for rows in picks.values() for p in rows)
    ids = label_studio_client.task_ids(project)
    versions = {
        0: read_info(out / "posterior")["posterior_id"],
        1: read_info(out / "campaign/rounds/000/posterior")["posterior_id"],
    }
    for r, rows in picks.items():
        task = label_studio_client.sdk.tasks.get(id=ids[rows[0]["sample_id"]])
        assert task.data["epig"] == float(f"{rows[0]['score']:.4g}")  # numeric, rounded for people
        assert task.data["image"].startswith("/data/local-files/?d=")
        assert task.data["predicted"] == rows[0]["predicted"] and task.data["round"] == r
        assert [p.model_version for p in task.predictions] == [versions[r]]
    # Targeted selection drew from the blurred half of the pool more than the clean half.
    domains = [p["domain"] for rows in picks.values() for p in rows]
    assert domains.count("blur") > domains.count("clean")

    # The corrupt pool files were quarantined, not lost and not embedded.
    quarantined = pq.read_table(out / "embeddings/pool/quarantine").num_rows
    embedded = sum(pq.read_table(p).num_rows for p in (out / "embeddings/pool").glob("part-*.parquet"))
    assert quarantined >= 1 and quarantined + embedded == 300

    # The campaign: both rounds trained with Ray Train and updated, evaluated on the target domain.
    state = json.loads((out / "campaign/state.json").read_text())
    assert [r["state"] for r in state["rounds"]] == ["updated"] * ROUNDS
    assert all(r["train"]["trainer"] == "ray" for r in state["rounds"])
    assert [r["labels_used"] for r in state["rounds"]] == [BUDGET, 2 * BUDGET]

    # MLflow: the posterior fit, the zero-shot calibration and the campaign with a run per round.
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("bayescurate-demo")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"fit-posterior", "zeroshot", "campaign: bayescurate-demo", "round-000", "round-001"} <= set(runs)
    assert {"map_ece", "bayes_ece", "map_nll", "bayes_nll"} <= set(runs["zeroshot"].data.metrics)
    parent = runs["campaign: bayescurate-demo"].info.run_id
    assert runs["round-001"].data.tags["mlflow.parentRunId"] == parent
    assert {"active_learning.png", "per_class.png"} <= {a.path for a in client.list_artifacts(parent)}
    assert "picks.png" in {a.path for a in client.list_artifacts(runs["round-001"].info.run_id)}
    # The printed Label Studio URL opens the tab the rounds made.
    tab = label_studio_client.find_view(project, "most informative first (epig)")
    assert f"/projects/{project.id}/data?tab={tab}" in printed

    # A rerun skips completed work and creates no duplicate task.
    before = (out / "campaign/state.json").read_text()
    assert demo.main(argv) == 0
    assert label_studio_client.sample_ids(project) == tasks
    assert json.loads((out / "campaign/state.json").read_text())["rounds"] == json.loads(before)["rounds"]
