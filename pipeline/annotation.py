"""Picks -> Label Studio tasks: images by reference, the model's prediction, sortable uncertainty fields.

Images reach Label Studio by reference, never as base64 in its database. Only the picked rows are read
(`sources.read_images`), and only when an image has to be copied.
- Local images under Label Studio's local-files document root are referenced where they are
  (`/data/local-files/?d=...`, behind a local-files storage).
- Images that already are objects on S3 (`s3://bucket/key.png`, an image-folder corpus on a bucket) are
  referenced as that URI, behind an S3 storage of the project (`ensure_s3_storage`): Label Studio presigns a
  short-lived URL each time an annotator opens the task.
- Any other image (bytes inside Parquet, WebDataset members, files elsewhere) is staged once, under
  `<image_store>/<project>/` on S3 when an `image_store` is set, else under `<image root>/<project>/`, and
  referenced there the same way.
Images at or below `inline_max_bytes` may be inlined instead (thumbnails only).
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
    """Where Label Studio can read images from that this machine writes, and what may be inlined instead."""

    root: Path | None  # its local-files document root (None: unknown, e.g. a server on a cluster)
    inline_max_bytes: int = 0  # images this small are inlined into the task instead
    objects: str | None = None  # s3://bucket/prefix/ to stage images under (read through an S3 storage)

    def __post_init__(self) -> None:
        if self.objects is not None:
            bucket, _ = _s3_location(self.objects)
            if not bucket:
                raise ValueError(f"image_store {self.objects!r} is not an s3://bucket/prefix URI")

    def folder(self, project: str) -> Path:
        from connectors.label_studio import image_folder

        if self.root is None:
            raise ValueError("Label Studio's image root is unknown")
        return image_folder(self.root, project)


@dataclass(frozen=True)
class TaskImages:
    """The image reference of every task, and the storages Label Studio needs to serve them."""

    urls: dict[str, str]  # sample_id -> the task's image: local-files URL, s3:// URI or data URI
    folder: Path | None  # staging folder that needs a local-files storage (None: nothing staged there)
    buckets: dict[str, str]  # bucket -> key prefix under which its referenced objects lie (an S3 storage)


def _s3_location(uri: str) -> tuple[str, str]:
    """(bucket, key) of an `s3://bucket/key` URI; ("", "") for anything else."""
    if not uri.startswith("s3://") or "?" in uri:
        return "", ""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _common_folder(keys: Sequence[str]) -> str:
    """The deepest folder holding all `keys` ("" for the bucket's root)."""
    common: list[str] = []
    for names in zip(*(key.split("/")[:-1] for key in keys), strict=False):  # level by level
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return "/".join(common)


def task_images(store: ImageStore, project: str, sources: Mapping[str, str]) -> TaskImages:
    """The image reference of each sample's task; stages (copies) only the images that need it.

    `sources`: sample_id -> the row's image location (the `source` column of `embed`'s output).
    """
    from connectors.label_studio import inline_image, local_files_url, stage_image, stage_object

    urls: dict[str, str] = {}
    staged = False
    pending = dict(sources)
    for sid, source in list(pending.items()):
        if "#" in source or ".tar:" in source:
            continue  # inside a container: read the row below
        if _s3_location(source)[1]:
            if storage.is_file(source):
                urls[sid] = source  # an object already: Label Studio reads it through an S3 storage
                del pending[sid]
        elif store.root is not None and storage.is_local(source):
            path = Path(storage.resolve(source)[1])
            if path.is_relative_to(store.root) and path.is_file():
                urls[sid] = local_files_url(path, store.root)
                del pending[sid]
    images = read_images(list(pending.values())) if pending else {}
    for sid, source in pending.items():
        data = images[source]
        if len(data) <= store.inline_max_bytes:
            urls[sid] = inline_image(data, f"image/{image_extension(data)}")
        elif store.objects is not None:
            urls[sid] = stage_object(store.objects, project, sid, data, image_extension(data))
        elif store.root is not None:
            target = stage_image(store.root, project, sid, data, image_extension(data))
            urls[sid] = local_files_url(target, store.root)
            staged = True
        else:
            raise ValueError(
                f"cannot reference the image of {sid!r} ({len(data)} bytes, from {source!r}) in Label Studio "
                f"project {project!r}: its local-files root is unknown and no image_store is set (set "
                "image_store to an s3:// prefix Label Studio can read, run `bayescurate services up`, or "
                "raise inline_max_bytes)"
            )
    keys: dict[str, list[str]] = {}
    for url in urls.values():
        bucket, key = _s3_location(url)
        if key:
            keys.setdefault(bucket, []).append(key)
    buckets = {bucket: _common_folder(names) for bucket, names in sorted(keys.items())}
    return TaskImages(urls, store.folder(project) if staged else None, buckets)


@dataclass(frozen=True)
class TaskRow:
    """What one task shows: the pick, its scores and the model's answer."""

    sample_id: str
    round: int
    rank: int
    predicted: str
    confidence: float
    # The method's score first (e.g. {"epig": 0.31, "entropy": 1.2}): numeric, sortable columns.
    scores: Mapping[str, float]
    mlflow_run: str | None = None  # URL of the MLflow run of the round that picked it


INFORMATIVENESS = "informativeness"  # task field: the pick's score in percent of its round's best pick


def tab_title(score: str) -> str:
    """Title of the Data Manager tab `push_tasks` makes for a method's score."""
    return f"most informative first ({score})"


def informativeness(rows: Sequence[TaskRow]) -> dict[str, float]:
    """sample_id -> 100 * score / (the best score of its round), one decimal, for the rows' first score.

    The raw scores (EPIG, BALD in nats) are tiny and mean nothing to a person; a share of the round's best
    pick reads at a glance (100: the pick the model asked about most; 5: a twentieth of that) and orders the
    picks exactly as the score does. Negative scores (Monte Carlo noise around zero) count as 0; a round whose
    best score is not positive (the random baseline scores 0) gets 0 throughout.
    """
    score = {r.sample_id: max(float(next(iter(r.scores.values()), 0.0)), 0.0) for r in rows}
    best: dict[int, float] = {}
    for r in rows:
        best[r.round] = max(best.get(r.round, 0.0), score[r.sample_id])
    return {
        r.sample_id: round(100.0 * score[r.sample_id] / best[r.round], 1) if best[r.round] > 0 else 0.0
        for r in rows
    }


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
    """Create the tasks that the project does not hold yet (keyed by sample_id), then its Data Manager tab:
    the image, prediction, confidence, informativeness, the method's score, rank and round, most informative
    first. Returns counts, the tab's id and its URL.

    `rows` are whole rounds (informativeness is relative to each round's best pick), as a campaign's push and
    `select` send them."""
    from connectors.label_studio import TO_NAME, Prediction, TaskInput

    project = client.ensure_project(project_title, list(classes))
    existing = client.task_ids(project)
    todo = [r for r in rows if r.sample_id not in existing]
    images = task_images(store, project_title, {r.sample_id: sources[r.sample_id] for r in todo})
    if images.folder is not None:
        client.ensure_local_storage(project, images.folder)
    for bucket, prefix in images.buckets.items():  # after staging: Label Studio checks the prefix has objects
        client.ensure_s3_storage(project, bucket, prefix)
    urls = images.urls
    shares = informativeness(rows)
    tasks = [
        TaskInput(
            sample_id=r.sample_id,
            image=urls[r.sample_id],
            round=r.round,
            prediction=Prediction(r.predicted, r.confidence, model_version),
            uncertainty={INFORMATIVENESS: shares[r.sample_id], **r.scores},
            confidence=r.confidence,
            rank=r.rank + 1,
            mlflow_run=r.mlflow_run,
        )
        for r in todo
    ]
    result = client.import_tasks(project, tasks)
    out: dict[str, Any] = {
        "project_id": project.id,
        "url": f"{client.url}/projects/{project.id}/data",
        "created": len(result.created),
        "skipped": len(rows) - len(result.created),
    }
    if rows:  # the tab annotators open: what the model doubts, readable, most informative first
        score = next(iter(rows[0].scores), "confidence")
        shown = (TO_NAME, "predicted", "confidence", INFORMATIVENESS, score, "rank", "round")
        # The raw scores keep Label Studio's plain display: its number display shows three decimals, 0.000
        # for an EPIG of 0.0002 (a person switches it with the column's type badge).
        view = client.ensure_view(
            project,
            tab_title(score),
            order_by=INFORMATIVENESS,
            number_columns=("confidence", "rank", "round"),
            columns=tuple(dict.fromkeys(shown)),
        )
        out |= {"view": view, "url": f"{out['url']}?tab={view}"}
    return out
