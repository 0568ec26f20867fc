"""A small typed client over label-studio-sdk for curation rounds: projects, tasks, predictions, labels.

Tasks carry our own `sample_id` and round number in their data; Label Studio itself dedupes nothing, so every
import first lists the sample ids already in the project and sends only the new ones (re-running a round adds
no task). Connection errors and 5xx answers are retried with exponential backoff; 401/403/404 raise at once
with a message that names the server and the project, never the token.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.data_manager import Column, Filters, Operator, Type

log = logging.getLogger(__name__)
T = TypeVar("T")

FROM_NAME = "label"  # the <Choices> control of the generated config
TO_NAME = "image"  # the <Image> object; task data key holding the image reference
RESERVED_KEYS = frozenset({"image", "sample_id", "round", "predicted", "score"})
MAX_TITLE = 50  # Label Studio's limit on project titles


class LabelStudioError(RuntimeError):
    """Label Studio answered with an error we cannot recover from (or kept failing after the retries)."""


class LabelStudioAuthError(LabelStudioError):
    """401/403: the token is wrong, expired, or lacks the permission."""


class LabelStudioNotFound(LabelStudioError):
    """404: the project or task does not exist (or is not visible with this token)."""


@dataclass(frozen=True)
class Project:
    id: int
    title: str
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Prediction:
    """The model's answer shown to annotators as a pre-annotation."""

    label: str  # predicted class, one of the project's classes
    score: float  # confidence of the prediction, e.g. max class probability
    model_version: str | None = None  # defaults to "round-<round>" so each round's predictions are told apart


@dataclass(frozen=True)
class TaskInput:
    """One sample to be labelled in a round."""

    sample_id: str  # our id, unique within the project; the dedupe key
    image: str  # local-files URL, data URI or http(s) URL: see `local_files_url` and `inline_image`
    round: int
    prediction: Prediction | None = None
    uncertainty: Mapping[str, float] = field(default_factory=dict)  # e.g. {"epig": 0.3}: sortable columns
    extra: Mapping[str, str | int | float] = field(default_factory=dict)  # more task data (caption, source)

    def to_task(self) -> dict[str, Any]:
        data: dict[str, Any] = {TO_NAME: self.image, "sample_id": self.sample_id, "round": int(self.round)}
        for key, value in {**self.extra, **self.uncertainty}.items():
            if key in RESERVED_KEYS:
                raise ValueError(f"task field {key!r} of sample {self.sample_id!r} is reserved")
            data[key] = value
        task: dict[str, Any] = {"data": data}
        if self.prediction is not None:
            p = self.prediction
            data["predicted"] = p.label
            data["score"] = float(p.score)
            task["predictions"] = [
                {
                    "model_version": p.model_version or f"round-{self.round}",
                    "score": float(p.score),
                    "result": [_choice(p.label)],
                }
            ]
        return task


@dataclass(frozen=True)
class ImportResult:
    created: dict[str, int]  # sample_id -> new task id
    skipped: list[str]  # sample ids already in the project (or repeated in the input)


@dataclass(frozen=True)
class LabelRecord:
    """One human answer: what `labels()` returns."""

    sample_id: str
    label: str
    annotator: str  # the annotator's email
    time: datetime  # when the annotation was last saved (UTC)
    round: int
    task_id: int
    annotation_id: int


def label_config(classes: Sequence[str]) -> str:
    """Single-choice image classification config for `classes` (names are XML-escaped)."""
    classes = _check_classes(classes)
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>"
    )


def local_files_url(path: Path | str, document_root: Path | str) -> str:
    """URL under which Label Studio serves `path` (it must lie below the local-files document root)."""
    path, root = Path(path).absolute(), Path(document_root).absolute()
    if not path.is_relative_to(root):
        raise ValueError(f"image {str(path)!r} is not under the local-files document root {str(root)!r}")
    return f"/data/local-files/?d={quote(path.relative_to(root).as_posix())}"


