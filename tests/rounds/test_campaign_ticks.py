"""Scheduled ticks: `bayescurate campaign step DIR` run again and again by a scheduler, in-process.

A tick with too few answers exits 0 saying what it waits for and makes no transition; the tick after the
answers arrive runs collect -> train -> update -> select -> push; a tick right after it changes nothing;
a tick while another step holds the lease exits 3 naming it. The Label Studio ticks run the way a cluster pod
does: the server and its token come from `LABEL_STUDIO_URL` / `LABEL_STUDIO_API_KEY` (a Secret there), and
no services state dir exists (`LabelStudioClient.from_env`), against the REAL server of the session, with
the bot annotator answering `limit` tasks at a time.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from connectors.annotator_bot import answer_open_tasks
from connectors.label_studio import LabelStudioAuthError, LabelStudioClient
from connectors.service_state import LabelStudioService
from jobs import campaign as campaign_cli
from jobs.annotate_bot import bot_session, read_truth
from pipeline.rounds import campaign, lease
from pipeline.rounds.labels import read_rows
from pipeline.rounds.sources import LabelStudioSource
from pipeline.rounds.state import STATE_FILE, RoundState, read_state
from tests.fixtures_world import World

pytestmark = pytest.mark.slow

BUDGET = 4
URL, TOKEN = LabelStudioClient.URL_ENV, LabelStudioClient.TOKEN_ENV


def _quiet(_: str) -> None:
    pass


def _tick(directory: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """One scheduled tick through the CLI: (exit code, the lines it printed)."""
    capsys.readouterr()
    code = campaign_cli.main(["step", str(directory)])
    return code, capsys.readouterr().out.splitlines()


def _rounds(directory: Path) -> list[tuple[int, RoundState]]:
    return [(r.index, r.state) for r in read_state(str(directory)).rounds]


def _round_dirs(directory: Path) -> list[str]:
    rounds = directory / "rounds"
    return sorted(p.name for p in rounds.iterdir()) if rounds.is_dir() else []


@pytest.fixture
def pod_env(
    label_studio_server: LabelStudioService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> LabelStudioService:
    """The environment of a cluster pod: Label Studio from two variables, an empty services state dir."""
    monkeypatch.setenv(URL, label_studio_server.url)
    monkeypatch.setenv(TOKEN, label_studio_server.token())
    monkeypatch.setenv("BAYESCURATE_STATE_DIR", str(tmp_path / "pod-state"))
    return label_studio_server


@pytest.mark.services
def test_ticks_wait_for_answers_then_run_one_round_and_never_repeat_it(
    campaign_world: World,
    pod_env: LabelStudioService,
    label_studio_client: LabelStudioClient,
    services_state_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory = tmp_path / "ticks"
    title = f"ticks-{uuid.uuid4().hex[:8]}"
    cfg = campaign_world.config(
        label_source="label-studio",
        truth=None,
        project=title,
        budget=BUDGET,
        max_rounds=2,
        eval=None,
        inline_max_bytes=1 << 20,  # no local-files root is known from the environment: inline the images
    )
    campaign.init(str(directory), cfg, log=_quiet)
    project = label_studio_client.find_project(title)
    assert project is not None
    bot = bot_session(label_studio_client, "tick-bot@bayescurate.local", str(services_state_dir))
    truth = read_truth(str(campaign_world.pool), "shape")

    # Tick 1: round 0 is selected and pushed, then waits.
    code, lines = _tick(directory, capsys)
    assert code == 0, lines
    assert [line.split(":")[0] for line in lines] == ["round 0", "round 0", "waiting"], lines
    assert lines[-1].startswith(f"waiting: 0 of {BUDGET} tasks answered in round 0"), lines
    assert _rounds(directory) == [(0, RoundState.COLLECTING)]
    push = (directory / "rounds" / "000" / "push.json").read_text()
    assert pod_env.url in push  # the tasks went to the server the environment names

    # Tick 2, with too few answers: exit 0, one line saying so, no transition.
    answer_open_tasks(bot, label_studio_client, project, truth, limit=2)
    code, lines = _tick(directory, capsys)
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith(f"waiting: 2 of {BUDGET} tasks answered in round 0"), lines
    assert _rounds(directory) == [(0, RoundState.COLLECTING)]
    assert not (directory / "rounds" / "000" / "labels.parquet").exists()  # not collected for training
    assert _round_dirs(directory) == ["000"]

    # Tick 3, every answer in: collect -> train -> update -> select -> push, then waits for round 1.
    answer_open_tasks(bot, label_studio_client, project, truth)
    code, lines = _tick(directory, capsys)
    assert code == 0
    steps = [" ".join(line.split()[:3]).rstrip(":") for line in lines]
    assert steps == [
        "round 0: collected",
        "round 0: trained",
        "round 0: updated",
        "round 1: selected",
        "round 1: pushed",
        "waiting: 0 of",
    ], lines
    assert _rounds(directory) == [(0, RoundState.UPDATED), (1, RoundState.COLLECTING)]
    after = (directory / STATE_FILE).read_bytes()

    # Tick 4, right after: nothing new to do, nothing created twice.
    code, lines = _tick(directory, capsys)
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith(f"waiting: 0 of {BUDGET} tasks answered in round 1"), lines
    assert (directory / STATE_FILE).read_bytes() == after
    assert _round_dirs(directory) == ["000", "001"]
    tasks = label_studio_client.sample_ids(project)
    assert len(tasks) == 2 * BUDGET and len(set(tasks)) == 2 * BUDGET
    assert len(read_rows(str(directory))) == BUDGET  # each answer once in the labels table


def test_a_tick_while_another_step_holds_the_lease_exits_3_and_changes_nothing(
    campaign_world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "held"
    campaign.init(str(directory), campaign_world.config(max_rounds=1, eval=None), log=_quiet)
    before = (directory / STATE_FILE).read_bytes()
    capsys.readouterr()
    # flock locks belong to open files, so this process's own second open is refused like another's.
    with lease.acquire(str(directory), "campaign run --wait"):
        code = campaign_cli.main(["step", str(directory)])
    err = capsys.readouterr().err
    assert code == campaign_cli.LEASE_HELD == 3
    assert f"pid {os.getpid()} on {socket.gethostname()}" in err and "(campaign run --wait)" in err, err
    assert (directory / STATE_FILE).read_bytes() == before
    assert _round_dirs(directory) == []


def test_ticks_after_the_last_round_do_nothing(
    campaign_world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "done"
    campaign.init(str(directory), campaign_world.config(max_rounds=1, eval=None), log=_quiet)
    code, lines = _tick(directory, capsys)  # the oracle answers at once: the whole round in one tick
    assert code == 0 and any(line.startswith("round 0: updated") for line in lines), lines
    after = (directory / STATE_FILE).read_bytes()
    for _ in range(2):
        code, lines = _tick(directory, capsys)
        assert (code, lines) == (0, ["nothing to do: 1 rounds done"])
    assert (directory / STATE_FILE).read_bytes() == after
    assert _rounds(directory) == [(0, RoundState.UPDATED)]


# ------------------------------------------------------------------- Label Studio from the environment


def test_from_env_names_what_is_missing_or_malformed() -> None:
    with pytest.raises(ValueError, match=f"{URL} and {TOKEN} not set"):
        LabelStudioClient.from_env({})
    with pytest.raises(ValueError, match=f"{TOKEN} not set"):
        LabelStudioClient.from_env({URL: "http://127.0.0.1:8080", TOKEN: "  "})
    with pytest.raises(ValueError, match=f"{URL} must be an http"):
        LabelStudioClient.from_env({URL: "127.0.0.1:8080", TOKEN: "t"})
    assert not LabelStudioClient.env_configured({URL: "http://x"})
    assert LabelStudioClient.env_configured({URL: "http://x", TOKEN: "t"})


@pytest.mark.services
def test_from_env_reaches_the_server_and_never_shows_a_wrong_token(
    label_studio_server: LabelStudioService,
) -> None:
    good = LabelStudioClient.from_env({URL: label_studio_server.url, TOKEN: label_studio_server.token()})
    assert good.find_project(f"absent-{uuid.uuid4().hex[:8]}") is None
    wrong = "not-the-token-" + uuid.uuid4().hex
    bad = LabelStudioClient.from_env({URL: label_studio_server.url, TOKEN: wrong}, retry_for=5)
    with pytest.raises(LabelStudioAuthError) as refused:
        bad.find_project("anything")
    assert wrong not in str(refused.value) and wrong not in repr(bad)


@pytest.mark.services
def test_the_label_studio_source_prefers_a_named_state_dir_then_the_environment(
    label_studio_server: LabelStudioService, services_state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(URL, "http://127.0.0.1:9")  # discard port: a client is built, nothing is sent
    monkeypatch.setenv(TOKEN, "from-the-environment")
    named = LabelStudioSource("a-project", ["a", "b"], state_dir=str(services_state_dir))
    assert named.client.url == label_studio_server.url
    assert LabelStudioSource("a-project", ["a", "b"]).client.url == "http://127.0.0.1:9"
    monkeypatch.delenv(TOKEN)  # a server of your own without a token: refused, not the local one instead
    with pytest.raises(ValueError, match=f"{TOKEN}"):
        _ = LabelStudioSource("a-project", ["a", "b"]).client
    monkeypatch.delenv(URL)
    monkeypatch.setenv("BAYESCURATE_STATE_DIR", str(services_state_dir))
    assert LabelStudioSource("a-project", ["a", "b"]).client.url == label_studio_server.url
