"""Label sources: where a round's tasks go and where their answers come from.

Both sources return `labels.Annotation`s, so everything after the fetch (the append-only table, the
resolution, the counts) is one code path. `LabelStudioSource` pushes tasks with images by reference and
the model's prediction; `OracleSource` answers every pushed sample at once from a ground-truth table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pipeline.annotation import ImageStore, TaskRow, push_tasks
from pipeline.io import storage
from pipeline.rounds.config import CampaignConfig, LabelSource
from pipeline.rounds.labels import Annotation
from pipeline.rounds.layout import project_name
from pipeline.rounds.webhook import SECRET_HEADER


class Source(Protocol):
    """Where tasks go and answers come from."""

    name: str

    def push(
        self, rows: Sequence[TaskRow], sources: Mapping[str, str], *, model_version: str
    ) -> dict[str, Any]:
        """Create the tasks not created yet (idempotent, keyed by sample_id); returns counts."""
        ...

    def fetch(self, sample_ids: Mapping[str, int]) -> list[Annotation]:
        """Every current annotation of the given samples (sample_id -> round)."""
        ...

    def url(self) -> str | None:
        """Where people see the tasks, if anywhere."""
        ...

    def check(self) -> None:
        """Fail now (at `campaign init`) rather than at the first push: reachable, readable, consistent."""
        ...


@runtime_checkable
class WebhookSource(Source, Protocol):
    """A source that posts its annotation events to a URL as they happen (`campaign serve` steps on them)."""

    def register_webhook(self, url: str, secret: str) -> int:
        """The one webhook to `url`, sending `secret` in the `SECRET_HEADER` header; returns its id.
        Idempotent: a re-run updates that webhook in place."""
        ...


@dataclass
class LabelStudioSource:
    """A Label Studio project (created on first push with the campaign's classes)."""

    project: str
    classes: Sequence[str]
    state_dir: str | None = None
    inline_max_bytes: int = 0
    retry_for: float = 120.0  # seconds a request retries connection errors and 5xx before it fails
    image_root: str | None = None  # Label Studio's local-files root, when this machine writes into it
    image_store: str | None = None  # s3:// prefix to stage images under, read through an S3 storage
    label_studio_url: str | None = None  # a server of your own (else $LABEL_STUDIO_URL or the services')
    token_file: str | None = None  # file holding that server's API token (else $LABEL_STUDIO_API_KEY...)
    name: str = LabelSource.LABEL_STUDIO.value

    def __post_init__(self) -> None:
        self._client: Any = None
        self._project: Any = None
        self._target: Any = None
        self._view: int | None = None  # the Data Manager tab the last push made or found

    @property
    def target(self) -> Any:
        """The server, as every command resolves it (`connectors.label_studio_access.resolve`): the campaign's
        `label_studio_url`, else the services of its `state_dir`, else `$LABEL_STUDIO_URL` (a cluster pod,
        token from a Secret), else the local `bayescurate services`."""
        if self._target is None:
            from connectors.label_studio_access import resolve

            self._target = resolve(self.label_studio_url, self.token_file, self.state_dir)
        return self._target

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self.target.client(retry_for=self.retry_for)
        return self._client

    def ensure_project(self) -> Any:
        if self._project is None:
            self._project = self.client.ensure_project(self.project, list(self.classes))
        return self._project

    def push(
        self, rows: Sequence[TaskRow], sources: Mapping[str, str], *, model_version: str
    ) -> dict[str, Any]:
        self.ensure_project()
        root = self.image_root or self.target.image_root  # the local services' root; another's is unknown
        store = ImageStore(Path(root) if root else None, self.inline_max_bytes, self.image_store)
        result = push_tasks(
            self.client, self.project, self.classes, rows, sources, store, model_version=model_version
        )
        self._view = result.get("view")
        return result

    def fetch(self, sample_ids: Mapping[str, int]) -> list[Annotation]:
        project = self.ensure_project()
        out = []
        for rec in self.client.annotations(project):
            if rec.sample_id not in sample_ids:
                continue
            out.append(
                Annotation(
                    sample_id=rec.sample_id,
                    annotation_id=f"ls:{rec.annotation_id}",
                    annotator=rec.annotator,
                    label=rec.label,
                    cancelled=rec.cancelled,
                    created_at=rec.created_at,
                    updated_at=rec.updated_at,
                    round=sample_ids[rec.sample_id] if rec.round is None else int(rec.round),
                    task_id=rec.task_id,
                )
            )
        return out

    def url(self) -> str | None:
        """The project's Data Manager, opened on the tab of the last push when there was one."""
        project = self.ensure_project()
        tab = f"?tab={self._view}" if self._view is not None else ""
        return f"{self.client.url}/projects/{project.id}/data{tab}"

    def check(self) -> None:
        self.ensure_project()

    def register_webhook(self, url: str, secret: str) -> int:
        """The project's webhook to `url` for the annotation events that change a round's answers
        (`connectors.label_studio.WEBHOOK_ACTIONS`)."""
        return int(self.client.ensure_webhook(self.ensure_project(), url, headers={SECRET_HEADER: secret}))


EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


@dataclass
class OracleSource:
    """Ground truth for every pushed sample, at once: a Parquet file or folder with sample_id + `column`."""

    truth: str
    column: str
    name: str = LabelSource.ORACLE.value

    def __post_init__(self) -> None:
        self._truth: dict[str, str] | None = None

    def _table(self) -> dict[str, str]:
        if self._truth is None:
            files = [f for f in storage.list_files(self.truth, suffix=".parquet") if "/quarantine/" not in f]
            if not files:
                raise FileNotFoundError(f"no Parquet files under the oracle's truth {self.truth!r}")
            truth: dict[str, str] = {}
            for path in files:
                table = storage.read_parquet(path)
                if "sample_id" not in table.column_names or self.column not in table.column_names:
                    raise ValueError(
                        f"the oracle's truth {path!r} needs columns 'sample_id' and {self.column!r}; "
                        f"it has {table.column_names}"
                    )
                for sid, label in zip(
                    table.column("sample_id").to_pylist(), table.column(self.column).to_pylist(), strict=True
                ):
                    if label is not None:
                        truth[str(sid)] = str(label)
            self._truth = truth
        return self._truth

    def push(
        self, rows: Sequence[TaskRow], sources: Mapping[str, str], *, model_version: str
    ) -> dict[str, Any]:
        truth = self._table()
        missing = [r.sample_id for r in rows if r.sample_id not in truth]
        if missing:
            raise ValueError(
                f"the oracle's truth {self.truth!r} has no label for {len(missing)} picks: {missing[:5]}"
            )
        return {"created": len(rows), "skipped": 0}

    def fetch(self, sample_ids: Mapping[str, int]) -> list[Annotation]:
        truth = self._table()
        return [
            Annotation(sid, f"oracle:{sid}", "oracle", truth[sid], False, EPOCH, EPOCH, round_)
            for sid, round_ in sorted(sample_ids.items())
            if sid in truth
        ]

    def url(self) -> str | None:
        return None

    def check(self) -> None:
        self._table()


def make_source(
    cfg: CampaignConfig, classes: Sequence[str], directory: str, label_column: str | None
) -> Source:
    """The label source a campaign config names."""
    if cfg.label_source is LabelSource.ORACLE:
        column = cfg.truth_label_column or label_column
        if not column:
            raise ValueError("the oracle needs `truth_label_column` (the classes file names no label column)")
        return OracleSource(str(cfg.truth), column)
    return LabelStudioSource(
        project_name(cfg, directory),
        list(classes),
        cfg.state_dir,
        cfg.inline_max_bytes,
        retry_for=cfg.label_studio_retry_s,
        image_root=cfg.image_root,
        image_store=cfg.image_store,
        label_studio_url=cfg.label_studio_url,
        token_file=cfg.label_studio_token_file,
    )
