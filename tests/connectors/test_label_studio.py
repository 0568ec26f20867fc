"""Against the REAL Label Studio server of the test session (no mocks): projects, tasks, labels, failures."""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests
from PIL import Image

from connectors import processes, services
from connectors.annotator_bot import BotAnnotator
from connectors.label_studio import (
    LabelStudioAuthError,
    LabelStudioClient,
    LabelStudioError,
    LabelStudioRejected,
    LabelStudioUnavailable,
    Prediction,
    Project,
    TaskInput,
    inline_image,
    label_config,
    local_files_url,
)
from connectors.services import LabelStudioService
from jobs.campaign import _unavailable
from tests.fixtures_services import restart_label_studio

CLASSES = ["cat", "dog", "bird & fish"]
PIXEL = inline_image(b"\x89PNG\r\n\x1a\n")


def _tasks(n: int, round: int = 1, prefix: str = "s") -> list[TaskInput]:
    return [
        TaskInput(
            sample_id=f"{prefix}{i:05d}",
            image=PIXEL,
            round=round,
            prediction=Prediction(CLASSES[i % 3], score=0.4 + 0.5 * (i % 7) / 7),
            uncertainty={"epig": i / n, "bald": 1 - i / n},
        )
        for i in range(n)
    ]


def _name(kind: str) -> str:
    return f"{kind} {uuid.uuid4().hex[:8]}"


def test_label_config_escapes_class_names() -> None:
    config = label_config(CLASSES)
    assert '<Choice value="bird &amp; fish"/>' in config
    with pytest.raises(ValueError, match="duplicated"):
        label_config(["a", "a"])


@pytest.mark.services
def test_project_creation_is_idempotent(label_studio_client: LabelStudioClient) -> None:
    name = _name("idempotent")
    first = label_studio_client.ensure_project(name, CLASSES)
    again = label_studio_client.ensure_project(name, CLASSES)
    assert again == first and first.classes == tuple(CLASSES)
    widened = label_studio_client.ensure_project(name, [*CLASSES, "horse"])
    assert widened.id == first.id
    assert label_studio_client.find_project(name).classes == (*CLASSES, "horse")


@pytest.mark.services
def test_thousand_tasks_import_once_and_never_duplicate(label_studio_client: LabelStudioClient) -> None:
    project = label_studio_client.ensure_project(_name("import"), CLASSES)
    tasks = _tasks(1000)
    result = label_studio_client.import_tasks(project, tasks)
    assert len(result.created) == 1000 and result.skipped == []
    again = label_studio_client.import_tasks(project, [*tasks[:10], *_tasks(3, prefix="new")])
    assert sorted(again.created) == ["new00000", "new00001", "new00002"]
    assert sorted(again.skipped) == sorted(t.sample_id for t in tasks[:10])
    ids = label_studio_client.task_ids(project)
    assert len(ids) == 1003
    task = label_studio_client.sdk.tasks.get(id=ids["s00004"])
    assert task.data["round"] == 1 and task.data["predicted"] == "dog" and task.data["epig"] == 0.004
    (prediction,) = task.predictions
    assert prediction.model_version == "round-1" and prediction.result[0]["value"]["choices"] == ["dog"]


@pytest.mark.services
def test_bot_labels_come_back_exactly(label_studio_client: LabelStudioClient) -> None:
    project = label_studio_client.ensure_project(_name("labels"), CLASSES)
    label_studio_client.import_tasks(project, _tasks(20, round=1) + _tasks(5, round=2, prefix="r2-"))
    ids = label_studio_client.task_ids(project)
    alice = BotAnnotator.create(label_studio_client, f"alice-{uuid.uuid4().hex[:6]}@example.com")
    bob = BotAnnotator.create(label_studio_client, f"bob-{uuid.uuid4().hex[:6]}@example.com")
    expected = {
        ("s00001", "cat", alice.email),
        ("s00002", "dog", alice.email),
        ("s00003", "bird & fish", bob.email),
    }
    for sample_id, label, who in sorted(expected):
        (alice if who == alice.email else bob).annotate(ids[sample_id], label)
    bob.skip(ids["s00004"])  # a skip is no label
    midway = datetime.now(timezone.utc)
    alice.annotate(ids["r2-00000"], "dog")

    got = label_studio_client.labels(project)
    assert {(r.sample_id, r.label, r.annotator) for r in got} == expected | {("r2-00000", "dog", alice.email)}
    assert {r.sample_id for r in label_studio_client.labels(project, round=1)} == {
        "s00001",
        "s00002",
        "s00003",
    }
    (late,) = label_studio_client.labels(project, since=midway)
    assert (late.sample_id, late.round, late.task_id) == ("r2-00000", 2, ids["r2-00000"])
    assert late.time > midway


@pytest.mark.services
def test_local_files_are_served_from_the_image_store(
    label_studio_client: LabelStudioClient, label_studio_server: LabelStudioService
) -> None:
    folder = Path(label_studio_server.image_root) / "round-1"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / "x.png")
    project = label_studio_client.ensure_project(_name("local files"), CLASSES)
    storage = label_studio_client.ensure_local_storage(project, folder)
    assert label_studio_client.ensure_local_storage(project, folder) == storage
    url = local_files_url(folder / "x.png", label_studio_server.image_root)
    label_studio_client.import_tasks(project, [TaskInput("img-1", url, round=1)])
    response = requests.get(
        label_studio_server.url + url,
        headers={"Authorization": f"Token {label_studio_server.token()}"},
        timeout=10,
    )
    assert response.status_code == 200 and response.content == (folder / "x.png").read_bytes()
    with pytest.raises(ValueError, match="not under the local-files document root"):
        local_files_url("/etc/passwd", label_studio_server.image_root)


