"""A small typed client over label-studio-sdk for annotation rounds: projects, tasks, webhooks, answers.

Tasks carry our own `sample_id` and round number in their data. Label Studio dedupes nothing, so an import
lists the sample ids already in the project and sends only the new ones, then re-lists and deletes the
duplicates that a concurrent importer may have created (keeping the lowest task id, never an annotated task).
Every request is retried on connection errors, 5xx, 408 and 429 with exponential backoff for `retry_for`
seconds, then raises `LabelStudioUnavailable`; 401/403 (`LabelStudioAuthError`), 404 (`LabelStudioNotFound`)
and any other 4xx (`LabelStudioRejected`) raise at once. Errors name the server and the project, never the
token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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

from pipeline.io import storage

log = logging.getLogger(__name__)
T = TypeVar("T")

FROM_NAME = "label"  # the <Choices> control of the generated config
TO_NAME = "image"  # the <Image> object; task data key holding the image reference
RESERVED_KEYS = frozenset({"image", "sample_id", "round", "predicted", "score"})  # set by TaskInput itself
MAX_TITLE = 50  # Label Studio's limit on project titles
SCORE_DIGITS = 4  # significant digits of the scores shown to (and sorted by) annotators
PAGE_SIZE = 500  # tasks per listing page
IMPORT_BATCH = 1000  # tasks per import request
ID_BATCH = 300  # task ids per request that selects tasks by id (keeps URLs short)
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"})
PRESIGN_TTL_MINUTES = 15  # lifetime of a URL Label Studio presigns for an S3 image (it signs anew per view)
TRANSIENT_4XX = frozenset({408, 429})  # request timeout, too many requests: retried like a 5xx
# The annotation events a webhook subscribes to, and the payload key (with its JSON type) each one carries:
# one annotation created, edited; many created at once (the Data Manager's "Create Annotations From
# Predictions"; sic, it keeps the singular key); many deleted.
WEBHOOK_PAYLOADS: Mapping[str, tuple[str, type]] = {
    "ANNOTATION_CREATED": ("annotation", dict),
    "ANNOTATION_UPDATED": ("annotation", dict),
    "ANNOTATIONS_CREATED": ("annotation", list),
    "ANNOTATIONS_DELETED": ("annotations", list),
}
WEBHOOK_ACTIONS = tuple(WEBHOOK_PAYLOADS)
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # data keys usable as Data Manager columns
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Task fields an annotation listing does not need (predictions and drafts can outweigh the answers).
_HEAVY_FIELDS = (
    "predictions,drafts,annotations_results,predictions_results,comment_authors,file_upload,updated_by"
)


class LabelStudioError(RuntimeError):
    """Label Studio answered with an error we cannot recover from (or kept failing after the retries)."""


class LabelStudioUnavailable(LabelStudioError):
    """Unreachable, 5xx, or throttled (408/429) for the whole retry window: an outage, worth a later retry."""


class LabelStudioRejected(LabelStudioError):
    """A 4xx other than 401/403/404: the request itself is wrong, so a retry would be refused the same way."""


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
    model_version: str | None = None  # e.g. the posterior id; defaults to "round-<round>"


@dataclass(frozen=True)
class TaskInput:
    """One sample to be labelled in a round, with the numbers annotators sort by in the Data Manager."""

    sample_id: str  # our id, unique within the project; the dedupe key
    image: str  # local-files URL (`stage_image` + `local_files_url`), data URI or http(s) URL
    round: int  # the annotation round that picked the sample
    prediction: Prediction | None = None  # pre-annotation; its label becomes the `predicted` column
    # Acquisition scores, e.g. {"epig": .., "entropy": ..}: sortable numeric columns.
    uncertainty: Mapping[str, float] = field(default_factory=dict)
    extra: Mapping[str, str | int | float] = field(default_factory=dict)  # more task data (caption, source)
    # The three below may also come in `uncertainty` / `extra` under the same names (not both ways).
    confidence: float | None = None  # shown confidence; defaults to the prediction's score
    rank: int | None = None  # position in the round's pick list (1 = most informative)
    mlflow_run: str | None = None  # URL of the MLflow run that picked the sample

    def to_task(self) -> dict[str, Any]:
        """The import payload. Scores stay JSON numbers, rounded for people: the Data Manager then sorts them
        numerically (strings sort as text: "10.5" < "9.25").

        The data keys come in the order annotators read them: the image, the model's answer, its confidence,
        the scores, rank and round, then the bookkeeping. Label Studio lays out a project's data columns in
        the order it first saw their keys (on a server that keeps JSON key order: SQLite does, PostgreSQL's
        jsonb sorts keys by length), so this order is the one the Data Manager shows."""
        sid = self.sample_id
        p = self.prediction
        if self.mlflow_run is not None and not self.mlflow_run.startswith(("http://", "https://")):
            raise ValueError(f"mlflow_run of sample {sid!r} is not an http(s) URL: {self.mlflow_run!r}")
        confidence = self.confidence
        if confidence is None and p is not None and "confidence" not in {*self.uncertainty, *self.extra}:
            confidence = p.score
        fields = [
            (TO_NAME, self.image),
            ("predicted", None if p is None else p.label),
            ("confidence", None if confidence is None else _rounded(confidence, "confidence", sid)),
            *((_data_key(k, sid), _rounded(v, k, sid)) for k, v in self.uncertainty.items()),
            ("rank", None if self.rank is None else _whole(self.rank, "rank", sid)),
            ("round", _whole(self.round, "round", sid)),
            ("sample_id", sid),
            *((_data_key(k, sid, sortable=False), v) for k, v in self.extra.items()),
            ("mlflow_run", self.mlflow_run),
        ]
        data: dict[str, Any] = {}
        for key, value in fields:
            if value is None:
                continue
            if key in data:
                raise ValueError(f"task field {key!r} of sample {sid!r} is given twice")
            data[key] = value
        task: dict[str, Any] = {"data": data}
        if p is not None:
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
    created: dict[str, int]  # sample_id -> task id of the tasks this call created (and kept)
    skipped: list[
        str
    ]  # sample ids already in the project, repeated in the input, or won by a concurrent import
    duplicates_removed: int = (
        0  # duplicates deleted, as the server counts (racing deleters may both count one)
    )


@dataclass(frozen=True)
class AnnotationRecord:
    """One annotation as Label Studio holds it now: a label, an empty answer, or a skip."""

    sample_id: str
    task_id: int
    annotation_id: int
    annotator: str  # email of the user who made it
    label: str | None  # the chosen class; None when cancelled (skipped) or empty
    cancelled: bool  # the annotator pressed Skip
    created_at: datetime  # UTC
    updated_at: datetime  # UTC; later than created_at once the annotation was edited
    round: int | None  # the task's round (None for a task imported without one)
    lead_time: float | None  # seconds the annotator spent on it, as the UI reports

    @property
    def edited(self) -> bool:
        return self.updated_at > self.created_at


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
    """A data URI: the task carries the image itself. Only for tiny thumbnails: every task listing carries
    it too; use `stage_image` for anything larger."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_folder(image_root: Path | str, project_title: str) -> Path:
    """The project's folder under the local-files document root: give it to `ensure_local_storage`, since
    Label Studio serves only files below a project's local storage."""
    return Path(image_root).absolute() / _safe_name(project_title)


