"""Tasks in the REAL Label Studio of the test session: numeric sortable fields, images staged by reference,
and imports that stay duplicate-free when several importers race."""

from __future__ import annotations

import io
import json
import threading
import uuid
from pathlib import Path

import pytest
import requests
from PIL import Image

from connectors.annotator_bot import BotAnnotator
from connectors.label_studio import (
    ImportResult,
    LabelStudioClient,
    Prediction,
    Project,
    TaskInput,
    image_folder,
    inline_image,
    local_files_url,
    stage_image,
    stage_object,
)
from connectors.services import LabelStudioService

CLASSES = ["cat", "dog", "bird"]
PIXEL = inline_image(b"\x89PNG\r\n\x1a\n")


def _name(kind: str) -> str:
    return f"{kind} {uuid.uuid4().hex[:8]}"


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------- task fields


def test_task_fields_are_numbers_rounded_for_people() -> None:
    task = TaskInput(
        "s1",
        PIXEL,
        round=3,
        prediction=Prediction("dog", 0.8765432, model_version="posterior-abc123"),
        uncertainty={"epig": 0.000123456789, "entropy": 1.23456789, "hits": 7},
        rank=2,
        mlflow_run="http://127.0.0.1:5000/#/experiments/1/runs/abc",
    ).to_task()
    data = task["data"]
    assert data["epig"] == 0.0001235 and data["entropy"] == 1.235 and data["hits"] == 7
    assert data["confidence"] == 0.8765 and data["round"] == 3 and data["rank"] == 2
    assert isinstance(data["round"], int) and isinstance(data["rank"], int)
    assert data["mlflow_run"].startswith("http://") and data["predicted"] == "dog"
    assert task["predictions"][0]["model_version"] == "posterior-abc123"
    # The order annotators read them in, which is the Data Manager's column order: image and the model's
    # answer first, the bookkeeping last.
    assert list(data) == [
        "image", "predicted", "confidence", "epig", "entropy", "hits", "rank", "round", "sample_id",
        "mlflow_run",
    ]  # fmt: skip
    assert TaskInput("s2", PIXEL, round=1, confidence=0.123456).to_task()["data"]["confidence"] == 0.1235
    # The same fields through the mappings (as callers that predate the dedicated fields send them).
    mapped = TaskInput(
        "s3",
        PIXEL,
        round=1,
        uncertainty={"confidence": 0.55557, "rank": 4},
        extra={"mlflow_run": "http://m/r"},
    ).to_task()["data"]
    assert (mapped["confidence"], mapped["rank"], mapped["mlflow_run"]) == (0.5556, 4, "http://m/r")

    for bad, match in [
        ({"uncertainty": {"epig": "0.5"}}, "epig of sample 's' must be a number"),
        ({"uncertainty": {"epig": float("nan")}}, "not finite"),
        ({"uncertainty": {"data.epig": 0.5}}, "not a Data Manager column name"),
        ({"uncertainty": {"predicted": 0.5}}, "reserved"),
        ({"uncertainty": {"rank": 3}, "rank": 3}, "'rank' of sample 's' is given twice"),
        ({"rank": 1.5}, "rank of sample 's' must be an integer"),
        ({"mlflow_run": "runs:/abc"}, "not an http"),
    ]:
        with pytest.raises(ValueError, match=match):
            TaskInput("s", PIXEL, round=1, **bad).to_task()  # type: ignore[arg-type]


