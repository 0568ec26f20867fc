"""`campaign serve`'s request handling without serving: the shared secret, the body checks and the action
and project filter decide the answer, and only an accepted event asks for a step. Nothing listens (the
server is built, never started), so no step runs; the live server is tested against Label Studio in
test_campaign_webhooks.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from connectors.label_studio import WEBHOOK_ACTIONS
from pipeline.rounds.config import CampaignConfig
from pipeline.rounds.serve import WebhookServer
from pipeline.rounds.webhook import MIN_SECRET, SECRET_HEADER

SECRET = "s3cret-" + "x" * MIN_SECRET


def _campaign(directory: Path, **fields: object) -> str:
    """A campaign directory holding only its config (`campaign.yaml`): all the server reads at start."""
    cfg = CampaignConfig.model_validate({"pool": "p", "classes": "c.json", "posterior": "post"} | fields)
    directory.mkdir(parents=True)
    (directory / "campaign.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(directory)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[WebhookServer, list[str]]]:
    logged: list[str] = []
    app = WebhookServer(_campaign(tmp_path / "camp", project="shapes"), SECRET, log=logged.append)
    yield app, logged
    app.close()


def _event(action: str, **fields: object) -> bytes:
    return json.dumps({"action": action, **fields}).encode()


def _pending(app: WebhookServer) -> bool:
    return bool(app.health()[1]["pending"])


def test_only_the_shared_secret_is_authorized(server: tuple[WebhookServer, list[str]]) -> None:
    app, logged = server
    assert app.authorized(SECRET, "10.0.0.1")
    for wrong in (None, "", SECRET[:-1], SECRET + "x", SECRET.upper()):
        assert not app.authorized(wrong, "10.0.0.2")
    assert app.stats.refused == 5
    assert logged[-1] == f"refused a webhook from 10.0.0.2: missing or wrong {SECRET_HEADER} header"
    assert all(SECRET not in line for line in logged) and SECRET not in repr(app)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"{not json", "the body is not JSON"),
        (b"\xff\xfe", "the body is not JSON"),
        (b"[1, 2]", "the body is not a JSON object with a string `action`"),
        (json.dumps({"action": 3}).encode(), "the body is not a JSON object with a string `action`"),
        (_event("ANNOTATION_CREATED", project="shapes"), "`project` of ANNOTATION_CREATED is not an object"),
        (
            _event("ANNOTATION_CREATED", annotation=[{"id": 1}]),
            "ANNOTATION_CREATED without an object 'annotation'",
        ),
        (_event("ANNOTATION_UPDATED"), "ANNOTATION_UPDATED without an object 'annotation'"),
        (
            _event("ANNOTATIONS_CREATED", annotation={"id": 1}),
            "ANNOTATIONS_CREATED without a list 'annotation'",
        ),
        (
            _event("ANNOTATIONS_DELETED", annotation=[{"id": 1}]),
            "ANNOTATIONS_DELETED without a list 'annotations'",
        ),
    ],
)
def test_a_malformed_body_is_a_400_and_asks_for_no_step(
    server: tuple[WebhookServer, list[str]], body: bytes, why: str
) -> None:
    app, logged = server
    status, reply = app.handle(body, "10.0.0.3")
    assert status == 400 and reply["error"].startswith(why)
    assert app.stats.malformed == 1 and not app.stats.events and not _pending(app)
    assert logged == [f"malformed webhook from 10.0.0.3: {reply['error']}"]


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (_event("PROJECT_UPDATED", project={"title": "shapes"}), "PROJECT_UPDATED of project 'shapes'"),
        (_event("TASKS_CREATED"), "TASKS_CREATED of any project"),
        (
            _event("ANNOTATION_CREATED", project={"title": "other"}, annotation={}),
            "ANNOTATION_CREATED of project 'other'",
        ),
    ],
)
def test_events_of_another_action_or_project_are_acknowledged_and_ignored(
    server: tuple[WebhookServer, list[str]], body: bytes, what: str
) -> None:
    app, _ = server
    assert app.handle(body) == (202, {"ignored": f"{what}: this server steps project 'shapes'"})
    assert app.stats.ignored == 1 and not app.stats.events and not _pending(app)


def test_each_annotation_event_of_the_project_asks_for_one_step(
    server: tuple[WebhookServer, list[str]],
) -> None:
    app, logged = server
    payloads = {
        "ANNOTATION_CREATED": {"annotation": {"id": 1}},
        "ANNOTATION_UPDATED": {"annotation": {"id": 1}},
        "ANNOTATIONS_CREATED": {"annotation": [{"id": 2}, {"id": 3}]},
        "ANNOTATIONS_DELETED": {"annotations": [{"id": 2}]},
    }
    assert set(payloads) == set(WEBHOOK_ACTIONS)  # every action `campaign init --webhook` subscribes to
    assert not _pending(app)  # built, not started: no step asked for yet
    for action, payload in payloads.items():
        assert app.handle(_event(action, project={"title": "shapes"}, **payload)) == (
            202,
            {"accepted": action, "step": "now"},
        )
    assert app.handle(_event("ANNOTATION_CREATED", annotation={"id": 4}))[0] == 202  # no project: ours
    assert _pending(app)  # the events coalesce into one pending step
    assert app.stats.events == {**dict.fromkeys(payloads, 1), "ANNOTATION_CREATED": 2}
    assert (app.stats.malformed, app.stats.ignored, app.stats.refused) == (0, 0, 0)
    assert logged[0] == "ANNOTATION_CREATED in 'shapes'"
    status, health = app.health()
    assert status == 503 and health["status"] == "DOWN"  # nothing serves: probes must see it


def test_only_a_label_studio_campaign_with_a_long_secret_can_be_served(tmp_path: Path) -> None:
    oracle = _campaign(tmp_path / "oracle", label_source="oracle", truth="truth/")
    with pytest.raises(ValueError, match="takes its labels from oracle: only a Label Studio campaign"):
        WebhookServer(oracle, SECRET)
    camp = _campaign(tmp_path / "camp")
    with pytest.raises(ValueError, match=f"at least {MIN_SECRET} characters"):
        WebhookServer(camp, "x" * (MIN_SECRET - 1))
    with pytest.raises(ValueError, match="must be positive"):
        WebhookServer(camp, SECRET, retry_s=0)
    with pytest.raises(FileNotFoundError, match="not a campaign directory"):
        WebhookServer(str(tmp_path / "nowhere"), SECRET)
    app = WebhookServer(camp, SECRET)  # the project defaults to the directory's name
    try:
        assert app.project == "camp" and app.url.startswith("http://127.0.0.1:")
    finally:
        app.close()
