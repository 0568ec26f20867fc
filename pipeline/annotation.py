"""Picks -> Label Studio tasks: images by reference, the model's prediction, sortable uncertainty fields.

Images reach Label Studio by reference, never as base64 in its database: local images under Label
Studio's local-files document root are referenced where they are; any other image (bytes inside Parquet,
WebDataset members, files elsewhere) is staged once under `<image root>/<project>/` and referenced there,
behind a local-files storage of that folder. Only the picked rows are read (`sources.read_images`).
Images at or below `inline_max_bytes` may be inlined instead (thumbnails, or a Label Studio whose image
root this machine cannot write).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.sources import read_images
from pipeline.io import storage

MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"RIFF", "webp"), (b"GIF8", "gif"), (b"BM", "bmp"))


def image_extension(data: bytes) -> str:
    """File extension of encoded image bytes, from their magic number (png when unknown)."""
    return next((ext for magic, ext in MAGIC if data.startswith(magic)), "png")


@dataclass(frozen=True)
class ImageStore:
    """Where a Label Studio server serves local files from, and what may be inlined instead."""

    root: Path | None  # its local-files document root (None: unknown, only inlining is possible)
    inline_max_bytes: int = 0  # images this small are inlined into the task instead

    def folder(self, project: str) -> Path:
        from connectors.label_studio import image_folder

        if self.root is None:
            raise ValueError("Label Studio's image root is unknown")
        return image_folder(self.root, project)


def task_images(
    store: ImageStore, project: str, sources: Mapping[str, str]
) -> tuple[dict[str, str], Path | None]:
    """sample_id -> image URL for the task, and the staging folder that needs a local-files storage.

    `sources`: sample_id -> the row's image location (the `source` column of `embed`'s output).
    """
    from connectors.label_studio import inline_image, local_files_url, stage_image

    urls: dict[str, str] = {}
    staged = False
    pending = dict(sources)
    if store.root is not None:
        for sid, source in list(pending.items()):
            if storage.is_local(source) and "#" not in source and ".tar:" not in source:
                path = Path(storage.resolve(source)[1])
                if path.is_relative_to(store.root) and path.is_file():
                    urls[sid] = local_files_url(path, store.root)
                    del pending[sid]
    images = read_images(list(pending.values())) if pending else {}
    for sid, source in pending.items():
        data = images[source]
        if len(data) <= store.inline_max_bytes:
            urls[sid] = inline_image(data, f"image/{image_extension(data)}")
            continue
        if store.root is None:
            raise ValueError(
                f"cannot reference the image of {sid!r} ({len(data)} bytes): Label Studio's local-files "
                "root is unknown (run `bayescurate services up`, or raise inline_max_bytes)"
            )
        target = stage_image(store.root, project, sid, data, image_extension(data))
        urls[sid] = local_files_url(target, store.root)
        staged = True
    return urls, (store.folder(project) if staged else None)


@dataclass(frozen=True)
class TaskRow:
    """What one task shows: the pick, its scores and the model's answer."""

    sample_id: str
    round: int
    rank: int
    predicted: str
    confidence: float
    scores: Mapping[str, float]  # e.g. {"epig": 0.31, "entropy": 1.2}: numeric, sortable columns
    mlflow_run: str | None = None  # URL of the MLflow run of the round that picked it


def push_tasks(
    client: Any,
    project_title: str,
    classes: Sequence[str],
    rows: Sequence[TaskRow],
    sources: Mapping[str, str],
    store: ImageStore,
    *,
    model_version: str,
) -> dict[str, Any]:
    """Create the tasks that the project does not hold yet (keyed by sample_id); returns counts and URL."""
    from connectors.label_studio import Prediction, TaskInput

    project = client.ensure_project(project_title, list(classes))
    existing = client.task_ids(project)
    todo = [r for r in rows if r.sample_id not in existing]
    urls, folder = task_images(store, project_title, {r.sample_id: sources[r.sample_id] for r in todo})
    if folder is not None:
        client.ensure_local_storage(project, folder)
    tasks = [
        TaskInput(
            sample_id=r.sample_id,
            image=urls[r.sample_id],
            round=r.round,
            prediction=Prediction(r.predicted, r.confidence, model_version),
            uncertainty=dict(r.scores),
            confidence=r.confidence,
            rank=r.rank + 1,
            mlflow_run=r.mlflow_run,
        )
        for r in todo
    ]
    result = client.import_tasks(project, tasks)
    if rows:  # a Data Manager tab that sorts the scores as numbers, most informative first
        score = next(iter(rows[0].scores), "confidence")
        numbers = (*rows[0].scores, "confidence", "rank", "round")
        client.ensure_view(
            project, f"most informative first ({score})", order_by=score, number_columns=numbers
        )
    return {
        "project_id": project.id,
        "url": f"{client.url}/projects/{project.id}/data",
        "created": len(result.created),
        "skipped": len(rows) - len(result.created),
    }
