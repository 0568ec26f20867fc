"""Event-driven rounds: the REAL Label Studio posts its annotation webhooks to `campaign serve` on loopback,
and the campaign steps itself. The bot annotator answers round 0 and round 1 appears in Label Studio
without anyone calling `step`; an edit and a deletion reach the labels table the same way; requests without
the shared secret (or with a wrong one) get 403 and change nothing, malformed ones get 400."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.parquet as pq
import pytest
import yaml

from connectors import processes
from connectors.annotator_bot import answer_open_tasks
from connectors.label_studio import WEBHOOK_ACTIONS, LabelStudioClient, Project
from jobs import campaign as campaign_cli
from jobs.annotate_bot import bot_session, read_truth
from pipeline.rounds import campaign
from pipeline.rounds.labels import read_rows
from pipeline.rounds.serve import WebhookServer
from pipeline.rounds.state import RoundState, read_state
from pipeline.rounds.webhook import SECRET_ENV, SECRET_HEADER
from tests.fixtures_world import World

pytestmark = [pytest.mark.slow, pytest.mark.services]

BUDGET = 3
TIMEOUT = 240.0  # seconds; generous: a step re-fits and updates on two shared cores
ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _poll(what: str, check: Callable[[], T | None], timeout: float = TIMEOUT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s")
        time.sleep(0.5)


def _request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, JSON reply) of a GET (no body) or POST."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _hooks(client: LabelStudioClient, project: Project) -> list[Any]:
    return [h for h in client.sdk.webhooks.list(project=str(project.id)) if h.project == project.id]


def _config(world: World, state_dir: Path, project: str, **overrides: object) -> dict[str, Any]:
    cfg = world.config(
        label_source="label-studio",
        truth=None,
        project=project,
        state_dir=str(state_dir),
        budget=BUDGET,
        max_rounds=2,
        eval=None,
        **overrides,
    )
    return cfg.model_dump(mode="json")


def _secret_file(path: Path, secret: str) -> Path:
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def test_label_studio_webhooks_step_the_campaign(
    campaign_world: World,
    services_state_dir: Path,
    label_studio_client: LabelStudioClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = label_studio_client
    secret = secrets.token_urlsafe(24)
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}/webhook"
    name = f"hooks-{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "camp"
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(_config(campaign_world, services_state_dir, name, webhook=url)))

    # init registers the webhook with the secret header; a re-run (secret from the environment) keeps one.
    secret_file = _secret_file(tmp_path / "secret", secret)
    init = ["init", str(directory), "--config", str(config), "--secret-file", str(secret_file)]
    assert campaign_cli.main(init) == 0
    project = client.find_project(name)
    assert project is not None
    (hook,) = _hooks(client, project)
    assert (hook.url, hook.headers, sorted(hook.actions)) == (
        url,
        {SECRET_HEADER: secret},
        sorted(WEBHOOK_ACTIONS),
    )
    monkeypatch.setenv(SECRET_ENV, secret)
    campaign.init(str(directory), campaign.read_config(str(directory)), log=lambda _: None)
    assert [h.id for h in _hooks(client, project)] == [hook.id]

    lines: list[str] = []
    server = WebhookServer(str(directory), secret, port=port, log=lines.append).start()
    try:
        # The catch-up step at start pushes round 0.
        _poll("round 0 tasks", lambda: len(client.sample_ids(project)) == BUDGET)
        assert server.wait_idle(TIMEOUT)
        assert read_state(str(directory)).rounds[0].state is RoundState.COLLECTING

        # Without the secret, or with a wrong one: 403, and nothing happens. Malformed bodies: 400.
        state = (directory / "state.json").read_bytes()
        steps = server.stats.steps
        event = json.dumps(
            {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "project": {"title": name}}
        ).encode()
        json_type = {"Content-Type": "application/json"}
        assert _request(url, event, json_type)[0] == 403
        wrong = secret[:-1] + ("y" if secret.endswith("x") else "x")  # one character off, never the secret
        assert _request(url, event, json_type | {SECRET_HEADER: wrong})[0] == 403
        good = json_type | {SECRET_HEADER: secret}
        for body in (b"not json", b'{"action": 3}', b"[1, 2]", b'{"action": "ANNOTATION_CREATED"}'):
            status, reply = _request(url, body, good)
            assert status == 400 and reply["error"], body
        other = json.dumps({"action": "ANNOTATION_CREATED", "annotation": {}, "project": {"title": "x-y"}})
        status, reply = _request(url, other.encode(), good)
        assert status == 202 and "'x-y'" in reply["ignored"]
        status, health = _request(f"http://127.0.0.1:{port}/health")
        assert status == 200 and health["status"] == "UP" and health["project"] == name
        assert server.wait_idle(TIMEOUT)
        assert (directory / "state.json").read_bytes() == state and server.stats.steps == steps
        assert (server.stats.refused, server.stats.malformed, server.stats.ignored) == (2, 4, 1)

        # The bot answers round 0: Label Studio's ANNOTATION_CREATED webhooks step the campaign through
        # collect, train and update, and round 1's tasks appear in Label Studio.
        truth = read_truth(str(campaign_world.pool), "shape")
        bot = bot_session(client, "hooks-bot@bayescurate.local", str(services_state_dir))
        assert answer_open_tasks(bot, client, project, truth).answered == BUDGET
        _poll("round 1 tasks", lambda: len(client.sample_ids(project)) == 2 * BUDGET)
        assert server.wait_idle(TIMEOUT)
        rounds = read_state(str(directory)).rounds
        assert [r.state for r in rounds] == [RoundState.UPDATED, RoundState.COLLECTING]
        assert rounds[0].labels_used == BUDGET
        assert server.stats.events["ANNOTATION_CREATED"] == BUDGET

        # An edit (ANNOTATION_UPDATED) is collected as a new version of the annotation.
        first = client.annotations(project, round=0)[0]
        relabel = next(c for c in project.classes if c != first.label)
        bot.update(first.annotation_id, relabel)
        aid = f"ls:{first.annotation_id}"
        _poll("the edit in the labels table", lambda: read_rows(str(directory))[-1].label == relabel)
        versions = [r for r in read_rows(str(directory)) if r.annotation_id == aid]
        assert [v.label for v in versions] == [first.label, relabel]
        assert server.stats.events["ANNOTATION_UPDATED"] == 1

        # An answer to round 1, then its deletion (ANNOTATIONS_DELETED): a tombstone, and the count drops.
        assert answer_open_tasks(bot, client, project, truth, limit=1).answered == 1
        _poll("round 1's answer", lambda: read_state(str(directory)).rounds[1].counts.answered == 1)
        (answer,) = client.annotations(project, round=1)
        client.sdk.annotations.delete(id=answer.annotation_id)
        _poll("the deletion", lambda: read_state(str(directory)).rounds[1].counts.answered == 0)
        rows = [r for r in read_rows(str(directory)) if r.annotation_id == f"ls:{answer.annotation_id}"]
        assert [r.deleted for r in rows] == [False, True]
        assert server.stats.events["ANNOTATIONS_DELETED"] == 1

        # "Create Annotations From Predictions" in the Data Manager, on two of round 1's tasks: one
        # ANNOTATIONS_CREATED, and both answers (the model's predictions, accepted by a person) are collected.
        picks = pq.read_table(directory / "rounds/001/picks.parquet").to_pylist()
        ids = client.task_ids(project)
        chosen = {ids[p["sample_id"]]: p["predicted"] for p in picks[:2]}
        client.sdk.actions.create(
            id="predictions_to_annotations",
            project=project.id,
            selected_items={"all": False, "included": sorted(chosen)},
        )
        _poll(
            "the accepted predictions",
            lambda: read_state(str(directory)).rounds[1].counts.answered == 2,
        )
        latest = {r.annotation_id: r for r in read_rows(str(directory)) if r.round == 1}  # last version each
        accepted = {r.task_id: r.label for r in latest.values() if not r.deleted}
        assert accepted == chosen
        assert server.stats.events["ANNOTATIONS_CREATED"] == 1
        assert server.wait_idle(TIMEOUT) and server.stats.failures == 0
    finally:
        server.close()
    assert not [line for line in lines if secret in line]


def test_campaign_serve_is_a_command_that_stops_on_sigterm(
    campaign_world: World,
    services_state_dir: Path,
    label_studio_client: LabelStudioClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"serve-{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "camp"
    cfg = campaign.CampaignConfig.model_validate(_config(campaign_world, services_state_dir, name))
    campaign.init(str(directory), cfg, log=lambda _: None)

    # No secret, or a short one: refused before listening, naming where the secret comes from.
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert campaign_cli.main(["serve", str(directory), "--port", "0"]) == 2
    assert SECRET_ENV in capsys.readouterr().err
    short = _secret_file(tmp_path / "short", "too-short")
    assert campaign_cli.main(["serve", str(directory), "--secret-file", str(short)]) == 2
    err = capsys.readouterr().err
    assert "fewer than 16" in err and "too-short" not in err

    secret = secrets.token_urlsafe(24)
    port = processes.free_port()
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV} | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "jobs.cli", "campaign", "serve", str(directory), "--port", str(port)]
    command += ["--secret-file", str(_secret_file(tmp_path / "secret", secret))]
    server = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        health = f"http://127.0.0.1:{port}/health"

        def stepped() -> dict[str, Any] | None:
            try:
                status, body = _request(health)
            except OSError:
                return None  # not listening yet
            return body if status == 200 and body["steps"] >= 1 else None

        assert _poll("the catch-up step", stepped)["waiting"]
        project = label_studio_client.find_project(name)
        assert project is not None and len(label_studio_client.sample_ids(project)) == BUDGET
        hook = f"http://127.0.0.1:{port}/webhook"
        assert _request(hook, b'{"action": "ANNOTATION_CREATED"}', {SECRET_HEADER: "wrong" * 5})[0] == 403
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, err[-2000:]
    assert "SIGTERM: stopping" in out and out.rstrip().endswith("stopped")
    assert f"{port}/webhook" in out and "refused a webhook" in out
    assert secret not in out + err
