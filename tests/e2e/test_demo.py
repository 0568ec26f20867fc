"""The demo end to end against the real services: world -> posterior -> embeddings -> calibration ->
targeted EPIG -> Label Studio tasks, all logged to MLflow; a rerun adds nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from connectors.label_studio import LabelStudioClient
from jobs import demo

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.services]

BUDGET = 8


def test_demo_round_reaches_label_studio_and_mlflow_and_reruns_idempotently(
    tmp_path: Path,
    services_state_dir: Path,
    mlflow_server: str,
    label_studio_client: LabelStudioClient,
    ray_session: None,
) -> None:
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--state-dir", str(services_state_dir)]
    argv += ["--pool", "300", "--pairs", "512", "--budget", str(BUDGET)]
    assert demo.main(argv) == 0

    # Label Studio: exactly the selected samples, each with the model's prediction and its uncertainty.
    selection = pq.read_table(out / "selection" / "selection.parquet").to_pylist()
    chosen = {row["sample_id"] for row in selection}
    assert len(chosen) == BUDGET
    project = label_studio_client.find_project("bayescurate-demo")
    assert project is not None
    ids = label_studio_client.task_ids(project)
    assert set(ids) == chosen
    classes = json.loads((out / "world/pairs/classes/shape.json").read_text())["classes"]
    task = label_studio_client.sdk.tasks.get(id=ids[selection[0]["sample_id"]])
    assert task.data["predicted"] == selection[0]["predicted"] and task.data["predicted"] in classes
    assert task.data["epig"] == float(f"{selection[0]['score']:.4g}")  # numeric, rounded for people
    # Images by reference (staged under Label Studio's local-files root), not inlined into its database.
    assert task.data["image"].startswith("/data/local-files/?d=")
    posterior_id = json.loads((out / "posterior" / "posterior.json").read_text())["posterior_id"]
    assert [p.model_version for p in task.predictions] == [posterior_id]
    # Targeted selection draws from the candidates near the (blurred) targets.
    report = json.loads((out / "selection" / "selection.json").read_text())
    assert report["targets"] == 200 and BUDGET <= report["candidates"] <= report["pool"]

    # The corrupt pool files were quarantined, not lost and not embedded.
    quarantined = pq.read_table(out / "embeddings/pool/quarantine").num_rows
    embedded = sum(pq.read_table(p).num_rows for p in (out / "embeddings/pool").glob("part-*.parquet"))
    assert quarantined >= 1 and quarantined + embedded == 300

    # MLflow: the posterior fit and the zero-shot calibration, with MAP and Bayes metrics side by side.
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("bayescurate-demo")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"fit-posterior", "zeroshot"} <= set(runs)
    metrics = runs["zeroshot"].data.metrics
    assert {"map_ece", "bayes_ece", "map_nll", "bayes_nll", "map_accuracy", "bayes_accuracy"} <= set(metrics)

    # A rerun skips completed work and creates no duplicate task.
    assert demo.main(argv) == 0
    assert label_studio_client.task_ids(project) == ids