@pytest.mark.services
def test_wrong_token_is_a_clear_error_that_never_shows_the_token(
    label_studio_server: LabelStudioService, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "wrong-" + uuid.uuid4().hex
    client = LabelStudioClient(label_studio_server.url, secret)
    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(LabelStudioAuthError, match="refused the API token") as info,
    ):
        client.ensure_project("anything", CLASSES)
    assert "401" in str(info.value)
    assert secret not in str(info.value) and secret not in repr(client) and secret not in caplog.text


def test_unreachable_server_is_a_clear_error_after_the_retry_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "token-" + uuid.uuid4().hex
    url = f"http://127.0.0.1:{processes.free_port()}"  # nobody listens there
    client = LabelStudioClient(url, secret, retry_for=0.5, backoff=0.05, max_backoff=0.1)
    project = Project(id=7, title="campaign x", classes=tuple(CLASSES))
    calls = {
        "annotations": lambda: client.annotations(project),
        "labels": lambda: client.labels(project, round=1),
        "import": lambda: client.import_tasks(project, _tasks(2)),
        "webhook": lambda: client.ensure_webhook(project, "http://127.0.0.1:1/hook"),
        "view": lambda: client.ensure_view(project, "by epig", order_by="epig"),
        "sample ids": lambda: client.sample_ids(project),
    }
    with caplog.at_level(logging.DEBUG):
        for name, call in calls.items():
            with pytest.raises(LabelStudioUnavailable, match="unreachable or failing") as info:
                call()
            message = str(info.value)
            assert url in message and "'campaign x'" in message and "ConnectError" in message, name
            assert _unavailable(info.value)  # `campaign` exits 4: run it again once the server is back
    assert secret not in caplog.text


@pytest.mark.parametrize(
    ("answers", "outcome"),
    [
        ((429, 503, 408, 200), 4),  # throttled and failing, then served: retried until it is
        ((429,) * 1000, LabelStudioUnavailable),  # throttled for the whole window: an outage
        ((400, 200), LabelStudioRejected),  # a wrong request: refused the same way again, so never retried
        ((422, 200), LabelStudioRejected),
        ((401, 200), LabelStudioAuthError),
    ],
)
def test_which_answers_are_retried(answers: tuple[int, ...], outcome: int | type[LabelStudioError]) -> None:
    from label_studio_sdk.core.api_error import ApiError

    client = LabelStudioClient("http://127.0.0.1:1", "token", retry_for=0.5, backoff=0.01, max_backoff=0.02)
    calls = iter(answers)
    made = 0

    def request() -> str:
        nonlocal made
        made += 1
        status = next(calls)
        if status != 200:
            raise ApiError(status_code=status, headers={}, body={"detail": f"answer {status}"})
        return "served"

    if isinstance(outcome, int):
        assert client._call("list tasks", request) == "served" and made == outcome
        return
    with pytest.raises(outcome) as info:
        client._call("list tasks", request)
    assert _unavailable(info.value) is (outcome is LabelStudioUnavailable)
    if outcome is LabelStudioRejected:
        assert made == 1 and f"HTTP {answers[0]}" in str(info.value) and "to list tasks" in str(info.value)
    elif outcome is LabelStudioUnavailable:
        assert 1 < made < len(answers) and "HTTP 429" in str(info.value)


@pytest.mark.services
def test_a_request_the_real_server_rejects_fails_at_once_naming_its_reason(
    label_studio_client: LabelStudioClient,
) -> None:
    made = 0

    def create() -> object:
        nonlocal made
        made += 1
        return label_studio_client.sdk.projects.create(title=_name("rejected"), label_config="<View><Choices")

    with pytest.raises(
        LabelStudioRejected, match=r"rejected the request to create a project \(HTTP 400\)"
    ) as info:
        label_studio_client._call("create a project", create)
    assert made == 1 and "label_config" in str(info.value)
    assert not _unavailable(info.value)  # `campaign` exits 2 with this line, not 4


@pytest.mark.services
def test_server_restart_mid_round_loses_nothing(
    label_studio_client: LabelStudioClient, services_state_dir: Path
) -> None:
    project = label_studio_client.ensure_project(_name("restart"), CLASSES)
    tasks = _tasks(50, round=3)
    label_studio_client.import_tasks(project, tasks[:30])
    ids = label_studio_client.task_ids(project)
    bot = BotAnnotator.create(label_studio_client, f"carol-{uuid.uuid4().hex[:6]}@example.com")
    bot.annotate(ids["s00000"], "cat")
    bot.annotate(ids["s00001"], "bird & fish")
    before = label_studio_client.labels(project, round=3)

    # A call made while the server is down is retried until it is back (same data dir, same port).
    result: dict[str, object] = {}
    down = threading.Event()

    def import_the_rest() -> None:
        down.wait()
        result["import"] = label_studio_client.import_tasks(project, tasks)

    worker = threading.Thread(target=import_the_rest)
    worker.start()
    services.stop_services(services_state_dir, labelstudio=True, mlflow=False)
    down.set()
    restarted = restart_label_studio(services_state_dir)
    worker.join(timeout=150)
    assert restarted.url == label_studio_client.url  # the same port, or the client followed the new one
    assert sorted(result["import"].created) == [t.sample_id for t in tasks[30:]]  # type: ignore[attr-defined]
    assert label_studio_client.labels(project, round=3) == before
    assert len(label_studio_client.task_ids(project)) == 50
    bot.annotate(ids["s00002"], "dog")  # sessions live in the database: the bot keeps working
    assert {r.sample_id for r in label_studio_client.labels(project, round=3)} == {
        "s00000",
        "s00001",
        "s00002",
    }