def _image_suffix(sample_id: str, data: bytes, ext: str) -> str:
    """The file suffix of an image to stage, after checking it is a known image type and not empty."""
    suffix = ext.lower().lstrip(".")
    if suffix not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"image extension {ext!r} of sample {sample_id!r} is not one of {sorted(IMAGE_EXTENSIONS)}"
        )
    if not data:
        raise ValueError(f"empty image for sample {sample_id!r}")
    return suffix


def stage_image(image_root: Path | str, project_title: str, sample_id: str, data: bytes, ext: str) -> Path:
    """Write the image bytes to `image_folder(...)/<sample_id>.<ext>` atomically; returns the path.

    Idempotent: the same bytes are not rewritten, so a re-run round costs no I/O; other bytes replace the
    file atomically (an annotator never sees a half-written image). Sample ids are made file-name safe.
    """
    suffix = _image_suffix(sample_id, data, ext)
    path = image_folder(image_root, project_title) / f"{_safe_name(sample_id)}.{suffix}"
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path
    storage.write_bytes(path, data)
    return path


def stage_object(prefix: str, project_title: str, sample_id: str, data: bytes, ext: str) -> str:
    """Write the image bytes to `<prefix>/<project>/<sample_id>.<ext>` on an object store (`s3://bucket/...`);
    returns the object's URI, for a task served through `ensure_s3_storage`.

    Names as `stage_image` makes them. One PUT, so the object appears whole or not at all; the same bytes
    are not uploaded again (a re-run round reads them back instead).
    """
    suffix = _image_suffix(sample_id, data, ext)
    if not prefix.startswith("s3://") or not prefix[5:].strip("/"):
        raise ValueError(f"image store {prefix!r} is not an s3://bucket/prefix URI")
    uri = storage.join(prefix, _safe_name(project_title), f"{_safe_name(sample_id)}.{suffix}")
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.is_file and info.size == len(data) and storage.read_bytes(uri) == data:
        return uri
    storage.write_bytes(uri, data)
    return uri


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
        self._sdk = self._new_sdk()
        self._users: dict[int, str] = {}
        self.token_from = "the API token"  # where the token came from, for errors (never the token)

    def __repr__(self) -> str:  # never show the token
        return f"LabelStudioClient(url={self.url!r})"

    def _new_sdk(self) -> LabelStudio:
        """The SDK client with its hidden retries off, so that `retry_for` is the one retry policy and its
        deadline holds (the SDK would retry connection errors and 5xx twice more, even of an import)."""
        return LabelStudio(base_url=self.url, api_key=self._token, timeout=self._timeout, max_retries=0)

    @classmethod
    def from_services(cls, state_dir: Path | str | None = None, **kwargs: Any) -> LabelStudioClient:
        """Client for the server `bayescurate services up` started (token read from its 0600 file)."""
        from connectors.service_state import read_state

        state = read_state(state_dir)
        if state.label_studio is None:
            raise FileNotFoundError(
                f"no Label Studio recorded in {state.state_dir}; run `bayescurate services up`, or set "
                f"{cls.URL_ENV} and {cls.TOKEN_ENV} for a server of your own"
            )
        client = cls(state.label_studio.url, state.label_studio.token(), **kwargs)

        def locate() -> str | None:  # a restarted server may listen on another port
            ls = read_state(state.state_dir).label_studio
            return ls.url if ls is not None else None

        client._locate = locate
        return client

    URL_ENV = "LABEL_STUDIO_URL"  # the server's base URL, e.g. http://label-studio.labelling:8080
    TOKEN_ENV = "LABEL_STUDIO_API_KEY"  # its API token (the variable label-studio-sdk itself reads)

    @classmethod
    def env_configured(cls, environ: Mapping[str, str] | None = None) -> bool:
        """True when both variables of `from_env` are set (non-empty)."""
        import os

        env = os.environ if environ is None else environ
        return bool(env.get(cls.URL_ENV, "").strip() and env.get(cls.TOKEN_ENV, "").strip())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> LabelStudioClient:
        """Client for `$LABEL_STUDIO_URL` with the token in `$LABEL_STUDIO_API_KEY`.

        How a cluster pod reaches a Label Studio it did not start: both variables come from a Kubernetes
        Secret, and no services state dir exists there. The token is never part of an error message.
        """
        import os

        env = os.environ if environ is None else environ
        url, token = env.get(cls.URL_ENV, "").strip(), env.get(cls.TOKEN_ENV, "").strip()
        missing = [name for name, value in ((cls.URL_ENV, url), (cls.TOKEN_ENV, token)) if not value]
        if missing:
            raise ValueError(f"{' and '.join(missing)} not set: the Label Studio client needs both")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{cls.URL_ENV} must be an http(s) URL, got {url!r}")
        return cls(url, token, **kwargs)

    @property
    def sdk(self) -> LabelStudio:
        """The underlying label-studio-sdk client, for calls this wrapper does not cover."""
        return self._sdk

    def current_user(self) -> str:
        """The email of the token's user: a cheap check that the server accepts the token."""
        return str(self._call("identify the token's user", lambda: self._sdk.users.whoami()).email)

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
            f"list the local storages of project {project.title!r}",
            lambda: self._sdk.import_storage.local.list(project=project.id),
        )
        for storage_ in storages:
            if storage_.path == path:
                return int(storage_.id)
        created = self._call(
            f"add local storage {path!r} to project {project.title!r}",
            lambda: self._sdk.import_storage.local.create(
                project=project.id, path=path, use_blob_urls=True, title=Path(path).name[:50] or "images"
            ),
        )
        return int(created.id)

    def ensure_s3_storage(
        self,
        project: Project,
        bucket: str,
        prefix: str = "",
        *,
        presign: bool = True,
        presign_ttl_minutes: int = PRESIGN_TTL_MINUTES,
        region: str | None = None,
        endpoint: str | None = None,
    ) -> int:
        """S3 import storage over `s3://bucket/prefix`, so that tasks whose image is `s3://bucket/key` render;
        returns its id.

        Label Studio hands such task data out as `/tasks/<id>/resolve/?fileuri=<base64 of the URI>`, and that
        redirects (303) to a URL it presigns for `presign_ttl_minutes` (`presign=False`: it streams the bytes
        itself, for a store the annotators' browsers cannot reach). Endpoint, region and credentials come from
        the AWS SDKs' variables (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_REGION`,
        `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) unless given; unset ones are left
        to Label Studio's own environment. Label Studio keeps the credentials in its database and never sends
        them back; here they are in no log and no error. On creation it checks the connection: an object under
        `prefix` (no prefix: HeadBucket). The storage is never synchronised, and refuses the UI's Sync: no
        object of the bucket becomes a task (ours come from `import_tasks`).

        Idempotent per bucket, since Label Studio resolves a URI through the first storage of its bucket
        whatever that storage's prefix: an existing one (the lowest id) is kept, and updated in place when
        its endpoint, region or presigning differ, or when the credentials are temporary (a session token:
        they expire). `prefix` only shapes a new storage (its connection check, its title).
        """
        if not bucket or "/" in bucket:
            raise ValueError(f"S3 bucket name {bucket!r} for project {project.title!r} is not a bucket name")
        if not 1 <= presign_ttl_minutes <= 7 * 24 * 60:  # SigV4 presigned URLs live 7 days at most
            raise ValueError(f"presign_ttl_minutes must be 1 to 10080, got {presign_ttl_minutes}")
        key_prefix = prefix.strip("/")
        settings, secrets = _s3_settings(region, endpoint)
        wanted: dict[str, Any] = {
            "bucket": bucket,
            "prefix": f"{key_prefix}/" if key_prefix else "",
            "presign": presign,
            "presign_ttl": presign_ttl_minutes,
            "s3endpoint": settings["s3endpoint"],
            "region_name": settings["region_name"],
        }
        where = f"s3://{bucket}/{wanted['prefix']}"

        def ensure() -> int:
            try:
                return self._ensure_s3_once(project, where, wanted, secrets)
            except ApiError as exc:
                raise self._s3_storage_error(exc, project, where, wanted, secrets) from None

        return self._call(f"ensure the S3 storage {where!r} of project {project.title!r}", ensure)

    def _ensure_s3_once(
        self, project: Project, where: str, wanted: dict[str, Any], secrets: dict[str, str]
    ) -> int:
        """One try of `ensure_s3_storage`: create the bucket's storage, or keep its first one (updated in
        place when its settings differ from `wanted` or the credentials are temporary)."""
        bucket = wanted["bucket"]
        storages = sorted(
            (s for s in self._sdk.import_storage.s3.list(project=project.id) if s.bucket == bucket),
            key=lambda s: int(s.id),
        )
        if not storages:
            created = self._sdk.import_storage.s3.create(
                project=project.id,
                title=where[:256],
                description="bayescurate: task images by reference (never synchronised)",
                use_blob_urls=True,
                synchronizable=False,
                **wanted,
                **secrets,
            )
            return int(created.id)
        keep = storages[0]
        current = {k: getattr(keep, k) or None for k in ("s3endpoint", "region_name")}
        current |= {"presign": keep.presign, "presign_ttl": keep.presign_ttl}
        changed = {k: wanted[k] for k in current if current[k] != wanted[k]}
        if changed or "aws_session_token" in secrets:
            self._sdk.import_storage.s3.update(int(keep.id), **changed, **secrets)
        return int(keep.id)

    def _s3_storage_error(
        self, exc: ApiError, project: Project, where: str, wanted: dict[str, Any], secrets: dict[str, str]
    ) -> Exception:
        """What to raise for Label Studio's refusal of an S3 storage: the reason named where Label Studio
        hides it, else the error with any echoed secret starred out (a 5xx still retried by `_call`)."""
        body = _redacted(str(exc.body), secrets.values())  # an echoed request carries the secrets
        if exc.status_code == 500 and "s3 endpoints on domain" in body:
            # Label Studio hides the store's answer for endpoints off its S3_TRUSTED_STORAGE_DOMAINS
            # and answers 500: not an outage to sit out, a storage it cannot use.
            return LabelStudioError(
                f"Label Studio at {self.url} could not use {where!r} (endpoint "
                f"{wanted['s3endpoint'] or 'its default'}) for project {project.title!r}: the bucket "
                "or an object under the prefix is missing, the credentials are refused, or the "
                "endpoint is unreachable from Label Studio's host (its log has the reason)"
            )
        if exc.status_code == 403 and "URL" in body:  # SSRF protection refused the endpoint
            return LabelStudioError(
                f"Label Studio at {self.url} refused the endpoint {wanted['s3endpoint']!r} of "
                f"{where!r} for project {project.title!r}: a loopback or private address needs "
                "SSRF_PROTECTION_ENABLED=false on the Label Studio server"
            )
        return ApiError(status_code=exc.status_code, headers=exc.headers, body=body)

    def ensure_view(
        self,
        project: Project,
        title: str,
        *,
        order_by: str,
        descending: bool = True,
        number_columns: Sequence[str] = (),
        columns: Sequence[str] = (),
    ) -> int:
        """A Data Manager tab titled `title` that orders the tasks by the data field `order_by`, as the UI's
        column header does; returns its id (for `sample_ids(view=)` or the UI's `?tab=`).

        `order_by` and `number_columns` are displayed as numbers (`columnsDisplayType`): only then does
        Label Studio cast the field to a float when ordering on PostgreSQL (SQLite orders JSON numbers
        numerically anyway). `columns`: the task data fields the tab shows; every other column, Label
        Studio's own bookkeeping included, is hidden in this tab (list and labeling views) and stays in its
        column menu. Label Studio has no column order of its own to set: its own columns come first (hidden
        here), then the data fields, the labeling config's image first, the rest in the order the project
        first saw their keys (see `TaskInput.to_task`). Call it after the import, so that the fields exist.

        Idempotent: an existing tab keeps its filters and the columns people showed or hid in it (one that
        never had a column choice gets `columns`); no other tab is ever changed.
        """
        names = [order_by, *(c for c in number_columns if c != order_by)]
        for name in [*names, *columns]:
            if not _FIELD.match(name):
                raise ValueError(f"{name!r} is not a task data field name (letters, digits, underscores)")
        ordering = [f"{'-' if descending else ''}tasks:data.{order_by}"]
        display = {f"tasks:data.{name}": "Number" for name in names}

        def hidden() -> dict[str, list[str]]:
            shown = {f"tasks:data.{name}" for name in columns}
            listed = self._request("GET", "api/dm/columns/", params={"project": project.id})
            every = [
                f"tasks:{'data.' if c.get('parent') == 'data' else ''}{c['id']}"
                for c in (listed or {}).get("columns", [])
                if c.get("target", "tasks") == "tasks" and not c.get("children")
            ]
            ids = sorted(c for c in set(every) if c not in shown)
            return {"explore": ids, "labeling": list(ids)}

        def ensure() -> int:
            views = self._request("GET", "api/dm/views/", params={"project": project.id})
            mine = sorted(
                (v for v in views if (v.get("data") or {}).get("title") == title), key=lambda v: v["id"]
            )
            if not mine:
                data: dict[str, Any] = {"title": title, "ordering": ordering, "columnsDisplayType": display}
                if columns:
                    data["hiddenColumns"] = hidden()
                return int(
                    self._request("POST", "api/dm/views/", json={"project": project.id, "data": data})["id"]
                )
            view = mine[0]
            data = dict(view.get("data") or {})
            shown = {**(data.get("columnsDisplayType") or {}), **display}
            wanted = {"ordering": ordering, "columnsDisplayType": shown}
            if columns and not data.get("hiddenColumns"):
                wanted["hiddenColumns"] = hidden()
            if any(data.get(key) != value for key, value in wanted.items()):
                self._request(
                    "PATCH",
                    f"api/dm/views/{view['id']}/",
                    json={"project": project.id, "data": data | wanted},
                )
            return int(view["id"])

        return self._call(f"ensure view {title!r} of project {project.title!r}", ensure)

    def find_view(self, project: Project, title: str) -> int | None:
        """Id of the project's Data Manager tab titled `title` (the lowest, if several), or None."""
        views = self._call(
            f"list the views of project {project.title!r}",
            lambda: self._request("GET", "api/dm/views/", params={"project": project.id}),
        )
        ids = [int(v["id"]) for v in views if (v.get("data") or {}).get("title") == title]
        return min(ids) if ids else None

    # ------------------------------------------------------------------------------------------- tasks

    def task_ids(self, project: Project) -> dict[str, int]:
        """sample_id -> task id for every task of the project (the lowest id if a sample is duplicated)."""
        return {sid: ids[0] for sid, ids in self._task_index(project).items()}

    def sample_ids(self, project: Project, *, view: int | None = None) -> list[str]:
        """The project's sample ids in the Data Manager's order: by task id, or as the tab `view` orders."""
        what = f"list the tasks of project {project.title!r}" + (f" in view {view}" if view else "")
        tasks = self._iter_tasks(project, what, include="id,data", view=view)
        return [str(t["data"]["sample_id"]) for t in tasks if "sample_id" in (t.get("data") or {})]

    def import_tasks(self, project: Project, tasks: Iterable[TaskInput]) -> ImportResult:
        """Import the tasks whose sample id the project does not hold yet; safe against concurrent importers.

        List, import the missing ones, re-list, then delete every duplicate of the input's sample ids but the
        lowest task id. Concurrent importers all keep the same task (the lowest id), and whichever of two
        racing imports lands last sees both and removes its own copy. A duplicate with annotations (or a
        skip) is never deleted: the server checks that in the same request that deletes.
        """
        unique: dict[str, TaskInput] = {}
        skipped: list[str] = []
        for task in tasks:
            if task.prediction is not None and task.prediction.label not in project.classes:
                raise ValueError(f"prediction {task.prediction.label!r} of {task.sample_id!r} is not a class")
            if task.sample_id in unique:
                skipped.append(task.sample_id)
            else:
                unique[task.sample_id] = task
        payloads = {sid: t.to_task() for sid, t in unique.items()}  # validate everything before sending
        index = self._task_index(project)
        pending = [sid for sid in unique if sid not in index]
        mine: dict[str, int] = {}
        for start in range(0, len(pending), IMPORT_BATCH):
            mine |= self._import_batch(project, pending[start : start + IMPORT_BATCH], payloads)
        if mine:
            index = self._task_index(project)
        removed = 0
        if any(len(index.get(sid, ())) > 1 for sid in unique):
            removed = self._remove_duplicates(project, index, unique)
            index = self._task_index(project)  # a racing importer may have deleted the same copies
        kept = {sid: tid for sid, tid in mine.items() if index.get(sid, [None])[0] == tid}
        still = sorted(sid for sid in unique if len(index.get(sid, ())) > 1)
        if still:
            log.warning(
                "project %r at %s: %d samples keep duplicate tasks with annotations, e.g. %s",
                project.title,
                self.url,
                len(still),
                {sid: index[sid] for sid in still[:3]},
            )
        skipped += [sid for sid in unique if sid not in kept]
        return ImportResult(created=kept, skipped=skipped, duplicates_removed=removed)

    def _import_batch(
        self, project: Project, sample_ids: Sequence[str], payloads: Mapping[str, dict[str, Any]]
    ) -> dict[str, int]:
        """One import request, retried as a unit with a re-list first: an import whose answer was lost has
        created its tasks, so the retry sends only those still missing."""
        what = f"import {len(sample_ids)} tasks into project {project.title!r}"
        todo = list(sample_ids)
        attempt, deadline = 0, time.monotonic() + self.retry_for
        while todo:
            try:
                response = self._sdk.projects.import_tasks(
                    id=project.id, request=[payloads[sid] for sid in todo], return_task_ids=True
                )
            except Exception as exc:
                attempt = self._retry_or_raise(exc, what, attempt, deadline)
                present = self._task_index(project)
                todo = [sid for sid in todo if sid not in present]
                continue
            ids = [int(i) for i in response.task_ids or []]
            if len(ids) != len(todo):  # the import dedupes, so the next step's redo is safe
                raise LabelStudioUnavailable(
                    f"Label Studio at {self.url}: imported {len(todo)} tasks into project {project.title!r} "
                    f"but it returned {len(ids)} task ids"
                )
            return dict(zip(todo, ids, strict=True))
        return {}

    def _remove_duplicates(
        self, project: Project, index: Mapping[str, Sequence[int]], sample_ids: Iterable[str]
    ) -> int:
        """Delete all but the lowest task id of each duplicated sample, unless annotated; returns how many."""
        doomed = sorted(i for sid in sample_ids for i in index.get(sid, ())[1:])
        unannotated = Filters.create(
            Filters.AND,
            [
                Filters.item(Column.total_annotations, Operator.EQUAL, Type.Number, Filters.value(0)),
                Filters.item(Column.cancelled_annotations, Operator.EQUAL, Type.Number, Filters.value(0)),
            ],
        )
        removed = 0
        for start in range(0, len(doomed), ID_BATCH):
            chunk = doomed[start : start + ID_BATCH]
            body = self._call(
                f"delete {len(chunk)} duplicate tasks of project {project.title!r}",
                lambda chunk=chunk: self._request(
                    "POST",
                    "api/dm/actions/",
                    params={"id": "delete_tasks", "project": project.id},
                    json={"selectedItems": {"all": False, "included": chunk}, "filters": unannotated},
                ),
            )
            removed += int((body or {}).get("processed_items", 0))
        if removed:
            log.info("project %r at %s: removed %d duplicate tasks", project.title, self.url, removed)
        return removed

    def _task_index(self, project: Project) -> dict[str, list[int]]:
        """sample_id -> ascending task ids (more than one only while duplicates exist)."""
        index: dict[str, list[int]] = {}
        for task in self._iter_tasks(
            project, f"list the tasks of project {project.title!r}", include="id,data"
        ):
            data = task.get("data") or {}
            if "sample_id" in data:
                index.setdefault(str(data["sample_id"]), []).append(int(task["id"]))
        return {sid: sorted(ids) for sid, ids in index.items()}

    def _iter_tasks(
        self,
        project: Project,
        what: str,
        *,
        filters: Sequence[Mapping[str, Any]] = (),
        selected: Sequence[int] | None = None,
        include: str | None = None,
        omit: str | None = None,
        fields: str | None = None,
        view: int | None = None,
        page_size: int = PAGE_SIZE,
    ) -> Iterator[dict[str, Any]]:
        """Tasks page by page, each page retried on its own: thousands of tasks never travel in one answer,
        and an outage mid-listing does not start it over.

        Pages are keyed by task id (`id > last seen`, in id order), not numbered, so tasks deleted or added
        meanwhile (a concurrent importer removing its duplicates) shift nothing and none is missed. A `view`
        has its own ordering and filters, so its pages are numbered. `filters` are AND-ed Data Manager
        filter items, `selected` restricts to task ids; `include`/`omit` pick the task fields (`include`
        also cuts nested annotations down to their ids, so listings that need annotations `omit` instead).
        """
        page, after = 1, 0
        while True:
            params: dict[str, Any] = {"project": project.id, "page_size": page_size, "resolve_uri": False}
            params |= {k: v for k, v in (("include", include), ("omit", omit), ("fields", fields)) if v}
            if view is not None:
                params |= {"view": view, "page": page}
            else:
                keyset = Filters.item(Column.id, Operator.GREATER, Type.Number, Filters.value(after))
                query: dict[str, Any] = {"filters": Filters.create(Filters.AND, [*filters, keyset])}
                if selected is not None:
                    query["selectedItems"] = {"all": False, "included": list(selected)}
                params |= {"page": 1, "query": json.dumps(query)}
            try:
                body = self._call(
                    f"{what} (page {page})",
                    lambda params=params: self._request("GET", "api/tasks/", params=params),
                )
            except LabelStudioNotFound:
                if page == 1:
                    raise
                return  # a view's tasks deleted since its first page: "Invalid page." ends the listing
            tasks = body.get("tasks") or []
            yield from tasks
            if len(tasks) < page_size:
                return
            page, after = page + 1, max(int(t["id"]) for t in tasks)

    # ------------------------------------------------------------------------------------- annotations

    def annotations(
        self, project: Project, *, round: int | None = None, task_ids: Iterable[int] | None = None
    ) -> list[AnnotationRecord]:
        """Every annotation of the selected tasks (all, one round's, or the given task ids): submitted, empty
        and cancelled (skipped) ones, each as last saved, ordered by task and annotation id."""
        what = f"list the annotations of project {project.title!r}"
        base: list[dict[str, Any]] = []
        if round is not None:
            base.append(Filters.item(Column.data("round"), Operator.EQUAL, Type.Number, Filters.value(round)))
        listings: list[tuple[list[dict[str, Any]], list[int] | None]] = []
        if task_ids is not None:
            ids = sorted({int(i) for i in task_ids})
            listings += [(base, ids[i : i + ID_BATCH]) for i in range(0, len(ids), ID_BATCH)]
        else:
            # Only tasks with an answer leave the server (projects hold many unlabelled tasks); a skip is
            # counted apart from the submitted answers, hence two listings.
            for counter in (Column.total_annotations, Column.cancelled_annotations):
                positive = Filters.item(counter, Operator.GREATER, Type.Number, Filters.value(0))
                listings.append(([*base, positive], None))
        records: dict[int, AnnotationRecord] = {}
        for filters, selected in listings:
            tasks = self._iter_tasks(
                project, what, filters=filters, selected=selected, omit=_HEAVY_FIELDS, fields="all"
            )
            for task in tasks:
                data = task.get("data") or {}
                if "sample_id" not in data:
                    continue  # not one of ours
                for ann in task.get("annotations") or []:
                    record = self._record(task, data, ann)
                    records[record.annotation_id] = record
        return sorted(records.values(), key=lambda r: (r.task_id, r.annotation_id))

    def labels(
        self, project: Project, *, since: datetime | None = None, round: int | None = None
    ) -> list[LabelRecord]:
        """Submitted (not skipped, not empty) answers, optionally only those saved after `since` (an edit
        counts as saved again) and/or of one round; ordered by save time."""
        since = _utc(since) if since is not None else None
        records = [
            LabelRecord(
                sample_id=r.sample_id,
                label=r.label,
                annotator=r.annotator,
                time=r.updated_at,
                round=r.round if r.round is not None else -1,
                task_id=r.task_id,
                annotation_id=r.annotation_id,
            )
            for r in self.annotations(project, round=round)
            if r.label is not None and not r.cancelled and (since is None or r.updated_at > since)
        ]
        return sorted(records, key=lambda r: (r.time, r.annotation_id))

    def _record(
        self, task: Mapping[str, Any], data: Mapping[str, Any], ann: Mapping[str, Any]
    ) -> AnnotationRecord:
        cancelled = bool(ann.get("was_cancelled"))
        created = _parse_time(ann.get("created_at"))
        lead_time = ann.get("lead_time")
        return AnnotationRecord(
            sample_id=str(data["sample_id"]),
            task_id=int(task["id"]),
            annotation_id=int(ann["id"]),
            annotator=self._annotator(ann.get("completed_by")),
            label=None if cancelled else _label_of(ann.get("result") or []),
            cancelled=cancelled,
            created_at=created,
            updated_at=_parse_time(ann["updated_at"]) if ann.get("updated_at") else created,
            round=int(data["round"]) if isinstance(data.get("round"), (int, float)) else None,
            lead_time=float(lead_time) if isinstance(lead_time, (int, float)) else None,
        )

    def _annotator(self, completed_by: Any) -> str:
        if isinstance(completed_by, dict):
            return str(completed_by.get("email") or completed_by.get("id"))
        if completed_by is None:
            return "unknown"
        user_id = int(completed_by)
        if user_id not in self._users:  # a user who signed up since the last look
            users = self._call("list users", lambda: list(self._sdk.users.list()))
            self._users = {int(u.id): str(u.email or u.username) for u in users}
        return self._users.get(user_id, str(user_id))

    # ---------------------------------------------------------------------------------------- webhooks

    def ensure_webhook(
        self,
        project: Project,
        url: str,
        *,
        actions: Sequence[str] = WEBHOOK_ACTIONS,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        """The project's webhook to `url` for `actions`, sending `headers` (e.g. a shared secret); returns its
        id. Idempotent: an existing one is updated in place, extra copies (a lost answer, a concurrent caller)
        are deleted, keeping the lowest id. Label Studio posts synchronously, with a 1 s timeout."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL for project {project.title!r} is not http(s): {url!r}")
        if not actions:
            raise ValueError(f"no webhook actions for project {project.title!r}")
        wanted = {
            "url": url,
            "actions": sorted(set(actions)),
            "headers": dict(headers or {}),
            "send_payload": True,
            "send_for_all_actions": False,
            "is_active": True,
        }

        def ensure() -> int:
            hooks = self._request("GET", "api/webhooks/", params={"project": project.id})
            same = sorted(
                (h for h in hooks if h.get("project") == project.id and h.get("url") == url),
                key=lambda h: h["id"],
            )
            if not same:
                return int(
                    self._request("POST", "api/webhooks/", json={**wanted, "project": project.id})["id"]
                )
            keep, *extra = same
            for hook in extra:
                self._request("DELETE", f"api/webhooks/{hook['id']}/", missing_ok=True)
            current = {key: keep.get(key) for key in wanted}
            current["actions"] = sorted(keep.get("actions") or [])
            if current != wanted:
                self._request("PATCH", f"api/webhooks/{keep['id']}/", json=wanted)
            return int(keep["id"])

        return self._call(f"ensure the webhook of project {project.title!r}", ensure)

    # ------------------------------------------------------------------------------------------ errors

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        missing_ok: bool = False,
    ) -> Any:
        """One raw JSON request through the SDK's authenticated HTTP client (so legacy and JWT tokens both
        work), for endpoints whose SDK model drops fields we need. Non-2xx raises `ApiError` like the SDK."""
        response = self._sdk._client_wrapper.httpx_client.request(
            path, method=method, params=dict(params or {}), json=json
        )
        if missing_ok and response.status_code == 404:
            return None
        if response.status_code >= 400:
            try:
                body: Any = response.json()
            except ValueError:
                body = response.text[:500]
            raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=body)
        return response.json() if response.content else None

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
        transient = isinstance(exc, httpx.TransportError) or (
            status is not None and (status >= 500 or status in TRANSIENT_4XX)
        )
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
                f"check {self.token_from} (`bayescurate services status` shows the server and token "
                "commands use)"
            ) from None
        if status == 404:
            raise LabelStudioNotFound(f"Label Studio at {self.url}: not found (HTTP 404) to {what}") from None
        if transient:
            raise LabelStudioUnavailable(
                f"Label Studio at {self.url} unreachable or failing: could not {what} within "
                f"{self.retry_for:g} s ({attempt + 1} attempts, last: {_brief(exc)}); is the server up? "
                "(`bayescurate services status`)"
            ) from None
        if isinstance(exc, ApiError):
            raise LabelStudioRejected(
                f"Label Studio at {self.url} rejected the request to {what} (HTTP {status}): {exc.body}"
            ) from None
        raise exc

    def _follow_restart(self) -> None:
        url = self._locate() if self._locate is not None else None
        if url and url.rstrip("/") != self.url:
            log.warning("Label Studio moved from %s to %s (restarted); following it", self.url, url)
            self.url = url.rstrip("/")
            self._sdk = self._new_sdk()


def _s3_settings(region: str | None, endpoint: str | None) -> tuple[dict[str, str | None], dict[str, str]]:
    """(endpoint and region, credentials) of an S3 storage, from the arguments or the AWS SDKs' variables."""
    env = os.environ
    settings = {
        "region_name": region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        "s3endpoint": endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
    }
    names = {
        "aws_access_key_id": "AWS_ACCESS_KEY_ID",
        "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
        "aws_session_token": "AWS_SESSION_TOKEN",
    }
    secrets = {field_: env[var] for field_, var in names.items() if env.get(var)}
    pair = ("aws_access_key_id", "aws_secret_access_key")
    if any(k in secrets for k in pair) and not all(k in secrets for k in pair):
        missing = next(names[k] for k in pair if k not in secrets)
        raise ValueError(f"{missing} is not set: an S3 storage needs both the key id and the secret key")
    return settings, secrets


