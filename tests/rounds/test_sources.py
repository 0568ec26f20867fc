"""Label sources without a server: the oracle answers from its truth table, Label Studio's answers become
`Annotation`s (a fake client stands in for the server), and a campaign config names its source."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.label_studio import AnnotationRecord, Project
from pipeline.annotation import TaskRow
from pipeline.rounds.config import CampaignConfig
from pipeline.rounds.labels import Annotation
from pipeline.rounds.sources import EPOCH, LabelStudioSource, OracleSource, make_source
from pipeline.rounds.webhook import SECRET_HEADER

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def _truth(folder: Path, rows: dict[str, str | None], column: str = "shape", name: str = "part-0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"sample_id": list(rows), column: list(rows.values())})
    pq.write_table(table, folder / f"{name}.parquet")
    return folder


def _task(sample_id: str) -> TaskRow:
    return TaskRow(sample_id, round=0, rank=0, predicted="circle", confidence=0.5, scores={"epig": 0.1})


def test_the_oracle_answers_the_samples_asked_for_from_every_truth_file(tmp_path: Path) -> None:
    truth = _truth(tmp_path / "truth", {"a": "circle", "b": "square"})
    _truth(truth, {"c": "star", "unlabelled": None}, name="part-1")
    _truth(truth / "quarantine", {"q": "cross"})  # quarantined files are not the world's labels
    oracle = OracleSource(str(truth), "shape")
    oracle.check()

    assert oracle.push([_task("c"), _task("a")], {}, model_version="m") == {"created": 2, "skipped": 0}
    answers = oracle.fetch({"c": 1, "a": 0, "unlabelled": 0, "q": 0, "elsewhere": 2})
    assert answers == [
        Annotation("a", "oracle:a", "oracle", "circle", False, EPOCH, EPOCH, 0),
        Annotation("c", "oracle:c", "oracle", "star", False, EPOCH, EPOCH, 1),
    ]  # sorted by sample id; samples without a truth label get no answer
    assert oracle.url() is None and oracle.name == "oracle"


def test_the_oracle_refuses_picks_it_cannot_answer_and_truth_without_the_column(tmp_path: Path) -> None:
    oracle = OracleSource(str(_truth(tmp_path / "truth", {"a": "circle"})), "shape")
    with pytest.raises(ValueError, match=r"no label for 2 picks: \['b', 'unlabelled'\]"):
        oracle.push([_task("a"), _task("b"), _task("unlabelled")], {}, model_version="m")
    with pytest.raises(
        ValueError, match=r"needs columns 'sample_id' and 'colour'; it has \['sample_id', 'shape'\]"
    ):
        OracleSource(str(tmp_path / "truth"), "colour").check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Parquet files under the oracle's truth"):
        OracleSource(str(tmp_path / "empty"), "shape").check()


@dataclass
class FakeClient:
    """What `LabelStudioSource` calls on a `LabelStudioClient`, answered from memory."""

    records: list[AnnotationRecord]
    url: str = "http://ls.test"
    projects: list[tuple[str, list[str]]] = field(default_factory=list)
    webhooks: list[tuple[int, str, dict[str, str]]] = field(default_factory=list)

    def ensure_project(self, name: str, classes: list[str]) -> Project:
        self.projects.append((name, classes))
        return Project(id=7, title=name, classes=tuple(classes))

    def annotations(self, project: Project) -> list[AnnotationRecord]:
        assert project.id == 7
        return self.records

    def ensure_webhook(self, project: Project, url: str, *, headers: dict[str, str]) -> int:
        self.webhooks.append((project.id, url, headers))
        return 3


@dataclass
class FakeTarget:
    """A resolved Label Studio server (`connectors.label_studio_access.resolve`)."""

    fake: FakeClient
    image_root: str | None = None
    retry_for: list[float] = field(default_factory=list)

    def client(self, *, retry_for: float) -> FakeClient:
        self.retry_for.append(retry_for)
        return self.fake


def _record(sample_id: str, annotation_id: int, label: str | None, round_: int | None) -> AnnotationRecord:
    return AnnotationRecord(
        sample_id=sample_id, task_id=100 + annotation_id, annotation_id=annotation_id, annotator="ann@x.org",
        label=label, cancelled=label is None, created_at=T0, updated_at=T0, round=round_, lead_time=None,
    )  # fmt: skip


def test_label_studio_answers_become_annotations_of_the_samples_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = FakeClient(
        [_record("a", 1, "circle", 0), _record("b", 2, None, None), _record("z", 3, "star", 4)]
    )
    target = FakeTarget(client)
    resolved: list[tuple[Any, ...]] = []

    def resolve(url: str | None, token_file: str | None, state_dir: str | None) -> FakeTarget:
        resolved.append((url, token_file, state_dir))
        return target

    monkeypatch.setattr("connectors.label_studio_access.resolve", resolve)
    source = LabelStudioSource(
        "camp",
        ["circle", "square"],
        "state",
        retry_for=5.0,
        label_studio_url="http://ls.test",
        token_file="t",
    )
    answers = source.fetch({"a": 0, "b": 3})
    assert answers == [
        Annotation("a", "ls:1", "ann@x.org", "circle", False, T0, T0, 0, task_id=101),
        Annotation(
            "b", "ls:2", "ann@x.org", None, True, T0, T0, 3, task_id=102
        ),  # no round on the task: ours
    ]  # "z" was not asked for
    assert resolved == [("http://ls.test", "t", "state")] and target.retry_for == [5.0]
    assert client.projects == [("camp", ["circle", "square"])]  # created once, with the campaign's classes
    assert source.url() == "http://ls.test/projects/7/data"  # no push yet: no tab
    assert source.register_webhook("http://me:8000/webhook", "s" * 32) == 3
    assert client.webhooks == [(7, "http://me:8000/webhook", {SECRET_HEADER: "s" * 32})]


def _config(**fields: object) -> CampaignConfig:
    base = {"pool": "p", "classes": "c.json", "posterior": "post"}
    return CampaignConfig.model_validate(base | fields)


def test_a_campaign_config_names_its_source() -> None:
    oracle = make_source(_config(label_source="oracle", truth="truth/"), ["a"], "d/camp", "shape")
    assert isinstance(oracle, OracleSource) and (oracle.truth, oracle.column) == ("truth/", "shape")
    own_column = _config(label_source="oracle", truth="truth/", truth_label_column="colour")
    assert make_source(own_column, ["a"], "d/camp", "shape").column == "colour"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="the oracle needs `truth_label_column`"):
        make_source(_config(label_source="oracle", truth="truth/"), ["a"], "d/camp", None)

    cfg = _config(
        state_dir="s", inline_max_bytes=9, label_studio_retry_s=3.0, image_root="/root",
        image_store="s3://b/p/", label_studio_url="http://ls", label_studio_token_file="tok",
    )  # fmt: skip
    ls = make_source(cfg, ["a", "b"], "runs/camp-1", None)  # the project is named after the directory
    assert ls == LabelStudioSource(
        "camp-1", ["a", "b"], "s", 9, retry_for=3.0, image_root="/root", image_store="s3://b/p/",
        label_studio_url="http://ls", token_file="tok",
    )  # fmt: skip
    assert make_source(_config(project="mine"), ["a"], "runs/camp-1", None).project == "mine"  # type: ignore[attr-defined]
