"""The labels table: append-only, one row per version of an annotation seen, and how answers resolve.

Every collection compares what the label source returns now with the table and appends only what changed:
a new annotation, a new version of an edited one (a later `updated_at`), or a tombstone for one that was
deleted. Appending is keyed by content, so a collection repeated after a crash appends nothing twice.

Resolution, per sample: the latest version of each annotation wins; cancelled (skipped) answers count as
answered but are not labels; a label that is not a class is quarantined with the reason; each annotator
counts once (their latest answer); the majority label wins, ties going to the most recently saved label;
the agreement is the majority's share of the annotators.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipeline.io import storage
from pipeline.rounds.layout import CampaignDir

UTC = pa.timestamp("us", tz="UTC")

# The labels table's columns, in order: every field of an `Annotation`, and when its row was collected.
SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("annotation_id", pa.string()),
        ("annotator", pa.string()),
        ("label", pa.string()),
        ("cancelled", pa.bool_()),
        ("deleted", pa.bool_()),
        ("created_at", UTC),
        ("updated_at", UTC),
        ("round", pa.int32()),
        ("task_id", pa.int64()),
        ("collected_at", UTC),
    ]
)
# The quarantine's columns: the fields of a `Quarantined`.
QUARANTINE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("annotation_id", pa.string()),
        ("annotator", pa.string()),
        ("label", pa.string()),
        ("reason", pa.string()),
        ("updated_at", UTC),
    ]
)


@dataclass(frozen=True)
class Annotation:
    """One answer as a label source reports it (Label Studio or the oracle)."""

    sample_id: str
    annotation_id: str  # unique at the source, e.g. "ls:123" or "oracle:<sample_id>"
    annotator: str
    label: str | None  # the chosen class; None when cancelled or empty
    cancelled: bool
    created_at: datetime
    updated_at: datetime  # changes when the annotation is edited
    round: int
    task_id: int | None = None
    deleted: bool = False

    def key(self) -> tuple[object, ...]:
        """What makes two sightings the same version."""
        return (self.label, self.cancelled, self.deleted, _utc(self.updated_at))


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _in_utc(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """`row` with its timestamp columns in UTC (on the way into the table and out of it)."""
    return {k: _utc(v) if schema.field(k).type == UTC else v for k, v in row.items()}


def read_rows(directory: str) -> list[Annotation]:
    """Every row of the labels table, in the order they were appended."""
    folder = CampaignDir(directory).labels
    if not storage.exists(folder):
        return []
    names = [f.name for f in fields(Annotation)]
    return [
        Annotation(**_in_utc(r, SCHEMA))
        for path in storage.list_files(folder, suffix=".parquet", recursive=False)
        for r in storage.read_parquet(path, columns=names).to_pylist()
    ]


def latest(rows: Iterable[Annotation]) -> dict[str, Annotation]:
    """annotation_id -> its latest version (table order)."""
    out: dict[str, Annotation] = {}
    for row in rows:
        out[row.annotation_id] = row
    return out


def changes(
    existing: Sequence[Annotation], fetched: Sequence[Annotation], scope: set[str]
) -> list[Annotation]:
    """What to append: fetched versions the table lacks, and tombstones for vanished annotations.

    `scope`: the sample ids the fetch covered (an annotation of another sample is never tombstoned).
    """
    current = latest(existing)
    seen: set[str] = set()
    out: list[Annotation] = []
    for ann in fetched:
        seen.add(ann.annotation_id)
        old = current.get(ann.annotation_id)
        if old is None or old.key() != ann.key():
            out.append(ann)
    for aid, old in current.items():
        if aid not in seen and not old.deleted and old.sample_id in scope:
            out.append(replace(old, label=None, deleted=True))  # its tombstone
    return out


def append(directory: str, rows: Sequence[Annotation], collected_at: datetime) -> str | None:
    """Append `rows` as the next part of the table (nothing when empty); returns the part's path."""
    if not rows:
        return None
    folder = CampaignDir(directory).labels
    existing = (
        storage.list_files(folder, suffix=".parquet", recursive=False) if storage.exists(folder) else []
    )
    path = storage.join(folder, f"part-{len(existing):06d}.parquet")
    table = pa.Table.from_pylist(
        [_in_utc({**asdict(r), "collected_at": collected_at}, SCHEMA) for r in rows], schema=SCHEMA
    )
    storage.write_parquet(table, path)
    return path


@dataclass(frozen=True)
class Resolved:
    """The label of one sample after resolving its annotators' answers."""

    sample_id: str
    label: str
    round: int
    annotators: int
    agreement: float  # share of the annotators who chose `label`
    updated_at: datetime


@dataclass(frozen=True)
class Quarantined:
    sample_id: str
    annotation_id: str
    annotator: str
    label: str
    reason: str
    updated_at: datetime


