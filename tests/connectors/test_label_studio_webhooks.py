"""Webhooks from the REAL Label Studio of the test session to a tiny HTTP server in the test."""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from connectors.annotator_bot import BotAnnotator
from connectors.label_studio import (
    WEBHOOK_ACTIONS,
    WEBHOOK_PAYLOADS,
    LabelStudioClient,
    Prediction,
    Project,
    TaskInput,
    inline_image,
)

CLASSES = ["cat", "dog"]
SECRET = "X-Bayescurate-Secret"


@pytest.fixture
def receiver() -> Iterator[tuple[str, queue.Queue[tuple[dict[str, str], dict[str, Any]]]]]:
    """URL of a loopback HTTP server and the queue of (headers, JSON body) it received."""
    received: queue.Queue[tuple[dict[str, str], dict[str, Any]]] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.put(({k.lower(): v for k, v in self.headers.items()}, json.loads(body or b"{}")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/label-studio", received
    server.shutdown()
    server.server_close()


def _next(
    received: queue.Queue[tuple[dict[str, str], dict[str, Any]]], action: str
) -> tuple[dict[str, str], dict]:
    """The next delivery of `action` (Label Studio delivers during the request that triggers it)."""
    while True:
        headers, body = received.get(timeout=30)
        if body.get("action") == action:
            return headers, body


@pytest.mark.services
def test_webhook_is_registered_once_and_delivers_annotations_with_the_secret(
    label_studio_client: LabelStudioClient,
    receiver: tuple[str, queue.Queue[tuple[dict[str, str], dict[str, Any]]]],
) -> None:
    url, received = receiver
    project = label_studio_client.ensure_project(f"webhooks {uuid.uuid4().hex[:8]}", CLASSES)
    hook = label_studio_client.ensure_webhook(project, url, headers={SECRET: "old"})
    assert label_studio_client.ensure_webhook(project, url, headers={SECRET: "s3cret"}) == hook
    mine = [
        h for h in label_studio_client.sdk.webhooks.list(project=str(project.id)) if h.project == project.id
    ]
    assert [(h.id, h.url, h.headers) for h in mine] == [(hook, url, {SECRET: "s3cret"})]
    assert sorted(mine[0].actions) == sorted(WEBHOOK_ACTIONS)

    label_studio_client.import_tasks(project, [TaskInput("s1", inline_image(b"x"), round=1)])
    task_id = label_studio_client.task_ids(project)["s1"]
    bot = BotAnnotator.create(label_studio_client, f"hooked-{uuid.uuid4().hex[:6]}@example.com")
    annotation = bot.annotate(task_id, "cat")
    headers, body = _next(received, "ANNOTATION_CREATED")
    assert headers[SECRET.lower()] == "s3cret"
    assert body["annotation"]["id"] == annotation and body["task"]["id"] == task_id
    assert body["project"]["id"] == project.id and body["task"]["data"]["sample_id"] == "s1"

    bot.update(annotation, "dog")
    headers, body = _next(received, "ANNOTATION_UPDATED")
    assert headers[SECRET.lower()] == "s3cret" and body["annotation"]["result"][0]["value"]["choices"] == [
        "dog"
    ]

    # The Data Manager's "Create Annotations From Predictions" makes many at once: one ANNOTATIONS_CREATED
    # whose `annotation` (singular) is a list.
    guessed = [
        TaskInput(f"p{i}", inline_image(b"x"), round=1, prediction=Prediction("dog", 0.8)) for i in (1, 2)
    ]
    label_studio_client.import_tasks(project, guessed)
    ids = label_studio_client.task_ids(project)
    chosen = sorted(ids[t.sample_id] for t in guessed)
    label_studio_client.sdk.actions.create(
        id="predictions_to_annotations", project=project.id, selected_items={"all": False, "included": chosen}
    )
    headers, body = _next(received, "ANNOTATIONS_CREATED")
    assert headers[SECRET.lower()] == "s3cret" and body["project"]["id"] == project.id
    assert sorted(a["task"] for a in body["annotation"]) == chosen
    assert [a["result"][0]["value"]["choices"] for a in body["annotation"]] == [["dog"], ["dog"]]


def test_webhook_arguments_are_checked_before_any_request() -> None:
    client = LabelStudioClient("http://127.0.0.1:9", "never-sent")
    project = Project(id=1, title="nothing sent", classes=tuple(CLASSES))
    with pytest.raises(ValueError, match="not http"):
        client.ensure_webhook(project, "ftp://example.com/hook")
    with pytest.raises(ValueError, match="no webhook actions"):
        client.ensure_webhook(project, "http://127.0.0.1:1/hook", actions=())


def test_campaign_serve_handles_every_action_the_connector_registers(tmp_path: Path) -> None:
    from pipeline.rounds.config import CampaignConfig
    from pipeline.rounds.layout import write_config
    from pipeline.rounds.serve import WebhookServer

    write_config(str(tmp_path), CampaignConfig(pool="p", classes="c", posterior="q", project="hooks"))
    server = WebhookServer(str(tmp_path), "s" * 16)  # not started: handle() only checks and counts
    try:
        for action, (key, kind) in WEBHOOK_PAYLOADS.items():
            event = {"action": action, key: kind(), "project": {"title": "hooks"}}
            assert server.handle(json.dumps(event).encode())[1] == {"accepted": action, "step": "now"}
    finally:
        server.close()
    assert sorted(server.stats.events) == sorted(WEBHOOK_ACTIONS)