def inline_image(data: bytes, mime: str = "image/png") -> str:
    """A data URI: the task carries the image itself (fine for small thumbnails, no storage needed)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class LabelStudioClient:
    """Typed access to one Label Studio server; every call retries transient failures."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 60.0,
        retry_for: float = 120.0,
        backoff: float = 0.5,
        max_backoff: float = 5.0,
    ) -> None:
        """`retry_for`: seconds a call keeps retrying connection errors and 5xx (a restarting server takes
        5 to 40 s), waiting `backoff`, doubling up to `max_backoff`, between attempts."""
        if not token:
            raise ValueError("empty Label Studio API token")
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._locate: Callable[[], str | None] | None = None  # re-reads the URL after a restart
        self.retry_for = retry_for
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sdk = LabelStudio(base_url=self.url, api_key=token, timeout=timeout)
        self._users: dict[int, str] = {}

    def __repr__(self) -> str:  # never show the token
        return f"LabelStudioClient(url={self.url!r})"

    @classmethod
    def from_services(cls, state_dir: Path | str | None = None, **kwargs: Any) -> LabelStudioClient:
        """Client for the server `bayescurate services up` started (token read from its 0600 file)."""
        from connectors.service_state import read_state

        state = read_state(state_dir)
        if state.label_studio is None:
            raise FileNotFoundError(
                f"no Label Studio recorded in {state.state_dir}; run `bayescurate services up`"
            )
        client = cls(state.label_studio.url, state.label_studio.token(), **kwargs)

        def locate() -> str | None:  # a restarted server may listen on another port
            ls = read_state(state.state_dir).label_studio
            return ls.url if ls is not None else None

        client._locate = locate
        return client

    @property
    def sdk(self) -> LabelStudio:
        """The underlying label-studio-sdk client, for calls this wrapper does not cover."""
        return self._sdk

    # ---------------------------------------------------------------------------------------- projects

    def ensure_project(self, name: str, classes: Sequence[str], *, description: str = "") -> Project:
        """The project titled `name`, created for `classes`, or updated when the classes changed."""
        if not 3 <= len(name) <= MAX_TITLE:
            raise ValueError(f"project name {name!r} must have 3 to {MAX_TITLE} characters")
        classes = _check_classes(classes)
        config = label_config(classes)
        existing = self.find_project(name)
        if existing is None:
            created = self._call(
                f"create project {name!r}",
                lambda: self._sdk.projects.create(title=name, label_config=config, description=description),
            )
            return Project(id=int(created.id), title=name, classes=classes)
        if existing.classes != classes:
            self._call(
                f"update the classes of project {name!r}",
                lambda: self._sdk.projects.update(id=existing.id, label_config=config),
            )
        return Project(id=existing.id, title=name, classes=classes)

    def find_project(self, name: str) -> Project | None:
        projects = self._call(
            "list projects", lambda: list(self._sdk.projects.list(title=name, page_size=100))
        )
        for p in projects:
            if p.title == name:
                return Project(id=int(p.id), title=name, classes=_classes_of(p.label_config or ""))
        return None

    def ensure_local_storage(self, project: Project, folder: Path | str) -> int:
        """Local-files import storage over `folder` (under the document root) so its images render."""
        path = str(Path(folder).absolute())
        storages = self._call(
            "list local storages", lambda: self._sdk.import_storage.local.list(project=project.id)
        )
        for storage in storages:
            if storage.path == path:
                return int(storage.id)
        created = self._call(
            f"add local storage {path!r}",
            lambda: self._sdk.import_storage.local.create(
                project=project.id, path=path, use_blob_urls=True, title=Path(path).name[:50] or "images"
            ),
        )
        return int(created.id)

    # ------------------------------------------------------------------------------------------- tasks

    def task_ids(self, project: Project) -> dict[str, int]:
        """sample_id -> task id for every task of the project."""
        tasks = self._call(
            f"list tasks of project {project.title!r}",
            lambda: list(self._sdk.tasks.list(project=project.id, include="id,data", page_size=1000)),
        )
        return {str(t.data["sample_id"]): int(t.id) for t in tasks if t.data and "sample_id" in t.data}

    def import_tasks(self, project: Project, tasks: Iterable[TaskInput]) -> ImportResult:
        """Import the tasks whose sample id the project does not hold yet, in one request."""
        unique: dict[str, TaskInput] = {}
        skipped: list[str] = []
        for task in tasks:
            if task.prediction is not None and task.prediction.label not in project.classes:
                raise ValueError(f"prediction {task.prediction.label!r} of {task.sample_id!r} is not a class")
            if task.sample_id in unique:
                skipped.append(task.sample_id)
            else:
                unique[task.sample_id] = task
        # Listing and importing are one retried unit: a retry after a lost answer re-reads what exists first.
        attempt, deadline = 0, time.monotonic() + self.retry_for
        while True:
            existing = self.task_ids(project)
            new = [t for sid, t in unique.items() if sid not in existing]
            if not new:
                return ImportResult(created={}, skipped=skipped + list(unique))
            try:
                response = self._sdk.projects.import_tasks(
                    id=project.id, request=[t.to_task() for t in new], return_task_ids=True
                )
                break
            except Exception as exc:
                attempt = self._retry_or_raise(exc, f"import tasks into {project.title!r}", attempt, deadline)
        ids = list(response.task_ids or [])
        if len(ids) != len(new):
            raise LabelStudioError(f"imported {len(new)} tasks but Label Studio returned {len(ids)} task ids")
        created = {t.sample_id: int(i) for t, i in zip(new, ids, strict=True)}
        skipped += [sid for sid in unique if sid not in created]
        return ImportResult(created=created, skipped=skipped)

    # ------------------------------------------------------------------------------------------ labels

    def labels(
        self, project: Project, *, since: datetime | None = None, round: int | None = None
    ) -> list[LabelRecord]:
        """Submitted (not skipped) answers, optionally only those saved after `since` and/or of one round."""
        # Only tasks with at least one answer leave the server: projects hold many unlabelled tasks.
        items = [Filters.item(Column.total_annotations, Operator.GREATER, Type.Number, Filters.value(0))]
        if since is not None:
            since = _utc(since)
            items.append(
                Filters.item(Column.completed_at, Operator.GREATER, Type.Datetime, Filters.value(since))
            )
        if round is not None:
            items.append(
                Filters.item(Column.data("round"), Operator.EQUAL, Type.Number, Filters.value(round))
            )
        query = json.dumps({"filters": Filters.create(Filters.AND, items)})
        tasks = self._call(
            f"list annotated tasks of {project.title!r}",
            lambda: list(self._sdk.tasks.list(project=project.id, fields="all", query=query, page_size=500)),
        )
        records: list[LabelRecord] = []
        for task in tasks:
            data = task.data or {}
            if "sample_id" not in data:
                continue
            for ann in task.annotations or []:
                ann = ann if isinstance(ann, dict) else ann.dict()
                if ann.get("was_cancelled") or not ann.get("result"):
                    continue
                label = _label_of(ann["result"])
                when = _parse_time(ann.get("updated_at") or ann.get("created_at"))
                if label is None or (since is not None and when <= since):
                    continue
                records.append(
                    LabelRecord(
                        sample_id=str(data["sample_id"]),
                        label=label,
                        annotator=self._annotator(ann.get("completed_by")),
                        time=when,
                        round=int(data.get("round", -1)),
                        task_id=int(task.id),
                        annotation_id=int(ann["id"]),
                    )
                )
        return sorted(records, key=lambda r: (r.time, r.annotation_id))

    def _annotator(self, completed_by: Any) -> str:
        if isinstance(completed_by, dict):
            return str(completed_by.get("email") or completed_by.get("id"))
        user_id = int(completed_by)
        if user_id not in self._users:
            users = self._call("list users", lambda: list(self._sdk.users.list()))
            self._users = {int(u.id): str(u.email or u.username) for u in users}
        return self._users.get(user_id, str(user_id))

    # ------------------------------------------------------------------------------------------ errors

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        attempt, deadline = 0, time.monotonic() + self.retry_for
        while True:
            try:
                return fn()
            except Exception as exc:
                attempt = self._retry_or_raise(exc, what, attempt, deadline)

    def _retry_or_raise(self, exc: Exception, what: str, attempt: int, deadline: float) -> int:
        """Sleep and return the next attempt number for transient failures; raise a clear error otherwise."""
        status = exc.status_code if isinstance(exc, ApiError) else None
        transient = isinstance(exc, httpx.TransportError) or (status is not None and status >= 500)
        if transient and time.monotonic() < deadline:
            self._follow_restart()
            delay = min(self.backoff * 2**attempt, self.max_backoff)
            log.warning(
                "Label Studio at %s: %s failed (%s); retry in %.1f s", self.url, what, _brief(exc), delay
            )
            time.sleep(delay)
            return attempt + 1
        if status in (401, 403):
            raise LabelStudioAuthError(
                f"Label Studio at {self.url} refused the API token (HTTP {status}) to {what}; "
                "check the token file (`bayescurate services status`) or LABEL_STUDIO_API_KEY"
            ) from None
        if status == 404:
            raise LabelStudioNotFound(f"Label Studio at {self.url}: not found (HTTP 404) to {what}") from None
        if transient:
            raise LabelStudioError(
                f"Label Studio at {self.url}: {what} still failing after {attempt} retries: {_brief(exc)}"
            ) from None
        if isinstance(exc, ApiError):
            raise LabelStudioError(
                f"Label Studio at {self.url}: {what} failed (HTTP {status}): {exc.body}"
            ) from None
        raise exc

    def _follow_restart(self) -> None:
        url = self._locate() if self._locate is not None else None
        if url and url.rstrip("/") != self.url:
            log.warning("Label Studio moved from %s to %s (restarted); following it", self.url, url)
            self.url = url.rstrip("/")
            self._sdk = LabelStudio(base_url=self.url, api_key=self._token, timeout=self._timeout)


def _brief(exc: Exception) -> str:
    if isinstance(exc, ApiError):
        return f"HTTP {exc.status_code}"
    return type(exc).__name__


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    out = tuple(str(c) for c in classes)
    if not out:
        raise ValueError("a labelling project needs at least one class")
    duplicated = sorted({c for c in out if out.count(c) > 1})
    if duplicated:
        raise ValueError(f"duplicated class names: {duplicated}")
    if any(not c.strip() for c in out):
        raise ValueError(f"empty class name in {list(out)}")
    return out


def _classes_of(config: str) -> tuple[str, ...]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(config)
    except ET.ParseError:
        return ()
    return tuple(c.attrib["value"] for c in root.iter("Choice") if "value" in c.attrib)


def _choice(label: str) -> dict[str, Any]:
    return {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}


def _label_of(result: Sequence[Mapping[str, Any]]) -> str | None:
    for region in result:
        if region.get("from_name") == FROM_NAME and region.get("type") == "choices":
            choices = region.get("value", {}).get("choices") or []
            if choices:
                return str(choices[0])
    return None


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return _utc(value)
    return _utc(datetime.fromisoformat(str(value).replace("Z", "+00:00")))
