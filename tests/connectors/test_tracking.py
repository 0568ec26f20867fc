from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
from mlflow.tracking import MlflowClient

from connectors.tracking import Tracker


def _log_round(tracker: Tracker, tmp_path: Path) -> tuple[str, str]:
    factors = tmp_path / "factors.safetensors"
    factors.write_bytes(b"\x00" * 64)
    with tracker.run("curation", params={"budget": 10}) as parent:
        params = {"round": 1, "acquisition": {"method": "epig", "k": 64}, "ls_api_token": "s3cr3t-value"}
        with tracker.run("round-1", params=params, parent=parent) as run:
            for step, acc in enumerate([0.5, 0.625, 0.75]):
                run.log_metrics({"accuracy": acc, "ece": 0.1 / (step + 1)}, step=step)
            run.log_dict({"selected": ["s1", "s2"]}, "round/selection.json")
            fig, ax = plt.subplots()
            ax.plot([0, 1], [0, 1])
            run.log_figure(fig, "plots/reliability.png")
            plt.close(fig)
            run.log_artifact(factors, "posterior")
    return parent.run_id, run.run_id


def _check(tracking_uri: str, experiment: str, parent_id: str, run_id: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "round-1"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.params == {"round": "1", "acquisition.method": "epig", "acquisition.k": "64"}
    history = client.get_metric_history(run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.625), (2, 0.75)]
    paths = {a.path for a in client.list_artifacts(run_id)}
    assert paths == {"round", "plots", "posterior"}
    assert [a.path for a in client.list_artifacts(run_id, "posterior")] == ["posterior/factors.safetensors"]
    local = client.download_artifacts(run_id, "round/selection.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == {"selected": ["s1", "s2"]}
    png = client.download_artifacts(run_id, "plots/reliability.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_local_sqlite_without_server(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    tracker = Tracker(uri, "local-project")
    parent_id, run_id = _log_round(tracker, tmp_path)
    _check(uri, "local-project", parent_id, run_id, tmp_path / "dl")
    assert (tmp_path / "mlflow" / "artifacts").is_dir()  # not ./mlruns in the cwd
    assert Tracker(uri, "local-project").experiment_id == tracker.experiment_id  # idempotent


def test_failed_run_is_marked_failed_and_can_be_resumed(tmp_path: Path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "resume")
    with pytest.raises(RuntimeError), tracker.run("round-2") as run:
        run.log_metrics({"loss": 1.0}, step=0)
        raise RuntimeError("preempted")
    assert tracker.client.get_run(run.run_id).info.status == "FAILED"
    found = tracker.find_run("round-2")
    assert found == run.run_id
    with tracker.run("round-2", run_id=found) as resumed:
        resumed.log_metrics({"loss": 0.5}, step=1)
    assert tracker.client.get_run(run.run_id).info.status == "FINISHED"
    assert [m.value for m in tracker.client.get_metric_history(run.run_id, "loss")] == [1.0, 0.5]


@pytest.mark.services
def test_server_runs_metrics_and_artifacts_read_back(mlflow_server: str, tmp_path: Path) -> None:
    tracker = Tracker(mlflow_server, "server-project")
    parent_id, run_id = _log_round(tracker, tmp_path)
    _check(mlflow_server, "server-project", parent_id, run_id, tmp_path / "dl")


def test_default_prefers_env_then_local_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker.default("defaults", state_dir=tmp_path)
    assert tracker.tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert Tracker.default("defaults", state_dir=tmp_path).tracking_uri.endswith("other.db")
