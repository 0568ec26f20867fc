"""The labels table: append-only and idempotent; edits, skips, several annotators, deletions and labels
that are not a class resolve as documented."""

from __future__ import annotations

from dataclasses import fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pipeline.rounds.labels import (
    QUARANTINE_SCHEMA,
    SCHEMA,
    Annotation,
    Quarantined,
    append,
    changes,
    labels_table,
    read_rows,
    resolve,
    round_counts,
    write_quarantine,
)

CLASSES = ["circle", "square", "star"]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def ann(
    sid: str, aid: int, label: str | None, who: str = "a@x", minutes: int = 0, **kw: object
) -> Annotation:
    when = T0 + timedelta(minutes=minutes)
    return Annotation(
        sid, f"ls:{aid}", who, label, bool(kw.get("cancelled", False)), T0, when, int(kw.get("round", 0)), aid
    )


def test_collecting_twice_appends_nothing_the_second_time(tmp_path: Path) -> None:
    fetched = [ann("s1", 1, "circle"), ann("s2", 2, None, cancelled=True)]
    first = changes([], fetched, {"s1", "s2"})
    assert len(first) == 2
    append(str(tmp_path), first, T0)
    rows = read_rows(str(tmp_path))
    assert rows == first
    assert changes(rows, fetched, {"s1", "s2"}) == []  # a repeated collection (e.g. after a crash)
    assert append(str(tmp_path), [], T0) is None
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["part-000000.parquet"]


def test_an_edited_annotation_is_a_new_version_and_the_latest_wins(tmp_path: Path) -> None:
    append(str(tmp_path), [ann("s1", 1, "circle")], T0)
    edited = [ann("s1", 1, "square", minutes=5)]
    new = changes(read_rows(str(tmp_path)), edited, {"s1"})
    assert [a.label for a in new] == ["square"]
    append(str(tmp_path), new, T0)
    rows = read_rows(str(tmp_path))
    assert len(rows) == 2  # both versions kept: append-only
    assert resolve(rows, CLASSES).labels["s1"].label == "square"


def test_skips_count_as_answered_but_are_no_labels() -> None:
    rows = [ann("s1", 1, None, cancelled=True), ann("s2", 2, "star")]
    res = resolve(rows, CLASSES)
    assert res.answered == {"s1", "s2"} and res.skipped == {"s1"} and set(res.labels) == {"s2"}
    counts = round_counts(res, ["s1", "s2", "s3"])
    assert (counts.tasks, counts.answered, counts.labelled, counts.skipped) == (3, 2, 1, 1)


def test_several_annotators_majority_then_latest_and_agreement() -> None:
    rows = [
        ann("s1", 1, "circle", "a@x", 1),
        ann("s1", 2, "circle", "b@x", 2),
        ann("s1", 3, "square", "c@x", 3),
        # a tie: one each, the later answer wins
        ann("s2", 4, "star", "a@x", 1),
        ann("s2", 5, "square", "b@x", 9),
        # one annotator answering twice counts once, with their latest answer
        ann("s3", 6, "star", "a@x", 1),
        ann("s3", 7, "circle", "a@x", 2),
        ann("s3", 8, "star", "b@x", 3),
    ]
    res = resolve(rows, CLASSES)
    assert res.labels["s1"].label == "circle" and abs(res.labels["s1"].agreement - 2 / 3) < 1e-12
    assert res.labels["s2"].label == "square" and res.labels["s2"].agreement == 0.5
    assert res.labels["s3"].annotators == 2  # a counts once: their latest (circle) ties b's star ...
    assert res.labels["s3"].label == "star"  # ... and the later of the two wins
    counts = round_counts(res, ["s1", "s2", "s3"])
    assert counts.multi_annotated == 3


def test_a_label_that_is_not_a_class_is_quarantined_with_the_reason(tmp_path: Path) -> None:
    rows = [ann("s1", 1, "hexagon"), ann("s2", 2, "circle"), ann("s2", 3, "blob", "b@x")]
    res = resolve(rows, CLASSES)
    assert "s1" not in res.labels and res.labels["s2"].label == "circle"
    assert {(q.sample_id, q.label) for q in res.quarantined} == {("s1", "hexagon"), ("s2", "blob")}
    assert "'hexagon' is not one of the classes" in res.quarantined[0].reason
    assert write_quarantine(str(tmp_path), res.quarantined) == 2
    assert write_quarantine(str(tmp_path), res.quarantined) == 0  # recorded once
    assert round_counts(res, ["s1", "s2"]).quarantined == 1


def test_a_deleted_annotation_leaves_a_tombstone_and_stops_counting(tmp_path: Path) -> None:
    append(str(tmp_path), [ann("s1", 1, "circle"), ann("s2", 2, "star")], T0)
    new = changes(read_rows(str(tmp_path)), [ann("s2", 2, "star")], {"s1", "s2"})
    assert [(a.sample_id, a.deleted) for a in new] == [("s1", True)]
    append(str(tmp_path), new, T0)
    res = resolve(read_rows(str(tmp_path)), CLASSES)
    assert set(res.labels) == {"s2"} and "s1" not in res.answered
    # an annotation outside the fetched scope is never tombstoned
    assert changes(read_rows(str(tmp_path)), [], {"s9"}) == []


def test_the_snapshot_and_its_digest_depend_on_the_labels_only() -> None:
    a = resolve([ann("s2", 2, "star"), ann("s1", 1, "circle")], CLASSES)
    b = resolve([ann("s1", 7, "circle", "z@x", 30), ann("s2", 8, "star", "z@x", 40)], CLASSES)
    assert a.digest() == b.digest()
    assert labels_table(a).column("sample_id").to_pylist() == ["s1", "s2"]
    c = resolve([ann("s1", 1, "square"), ann("s2", 2, "star")], CLASSES)
    assert c.digest() != a.digest()


def test_the_tables_columns_are_the_fields_of_their_records(tmp_path: Path) -> None:
    assert set(SCHEMA.names) == {f.name for f in fields(Annotation)} | {"collected_at"}
    assert QUARANTINE_SCHEMA.names == [f.name for f in fields(Quarantined)]
    edited = replace(ann("s1", 1, "circle", minutes=3), task_id=None, round=2)
    append(str(tmp_path), [edited], T0)
    assert read_rows(str(tmp_path)) == [edited]  # every field back as it went in (a missing task id too)
    [tombstone] = changes([edited], [], {"s1"})
    assert tombstone == replace(edited, label=None, deleted=True)
