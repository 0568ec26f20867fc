"""A campaign against the REAL Label Studio and MLflow servers: tasks people can sort, answers as annotators
give them (partial, skipped, edited, several annotators, not a class), and MLflow per round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from connectors.label_studio import LabelStudioClient
from jobs import campaign as campaign_cli
from jobs.annotate_bot import bot_session
from pipeline.artifacts.posterior import read_info
from pipeline.rounds import campaign
from pipeline.rounds.state import RoundState, read_state
from tests.fixtures_world import World

pytestmark = [pytest.mark.slow, pytest.mark.services]

BUDGET = 5


def test_a_round_through_label_studio_and_mlflow(
    campaign_world: World,
    tmp_path: Path,
    services_state_dir: Path,
    label_studio_client: LabelStudioClient,
    mlflow_server: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    project_name = "campaign-ls-test"
    cfg = campaign_world.config(
        label_source="label-studio",
        truth=None,
        project=project_name,
        state_dir=str(services_state_dir),
        budget=BUDGET,
        max_rounds=1,
        tracking=True,
        tracking_uri=mlflow_server,
        experiment="campaign-ls-test",
    )
    directory = tmp_path / "camp"
    campaign.init(str(directory), cfg, log=lambda _: None)
    assert campaign_cli.main(["step", str(directory)]) == 0
    out = capsys.readouterr().out
    assert f"waiting: 0 of {BUDGET} tasks answered in round 0" in out

    # The tasks: numeric sortable fields, the round's posterior as model version, images by reference,
    # a link to the round's MLflow run.
    client = label_studio_client
    project = client.find_project(project_name)
    assert project is not None
    ids = client.task_ids(project)
    picks = campaign.Campaign(str(directory)).picks(0)
    assert sorted(ids) == sorted(picks)
    start_id = read_info(campaign_world.posterior)["posterior_id"]
    state = read_state(str(directory))
    run_id = state.rounds[0].mlflow_run_id
    assert run_id is not None
    for sid in picks:
        task = client.sdk.tasks.get(id=ids[sid])
        data = task.data
        assert isinstance(data["epig"], float) and isinstance(data["entropy"], float)
        assert isinstance(data["confidence"], float) and isinstance(data["rank"], int) and data["round"] == 0
        assert data["image"].startswith("/data/local-files/?d=")
        assert data["mlflow_run"].endswith(f"/runs/{run_id}")
        assert [p.model_version for p in task.predictions] == [start_id]
        assert 0 <= data["informativeness"] <= 100  # the pick's score in percent of the round's best
    shares = [client.sdk.tasks.get(id=ids[sid]).data["informativeness"] for sid in picks]
    assert max(shares) == 100
    # The tab annotators open: most informative first; its URL is the one the campaign records.
    push = json.loads((directory / "rounds/000/push.json").read_text())
    tab = client.find_view(project, "most informative first (epig)")
    assert tab is not None and push["url"].endswith(f"/projects/{project.id}/data?tab={tab}")
    by_tab = [
        client.sdk.tasks.get(id=ids[sid]).data["informativeness"]
        for sid in client.sample_ids(project, view=tab)
    ]
    assert by_tab == sorted(shares, reverse=True)
    # The round's run shows what it asked about from the push on, before anyone answered.
    assert "picks.png" in {a.path for a in MlflowClient(mlflow_server).list_artifacts(run_id)}
    token = (Path(services_state_dir) / "labelstudio" / "token").read_text().strip()
    url = client.url + client.sdk.tasks.get(id=ids[picks[0]]).data["image"]
    image = requests.get(url, headers={"Authorization": f"Token {token}"}, timeout=30)
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    # Sorting the Data Manager by EPIG orders the tasks numerically, highest first.
    view = client.ensure_view(project, "by EPIG", order_by="epig", descending=True, number_columns=("epig",))
    scores = [client.sdk.tasks.get(id=ids[sid]).data["epig"] for sid in client.sample_ids(project, view=view)]
    assert scores == sorted(scores, reverse=True)

    # Annotators answer part of the round: the step waits and trains nothing.
    ann1 = bot_session(client, "campaign-a1@bayescurate.local", str(services_state_dir))
    ann2 = bot_session(client, "campaign-a2@bayescurate.local", str(services_state_dir))
    truth = {r["sample_id"]: r["shape"] for r in _pool_rows(campaign_world)}
    t = [ids[sid] for sid in picks]
    first = ann1.annotate(t[0], "circle" if truth[picks[0]] != "circle" else "square")  # a wrong answer ...
    ann1.skip(t[1])
    assert campaign_cli.main(["step", str(directory)]) == 0
    assert f"waiting: 2 of {BUDGET} tasks answered" in capsys.readouterr().out
    assert read_state(str(directory)).rounds[0].state is RoundState.COLLECTING
    assert not (directory / "rounds/000/projection.safetensors").exists()

    ann1.update(first, truth[picks[0]])  # ... corrected: the latest version wins
    ann1.annotate(t[2], truth[picks[2]])
    ann2.annotate(t[2], truth[picks[2]])  # two annotators agree
    ann1.annotate(t[3], truth[picks[3]])
    ann2.annotate(t[3], "circle" if truth[picks[3]] == "square" else "square")  # two disagree
    ann1.annotate(t[4], "hexagon")  # not a class: quarantined, still an answer
    assert campaign_cli.main(["status", str(directory), "--json"]) == 0
    assert "2 of 5 tasks answered" in json.loads(capsys.readouterr().out)["waiting"]
    assert campaign_cli.main(["step", str(directory)]) == 0
    capsys.readouterr()

    state = read_state(str(directory))
    r0 = state.rounds[0]
    assert r0.state is RoundState.UPDATED
    c = r0.counts.labels
    assert c is not None and r0.counts.selection.tasks == 5
    assert (c.tasks, c.answered, c.labelled, c.skipped, c.quarantined) == (5, 5, 3, 1, 1)
    assert c.multi_annotated == 2 and c.agreement == pytest.approx(0.75)
    assert r0.labels_used == 3
    labels = {r["sample_id"]: r["label"] for r in _table(directory / "rounds/000/labels.parquet")}
    assert labels[picks[0]] == truth[picks[0]] and labels[picks[2]] == truth[picks[2]]
    quarantined = _table_dir(directory / "labels/quarantine")
    assert [(q["sample_id"], q["label"]) for q in quarantined] == [(picks[4], "hexagon")]

    # MLflow: the campaign's run, the round's nested run with params, counts, timings, metrics, artifacts.
    ml = MlflowClient(mlflow_server)
    round_run = ml.get_run(run_id)
    assert round_run.data.tags["mlflow.parentRunId"] == state.mlflow_run_id
    assert round_run.data.params["method"] == "epig" and round_run.data.params["posterior_id"] == start_id
    metrics = round_run.data.metrics
    for key in ("labels.labelled", "labels.skipped", "labels.agreement", "seconds.train", "seconds.select"):
        assert key in metrics, key
    for key in (
        "eval.MAP.accuracy",
        "eval.Bayes.nll",
        "eval.Bayes.ece",
        "eval.MAP.brier",
        "eval.domains.blur.MAP.ece",
    ):
        assert key in metrics, key
    artifacts = {a.path for a in ml.list_artifacts(run_id)}
    assert {
        "reliability.png",
        "picks.json",
        "round.json",
        "posterior",
        "picks.png",
        "per_class.png",
    } <= artifacts
    assert {a.path for a in ml.list_artifacts(run_id, "posterior")} >= {
        "posterior/posterior.json",
        "posterior/image_projection.safetensors",
    }
    assert round_run.info.status == "FINISHED"
    parent = {a.path for a in ml.list_artifacts(state.mlflow_run_id, "curves")}
    assert {"curves/accuracy.png", "curves/nll.png", "curves/ece.png"} <= parent
    assert {"per_class.png", "classes_not_moved.md"} <= {
        a.path for a in ml.list_artifacts(state.mlflow_run_id)
    }
    assert any(key.startswith("eval.classes.") for key in metrics)


def _pool_rows(world: World) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for f in sorted(world.pool.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def _table(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _table_dir(path: Path) -> list[dict]:
    return [r for f in sorted(path.glob("*.parquet")) for r in _table(f)]