def _redacted(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value starred out."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


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


def _data_key(key: str, sample_id: str, *, sortable: bool = True) -> str:
    """A task data key: not one TaskInput sets itself; a sortable one must be a plain name (the Data Manager
    reads `tasks:data.a.b` as a nested field), any other at least dot-free."""
    if key in RESERVED_KEYS:
        raise ValueError(f"task field {key!r} of sample {sample_id!r} is reserved")
    if not key or "." in key or (sortable and not _FIELD.match(key)):
        raise ValueError(
            f"task field {key!r} of sample {sample_id!r} is not a Data Manager column name "
            "(letters, digits, underscores)"
        )
    return key


def _rounded(value: Any, name: str, sample_id: str) -> int | float:
    """A score as annotators read it: `SCORE_DIGITS` significant digits, whole numbers kept whole."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} of sample {sample_id!r} must be a number, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} of sample {sample_id!r} is not finite: {value!r}")
    return float(f"{float(value):.{SCORE_DIGITS}g}")


def _whole(value: Any, name: str, sample_id: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} of sample {sample_id!r} must be an integer, got {value!r}")
    return int(value)


def _safe_name(text: str) -> str:
    """A file or folder name for `text`; a short hash keeps names that had to change apart."""
    safe = _UNSAFE.sub("_", text).strip("._")[:80]
    if safe == text and safe:
        return safe
    return f"{safe or 'x'}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return _utc(value)
    return _utc(datetime.fromisoformat(str(value).replace("Z", "+00:00")))