@pytest.mark.services
def test_data_manager_sorts_tasks_by_a_score_numerically(label_studio_client: LabelStudioClient) -> None:
    project = label_studio_client.ensure_project(_name("sorting"), CLASSES)
    epig = {"a": 9.25, "b": 10.5, "c": 100.0, "d": 0.000123456, "e": 2.5, "f": 1e-9}
    tasks = [
        TaskInput(sid, PIXEL, round=1, uncertainty={"epig": v, "entropy": 1 / (i + 1)}, rank=i + 1)
        for i, (sid, v) in enumerate(epig.items())
    ]
    label_studio_client.import_tasks(project, tasks)
    stored = label_studio_client.sdk.tasks.get(id=label_studio_client.task_ids(project)["d"]).data
    assert stored["epig"] == 0.0001235 and isinstance(stored["rank"], int) and stored["entropy"] == 0.25

    view = label_studio_client.ensure_view(
        project, "most informative", order_by="epig", number_columns=["entropy"]
    )
    assert label_studio_client.ensure_view(project, "most informative", order_by="epig") == view
    numeric = sorted(epig, key=lambda sid: -epig[sid])
    assert (
        numeric
        == ["c", "b", "a", "e", "d", "f"]
        != sorted(epig, key=lambda sid: str(epig[sid]), reverse=True)
    )
    assert label_studio_client.sample_ids(project, view=view) == numeric
    # The same tab through the SDK, as the UI lists it; and the same ordering as a plain query parameter.
    assert [
        t.data["sample_id"] for t in label_studio_client.sdk.tasks.list(project=project.id, view=view)
    ] == numeric
    query = json.dumps(
        {"ordering": ["-tasks:data.epig"], "columnsDisplayType": {"tasks:data.epig": "Number"}}
    )
    listed = label_studio_client.sdk.tasks.list(project=project.id, query=query)
    assert [t.data["sample_id"] for t in listed] == numeric
    ascending = label_studio_client.ensure_view(
        project, "most informative", order_by="epig", descending=False
    )
    assert ascending == view and label_studio_client.sample_ids(project, view=view) == numeric[::-1]


SHOWN = ("image", "predicted", "confidence", "informativeness", "epig", "rank", "round")


def _view(client: LabelStudioClient, view: int) -> dict:
    return client._request("GET", f"api/dm/views/{view}/")


@pytest.mark.services
def test_the_tab_shows_its_columns_first_and_leaves_other_tabs_and_peoples_choices_alone(
    label_studio_client: LabelStudioClient,
) -> None:
    client = label_studio_client
    project = client.ensure_project(_name("columns"), CLASSES)
    tasks = [
        TaskInput(
            f"s{i}",
            PIXEL,
            round=0,
            prediction=Prediction("dog", 0.5 + i / 10),
            uncertainty={"informativeness": 100.0 - 20 * i, "epig": 0.1 - 0.02 * i, "entropy": 1.0},
            rank=i + 1,
            mlflow_run="http://127.0.0.1:5000/#/experiments/1/runs/abc",
        )
        for i in range(3)
    ]
    client.import_tasks(project, tasks)
    # A tab of someone's own, with their column choices, made before ours.
    theirs = {"title": "mine", "hiddenColumns": {"explore": ["tasks:data.image"], "labeling": []}}
    own = client._request("POST", "api/dm/views/", json={"project": project.id, "data": theirs})["id"]
    before = _view(client, own)

    def ensure() -> int:
        return client.ensure_view(
            project, "most informative first (epig)", order_by="informativeness", columns=SHOWN
        )

    view = ensure()
    hidden = _view(client, view)["data"]["hiddenColumns"]
    listed = client._request("GET", "api/dm/columns/", params={"project": project.id})["columns"]
    every = {f"tasks:{'data.' if c.get('parent') == 'data' else ''}{c['id']}" for c in listed}
    every -= {"tasks:data"}  # the data group itself, shown when any of its fields is
    assert every - set(hidden["explore"]) == {f"tasks:data.{name}" for name in SHOWN}
    assert hidden["labeling"] == hidden["explore"]
    bookkeeping = {"tasks:id", "tasks:completed_at", "tasks:total_annotations", "tasks:annotators"}
    assert bookkeeping | {"tasks:data.sample_id", "tasks:data.mlflow_run"} <= set(hidden["explore"])
    # Hidden, not removed: every column stays in the menu. And the data fields come in the order shown.
    fields = [c["id"] for c in listed if c.get("parent") == "data"]
    assert [name for name in fields if name in SHOWN] == list(SHOWN)

    # Someone shows the entropy in our tab (the UI saves the whole tab); re-running keeps that choice, and
    # their own tab is byte for byte as they left it.
    data = _view(client, view)["data"]
    shown_too = [c for c in data["hiddenColumns"]["explore"] if c != "tasks:data.entropy"]
    data["hiddenColumns"] = {"explore": shown_too, "labeling": shown_too}
    client._request("PATCH", f"api/dm/views/{view}/", json={"project": project.id, "data": data})
    assert ensure() == view
    assert _view(client, view)["data"]["hiddenColumns"]["explore"] == shown_too
    assert _view(client, own) == before
    assert client.find_view(project, "most informative first (epig)") == view
    assert client.find_view(project, "no such tab") is None