@dataclass
class Resolution:
    """Labels, skips and quarantined answers of every sample with at least one answer."""

    labels: dict[str, Resolved] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)  # labelled, skipped or quarantined
    skipped: set[str] = field(default_factory=set)  # answered by cancellations only
    quarantined: list[Quarantined] = field(default_factory=list)

    def digest(self) -> str:
        """SHA-256 of the resolved (sample_id, label) pairs: what a re-fit learns from."""
        return digest((sid, r.label) for sid, r in self.labels.items())


def digest(pairs: Iterable[tuple[str, str]]) -> str:
    """SHA-256 of (sample_id, label) pairs, in any order: the identity of a set of labels."""
    text = "".join(f"{sid}\t{label}\n" for sid, label in sorted(pairs))
    return hashlib.sha256(text.encode()).hexdigest()


def resolve(rows: Iterable[Annotation], classes: Sequence[str]) -> Resolution:
    """Resolve the table's rows into one label per sample (see the module docstring)."""
    valid = set(classes)
    by_sample: dict[str, list[Annotation]] = defaultdict(list)
    for ann in latest(rows).values():
        if not ann.deleted:
            by_sample[ann.sample_id].append(ann)
    out = Resolution()
    for sid, anns in sorted(by_sample.items()):
        out.answered.add(sid)
        votes: dict[str, Annotation] = {}  # annotator -> their latest valid answer
        for ann in sorted(anns, key=lambda a: (a.updated_at, a.annotation_id)):
            if ann.cancelled or ann.label is None:
                continue
            if ann.label not in valid:
                reason = f"{ann.label!r} is not one of the classes"
                out.quarantined.append(
                    Quarantined(sid, ann.annotation_id, ann.annotator, ann.label, reason, ann.updated_at)
                )
                continue
            votes[ann.annotator] = ann
        if not votes:
            if all(a.cancelled for a in anns):
                out.skipped.add(sid)
            continue
        counts = Counter(a.label for a in votes.values())
        top = max(counts.values())
        tied = [a for a in votes.values() if counts[a.label] == top]
        winner = max(tied, key=lambda a: (a.updated_at, a.annotation_id))
        out.labels[sid] = Resolved(
            sid, str(winner.label), winner.round, len(votes), top / len(votes), winner.updated_at
        )
    return out


def write_quarantine(directory: str, quarantined: Sequence[Quarantined]) -> int:
    """Record quarantined answers not recorded yet (keyed by annotation id and version); returns how many."""
    folder = CampaignDir(directory).quarantine
    existing = (
        storage.list_files(folder, suffix=".parquet", recursive=False) if storage.exists(folder) else []
    )
    known = {
        (r["annotation_id"], _utc(r["updated_at"]))
        for path in existing
        for r in storage.read_parquet(path).to_pylist()
    }
    new = [q for q in quarantined if (q.annotation_id, _utc(q.updated_at)) not in known]
    if new:
        table = pa.Table.from_pylist(
            [_in_utc(asdict(q), QUARANTINE_SCHEMA) for q in new], schema=QUARANTINE_SCHEMA
        )
        storage.write_parquet(table, storage.join(folder, f"part-{len(existing):06d}.parquet"))
    return len(new)


@dataclass(frozen=True)
class LabelCounts:
    """What the answers to one round's tasks resolve to at a collection."""

    tasks: int  # the round's tasks (its distinct picks)
    answered: int  # tasks labelled, skipped or quarantined
    labelled: int  # tasks with a resolved label
    skipped: int  # tasks answered by cancellations only
    quarantined: int  # tasks with an answer that is not a class, and no label
    multi_annotated: int  # labelled tasks with more than one annotator
    agreement: float  # mean agreement of the multi-annotated tasks (1 when there are none)
    labels_total: int  # resolved labels of the whole campaign (every round's tasks)


def round_counts(resolution: Resolution, picks: Sequence[str]) -> LabelCounts:
    """Label counts of one round's tasks."""
    ids = set(picks)
    labelled = [resolution.labels[s] for s in ids if s in resolution.labels]
    multi = [r for r in labelled if r.annotators > 1]
    quarantined = {q.sample_id for q in resolution.quarantined if q.sample_id in ids}
    return LabelCounts(
        tasks=len(ids),
        answered=len(ids & resolution.answered),
        labelled=len(labelled),
        skipped=len(ids & resolution.skipped),
        quarantined=len(quarantined - set(resolution.labels)),
        multi_annotated=len(multi),
        agreement=sum(r.agreement for r in multi) / len(multi) if multi else 1.0,
        labels_total=len(resolution.labels),
    )


def labels_table(resolution: Resolution) -> pa.Table:
    """The resolved labels as a table (what a round's re-fit learns from: `rounds/RRR/labels.parquet`)."""
    rows = sorted(resolution.labels.values(), key=lambda r: r.sample_id)
    return pa.table(
        {
            "sample_id": pa.array([r.sample_id for r in rows], pa.string()),
            "label": pa.array([r.label for r in rows], pa.string()),
            "round": pa.array([r.round for r in rows], pa.int32()),
            "annotators": pa.array([r.annotators for r in rows], pa.int32()),
            "agreement": pa.array([r.agreement for r in rows], pa.float64()),
        }
    )
