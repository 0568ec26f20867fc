"""Answers coming back from the REAL Label Studio of the test session: skips, edits, several annotators, and
the ground-truth bot. Answers are made by `BotAnnotator`, a signed-up user calling the UI's own API."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import datetime, timezone

import pytest

from connectors.annotator_bot import AnswerCounts, BotAnnotator, answer_open_tasks
from connectors.label_studio import LabelStudioClient, Project, TaskInput, inline_image

CLASSES = ["cat", "dog", "bird"]
PIXEL = inline_image(b"\x89PNG\r\n\x1a\n")


def _project(client: LabelStudioClient, kind: str, n: int, round: int = 1) -> tuple[Project, dict[str, int]]:
    project = client.ensure_project(f"{kind} {uuid.uuid4().hex[:8]}", CLASSES)
    client.import_tasks(project, [TaskInput(f"s{i:03d}", PIXEL, round=round) for i in range(n)])
    return project, client.task_ids(project)


def _bot(client: LabelStudioClient, who: str) -> BotAnnotator:
    return BotAnnotator.create(client, f"{who}-{uuid.uuid4().hex[:6]}@example.com")


@pytest.mark.services
def test_every_annotation_comes_back_skips_edits_and_two_annotators(
    label_studio_client: LabelStudioClient,
) -> None:
    project, ids = _project(label_studio_client, "annotations", 4)
    alice, bob = _bot(label_studio_client, "alice"), _bot(label_studio_client, "bob")
    first = alice.annotate(ids["s000"], "cat", lead_time=3.5)
    second = bob.annotate(ids["s000"], "dog")  # two annotators on one task
    skipped = bob.skip(ids["s001"])
    edited = alice.annotate(ids["s002"], "cat")
    midway = datetime.now(timezone.utc)
    alice.update(edited, "bird")  # changed after submission, as the Update button does

    records = {r.annotation_id: r for r in label_studio_client.annotations(project)}
    assert sorted(records) == sorted([first, second, skipped, edited])
    assert {(r.annotator, r.label) for r in records.values() if r.task_id == ids["s000"]} == {
        (alice.email, "cat"),
        (bob.email, "dog"),
    }
    assert records[first].lead_time == 3.5 and records[first].round == 1
    skip = records[skipped]
    assert skip.cancelled and skip.label is None and skip.sample_id == "s001" and skip.annotator == bob.email
    edit = records[edited]
    assert edit.label == "bird" and not edit.cancelled
    assert edit.created_at < midway < edit.updated_at and edit.edited
    assert all(r.updated_at.tzinfo == timezone.utc for r in records.values())

    # `labels` is the submitted answers only, and an edit counts as saved again.
    assert {(r.sample_id, r.label, r.annotator) for r in label_studio_client.labels(project)} == {
        ("s000", "cat", alice.email),
        ("s000", "dog", bob.email),
        ("s002", "bird", alice.email),
    }
    (late,) = label_studio_client.labels(project, since=midway)
    assert (late.annotation_id, late.label, late.time) == (edited, "bird", edit.updated_at)

    # Selected tasks only; a task without answers yields nothing.
    picked = label_studio_client.annotations(project, task_ids=[ids["s001"], ids["s003"]])
    assert [r.annotation_id for r in picked] == [skipped]
    assert label_studio_client.annotations(project, task_ids=[]) == []


@pytest.mark.services
def test_annotations_of_one_round_across_many_pages(label_studio_client: LabelStudioClient) -> None:
    project = label_studio_client.ensure_project(f"pages {uuid.uuid4().hex[:8]}", CLASSES)
    tasks = [TaskInput(f"s{i:04d}", PIXEL, round=1 + i % 2) for i in range(1200)]
    label_studio_client.import_tasks(project, tasks)
    ids = label_studio_client.task_ids(project)
    bot = _bot(label_studio_client, "pager")
    answered = ["s0000", "s0001", "s0598", "s0599", "s1198", "s1199"]  # first, middle and last pages
    made = {bot.annotate(ids[sid], "cat"): sid for sid in answered}
    assert len(ids) == 1200
    assert {r.annotation_id: r.sample_id for r in label_studio_client.annotations(project)} == made
    assert sorted(r.sample_id for r in label_studio_client.annotations(project, round=2)) == [
        "s0001",
        "s0599",
        "s1199",
    ]
    chosen = [ids[sid] for sid in answered[2:]] + [ids["s0300"]]
    got = label_studio_client.annotations(project, task_ids=chosen)
    assert [r.sample_id for r in got] == answered[2:]


@pytest.mark.services
def test_bot_answers_open_tasks_from_ground_truth_once_and_deterministically(
    label_studio_client: LabelStudioClient,
) -> None:
    truth = {f"s{i:03d}": CLASSES[i % 3] for i in range(30)}
    project, ids = _project(label_studio_client, "ground truth", 31)  # s030 has no ground truth
    bot = _bot(label_studio_client, "truth")
    other = _bot(label_studio_client, "other")
    other.annotate(ids["s000"], "dog")  # labelled by someone else: not open

    first = answer_open_tasks(bot, label_studio_client, project, truth, noise=0.3, skip=0.2, seed=7, limit=10)
    assert first.answered + first.skipped == 10
    rest = answer_open_tasks(bot, label_studio_client, project, truth, noise=0.3, skip=0.2, seed=7)
    assert first.answered + first.skipped + rest.answered + rest.skipped == 29 and rest.missing == 1
    assert answer_open_tasks(bot, label_studio_client, project, truth, noise=0.3, seed=7) == AnswerCounts(
        answered=0, skipped=0, wrong=0, missing=1
    )

    mine = [r for r in label_studio_client.annotations(project) if r.annotator == bot.email]
    assert sorted(Counter(r.task_id for r in mine).values()) == [1] * 29  # never a task twice
    assert ids["s000"] not in {r.task_id for r in mine}
    assert sum(r.cancelled for r in mine) == first.skipped + rest.skipped
    wrong = [r for r in mine if not r.cancelled and r.label != truth[r.sample_id]]
    assert len(wrong) == first.wrong + rest.wrong
    assert all(r.label in CLASSES for r in wrong)
    assert 0 < len(wrong) < first.answered + rest.answered  # noise 0.3, skip 0.2: both happen with seed 7

    # The same seed gives every sample the same answer in another project, whatever the order of work.
    again, _ = _project(label_studio_client, "ground truth again", 31)
    twin = _bot(label_studio_client, "twin")
    answer_open_tasks(twin, label_studio_client, again, truth, noise=0.3, skip=0.2, seed=7)
    answers = {r.sample_id: (r.cancelled, r.label) for r in mine}
    twins = {r.sample_id: (r.cancelled, r.label) for r in label_studio_client.annotations(again)}
    assert {sid: twins[sid] for sid in answers} == answers


def test_bot_rejects_bad_options_and_unknown_labels() -> None:
    client = LabelStudioClient("http://127.0.0.1:9", "never-sent")  # validation happens before any request
    project = Project(id=1, title="nothing sent", classes=tuple(CLASSES))
    bot = BotAnnotator(client.url, "nobody@example.com")
    with pytest.raises(ValueError, match="probabilities"):
        answer_open_tasks(bot, client, project, {}, noise=1.5)
    with pytest.raises(ValueError, match=r"\['horse'\] are not classes of project 'nothing sent'"):
        answer_open_tasks(bot, client, project, {"s1": "horse"})