# ------------------------------------------------------------------------------------------- images


def test_stage_image_is_atomic_idempotent_and_file_name_safe(tmp_path: Path) -> None:
    data = _png((1, 2, 3))
    path = stage_image(tmp_path, "my project/1", "shard-7/0001", data, ".PNG")
    assert path.parent == image_folder(tmp_path, "my project/1") and path.parent.parent == tmp_path
    assert path.suffix == ".png" and "/" not in path.name and path.read_bytes() == data
    before = path.stat().st_mtime_ns
    assert stage_image(tmp_path, "my project/1", "shard-7/0001", data, "png") == path
    assert path.stat().st_mtime_ns == before  # same bytes: not rewritten
    assert stage_image(tmp_path, "my project/1", "shard-7_0001", data, "png") != path  # no collision
    newer = _png((9, 9, 9))
    assert stage_image(tmp_path, "my project/1", "shard-7/0001", newer, "png").read_bytes() == newer
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left
    with pytest.raises(ValueError, match="extension"):
        stage_image(tmp_path, "p", "s", data, "exe")
    with pytest.raises(ValueError, match="empty image for sample 's'"):
        stage_image(tmp_path, "p", "s", b"", "png")


def test_stage_object_refuses_what_stage_image_refuses_and_a_non_s3_prefix() -> None:
    """The checks run before any upload, so none of these needs an object store."""
    with pytest.raises(ValueError, match="extension 'exe' of sample 's'"):
        stage_object("s3://bucket/images", "p", "s", b"x", "exe")
    with pytest.raises(ValueError, match="empty image for sample 's'"):
        stage_object("s3://bucket/images", "p", "s", b"", "png")
    with pytest.raises(ValueError, match="is not an s3://bucket/prefix URI"):
        stage_object("gs://bucket/images", "p", "s", b"x", "png")


@pytest.mark.services
def test_staged_image_is_served_through_its_task(
    label_studio_client: LabelStudioClient, label_studio_server: LabelStudioService
) -> None:
    root = Path(label_studio_server.image_root)
    project = label_studio_client.ensure_project(_name("staged"), CLASSES)
    data = _png((200, 10, 10))
    path = stage_image(root, project.title, "img/1", data, "png")
    label_studio_client.ensure_local_storage(project, image_folder(root, project.title))
    label_studio_client.import_tasks(project, [TaskInput("img/1", local_files_url(path, root), round=1)])
    task = label_studio_client.sdk.tasks.get(id=label_studio_client.task_ids(project)["img/1"])
    assert task.data["image"].startswith("/data/local-files/?d=")
    token = {"Authorization": f"Token {label_studio_server.token()}"}
    response = requests.get(label_studio_server.url + task.data["image"], headers=token, timeout=10)
    assert response.status_code == 200 and response.content == data


# -------------------------------------------------------------------------------------- concurrency


