"""A Label Studio outage during `campaign step`, against the REAL server, stopped mid-step and restarted.

The client retries for the campaign's `label_studio_retry_s` (2 s here), then raises `LabelStudioError`;
`campaign step` exits 4 with one line naming the server, `state.json` is what the last completed transition
wrote, and the next step, once the server is back, completes the round with no task twice. `campaign serve`
keeps running through an outage and retries until the round is done.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors import processes
from connectors.annotator_bot import answer_open_tasks
from connectors.label_studio import LabelStudioClient, Project
from connectors.labelstudio_server import healthy
from connectors.service_state import read_state as read_services
from jobs import campaign as campaign_cli
from jobs.annotate_bot import bot_session, read_truth
from pipeline.rounds import campaign
from pipeline.rounds.serve import WebhookServer
from pipeline.rounds.state import RoundState, read_state
from tests.fixtures_services import restart_label_studio
from tests.fixtures_world import World

pytestmark = [pytest.mark.slow, pytest.mark.services]

BUDGET = 3
RETRY_S = 2.0
TIMEOUT = 240.0  # seconds; generous polling on two shared cores


def _poll(what: str, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s")
        time.sleep(0.5)


def _stop_label_studio(state_dir: Path) -> None:
    """Stop the server as a crash would: its record stays in services.json, so clients still call it."""
    ls = read_services(state_dir).label_studio
    assert ls is not None and processes.stop(ls.process)
    assert not healthy(ls.url)


@pytest.fixture
def revive(services_state_dir: Path) -> Iterator[None]:
    """Whatever the test does, the session's Label Studio is up again after it."""
    yield
    ls = read_services(services_state_dir).label_studio
    if ls is None or not healthy(ls.url):
        restart_label_studio(services_state_dir)


def _init(world: World, state_dir: Path, directory: Path) -> str:
    name = f"outage-{uuid.uuid4().hex[:8]}"
    cfg = world.config(
        label_source="label-studio",
        truth=None,
        project=name,
        state_dir=str(state_dir),
        budget=BUDGET,
        max_rounds=1,
        eval=None,
        label_studio_retry_s=RETRY_S,
    )
    campaign.init(str(directory), cfg, log=lambda _: None)
    return name


def _project(client: LabelStudioClient, name: str) -> Project:
    project = client.find_project(name)
    assert project is not None
    return project


def _unavailable(err: str, token: str) -> str:
    """The one error line of a step that found Label Studio down."""
    (line,) = [line for line in err.splitlines() if line.startswith("unavailable:")]
    assert "Label Studio at http://" in line and f"within {RETRY_S:g} s" in line, line
    assert "Traceback" not in err and token not in err
    return line


def test_an_outage_mid_push_exits_4_leaves_the_state_and_the_next_step_completes_the_round(
    campaign_world: World,
    services_state_dir: Path,
    label_studio_client: LabelStudioClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    revive: None,
) -> None:
    directory = tmp_path / "camp"
    name = _init(campaign_world, services_state_dir, directory)
    token = read_services(services_state_dir).label_studio.token()  # type: ignore[union-attr]

    # The server goes down mid-push: the project, its image storage and the task listing are done, the
    # import is not. What state.json said at that moment is what it must still say after the failure.
    seen: dict[str, Any] = {}
    original = LabelStudioClient.import_tasks

    def import_after_a_crash(self: LabelStudioClient, project: Project, tasks: Any) -> Any:
        if not seen:
            seen["state"] = (directory / "state.json").read_bytes()
            seen["picks"] = (directory / "rounds/000/picks.parquet").read_bytes()
            _stop_label_studio(services_state_dir)
        return original(self, project, tasks)

    monkeypatch.setattr(LabelStudioClient, "import_tasks", import_after_a_crash)
    assert campaign_cli.main(["step", str(directory)]) == campaign_cli.SERVICE_UNAVAILABLE
    line = _unavailable(capsys.readouterr().err, token)
    assert f"project {name!r}" in line
    assert (directory / "state.json").read_bytes() == seen["state"]
    assert read_state(str(directory)).rounds[0].state is RoundState.SELECTED
    assert not (directory / "rounds/000/push.json").exists()

    # Still down: the next tick fails the same way and changes nothing either.
    assert campaign_cli.main(["step", str(directory)]) == campaign_cli.SERVICE_UNAVAILABLE
    _unavailable(capsys.readouterr().err, token)
    assert (directory / "state.json").read_bytes() == seen["state"]

    # Back up: the next tick pushes the same picks, once each, and the round completes.
    monkeypatch.setattr(LabelStudioClient, "import_tasks", original)
    restart_label_studio(services_state_dir)
    client = label_studio_client
    project = _project(client, name)
    assert client.sample_ids(project) == []
    assert campaign_cli.main(["step", str(directory)]) == 0
    assert "waiting: 0 of 3 tasks answered in round 0" in capsys.readouterr().out
    assert (directory / "rounds/000/picks.parquet").read_bytes() == seen["picks"]
    picks = campaign.Campaign(str(directory)).picks(0)
    assert sorted(client.sample_ids(project)) == sorted(picks)
    bot = bot_session(client, "outage-bot@bayescurate.local", str(services_state_dir))
    answer_open_tasks(bot, client, project, read_truth(str(campaign_world.pool), "shape"))
    assert campaign_cli.main(["step", str(directory)]) == 0
    (done,) = read_state(str(directory)).rounds
    assert done.state is RoundState.UPDATED and done.labels_used == BUDGET


def test_an_outage_during_collect_changes_nothing_and_campaign_serve_retries_until_it_ends(
    campaign_world: World,
    services_state_dir: Path,
    label_studio_client: LabelStudioClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    revive: None,
) -> None:
    directory = tmp_path / "camp"
    name = _init(campaign_world, services_state_dir, directory)
    token = read_services(services_state_dir).label_studio.token()  # type: ignore[union-attr]
    client = label_studio_client
    assert campaign_cli.main(["step", str(directory)]) == 0  # round 0 pushed, waiting
    project = _project(client, name)
    bot = bot_session(client, "outage-bot@bayescurate.local", str(services_state_dir))
    answer_open_tasks(bot, client, project, read_truth(str(campaign_world.pool), "shape"))
    state = (directory / "state.json").read_bytes()
    capsys.readouterr()

    _stop_label_studio(services_state_dir)
    assert campaign_cli.main(["step", str(directory)]) == campaign_cli.SERVICE_UNAVAILABLE
    _unavailable(capsys.readouterr().err, token)
    assert (directory / "state.json").read_bytes() == state
    assert not (directory / "labels").exists()  # no answer half-collected

    # `campaign serve` outlives the outage: its steps fail and are retried (every second here), it stays
    # healthy, and once the server is back a retry completes the round without any event or `step`.
    lines: list[str] = []
    server = WebhookServer(str(directory), secrets.token_urlsafe(24), retry_s=1.0, log=lines.append).start()
    try:
        _poll("a failed step", lambda: server.stats.failures >= 1)
        status, health = server.health()
        assert status == 200 and "unreachable" in health["last_error"]
        assert (directory / "state.json").read_bytes() == state
        restart_label_studio(services_state_dir)
        _poll("the round's end", lambda: read_state(str(directory)).rounds[0].state is RoundState.UPDATED)
    finally:
        server.close()
    (done,) = read_state(str(directory)).rounds
    assert done.labels_used == BUDGET and server.stats.steps >= 1 and server.stats.last_error is None
    assert any(line.startswith("step not done: Label Studio failed") for line in lines)