class _ListThenWait(LabelStudioClient):
    """A client whose first listing waits for the other importers' first listings: every importer then
    believes the project empty, the worst interleaving of list-then-import."""

    def __init__(self, barrier: threading.Barrier, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._barrier: threading.Barrier | None = barrier

    def _task_index(self, project: Project) -> dict[str, list[int]]:
        index = super()._task_index(project)
        if self._barrier is not None:
            barrier, self._barrier = self._barrier, None
            barrier.wait(timeout=120)
        return index


def _race(clients: list[LabelStudioClient], project: Project, tasks: list[TaskInput]) -> list[ImportResult]:
    start = threading.Barrier(len(clients))
    results: list[ImportResult | BaseException] = [RuntimeError("no result")] * len(clients)

    def run(i: int) -> None:
        try:
            start.wait(timeout=120)
            results[i] = clients[i].import_tasks(project, tasks)
        except BaseException as exc:  # reported below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def _check_one_task_per_sample(
    client: LabelStudioClient,
    project: Project,
    tasks: list[TaskInput],
    results: list[ImportResult],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert "keep duplicate tasks" not in caplog.text  # no false alarm from a stale listing
    wanted = sorted(t.sample_id for t in tasks)
    assert client.sample_ids(project) == wanted  # exactly one task per sample id
    ids = client.task_ids(project)
    created = [sid for r in results for sid in r.created]
    assert sorted(created) == wanted  # every task reported created by exactly one importer
    assert {sid: tid for r in results for sid, tid in r.created.items()} == ids


@pytest.mark.services
def test_concurrent_importers_leave_each_sample_once(
    label_studio_server: LabelStudioService, services_state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clients = [LabelStudioClient.from_services(services_state_dir) for _ in range(2)]
    project = clients[0].ensure_project(_name("race"), CLASSES)
    tasks = [TaskInput(f"s{i:03d}", PIXEL, round=1) for i in range(50)]
    _check_one_task_per_sample(clients[0], project, tasks, _race(clients, project, tasks), caplog)


@pytest.mark.services
def test_importers_that_all_listed_before_importing_still_leave_each_sample_once(
    label_studio_server: LabelStudioService, caplog: pytest.LogCaptureFixture
) -> None:
    barrier = threading.Barrier(2)
    clients = [_ListThenWait(barrier, label_studio_server.url, label_studio_server.token()) for _ in range(2)]
    project = clients[0].ensure_project(_name("forced race"), CLASSES)
    tasks = [TaskInput(f"s{i:03d}", PIXEL, round=1) for i in range(50)]
    results = _race(clients, project, tasks)  # both import all 50: 100 tasks for a moment
    assert sum(r.duplicates_removed for r in results) >= 50  # both may delete the same copies at once
    _check_one_task_per_sample(clients[0], project, tasks, results, caplog)


@pytest.mark.services
def test_duplicates_are_removed_keeping_the_lowest_id_but_never_an_annotated_one(
    label_studio_client: LabelStudioClient, caplog: pytest.LogCaptureFixture
) -> None:
    project = label_studio_client.ensure_project(_name("repair"), CLASSES)
    tasks = [TaskInput(f"s{i}", PIXEL, round=1) for i in range(3)]
    payload = [t.to_task() for t in tasks]
    first = label_studio_client.sdk.projects.import_tasks(
        id=project.id, request=payload, return_task_ids=True
    )
    second = label_studio_client.sdk.projects.import_tasks(
        id=project.id, request=payload, return_task_ids=True
    )
    low, high = list(first.task_ids), list(second.task_ids)  # what two racing importers leave
    bot = BotAnnotator.create(label_studio_client, f"dup-{uuid.uuid4().hex[:6]}@example.com")
    answer = bot.annotate(high[1], "dog")  # someone already labels the copy of s1

    result = label_studio_client.import_tasks(project, tasks)
    assert result.created == {} and sorted(result.skipped) == ["s0", "s1", "s2"]
    assert result.duplicates_removed == 2
    assert "1 samples keep duplicate tasks with annotations" in caplog.text
    assert label_studio_client.sample_ids(project) == ["s0", "s1", "s2", "s1"]  # by task id
    assert label_studio_client.task_ids(project) == {"s0": low[0], "s1": low[1], "s2": low[2]}
    (kept,) = label_studio_client.annotations(project)
    assert (kept.annotation_id, kept.task_id, kept.label) == (answer, high[1], "dog")
