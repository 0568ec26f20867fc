"""What a reviewer sees of a campaign: the round's picks as a contact sheet with the answers, per-class
accuracy against labels and the classes that have not moved; and the same in MLflow and `campaign status`
for a campaign that runs its rounds."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from connectors.services import REPO_ROOT
from jobs import campaign as campaign_cli
from pipeline.reports import contact_sheet as cs
from pipeline.rounds import campaign, review
from tests.fixtures_world import World


def _png_file(path: Path, colour: tuple[int, int, int]) -> str:
    Image.new("RGB", (40, 30), colour).save(path)
    return str(path)


def _pick(sid: str, rank: int, predicted: str, source: str | None) -> dict:
    return {"sample_id": sid, "rank": rank, "score": 0.01 / (rank + 1), "predicted": predicted,
            "confidence": 0.6, "source": source}  # fmt: skip


def test_the_picks_sheet_shows_each_pick_and_marks_the_wrong_predictions(tmp_path: Path) -> None:
    picks = [
        _pick("a", 0, "circle", _png_file(tmp_path / "a.png", (0, 0, 255))),
        _pick("b", 1, "square", _png_file(tmp_path / "b.png", (0, 255, 0))),
        _pick("c", 2, "star", str(tmp_path / "gone.png")),  # unreadable: a grey cell, not a failed round
    ]
    labels = {"a": "circle", "b": "star", "elsewhere": "cross"}
    title = review.sheet_title("shapes", 2, picks, labels)
    assert title == "shapes, round 2: 3 picks; 2 labelled, 1 predictions wrong"
    assert review.sheet_title("shapes", 2, picks, {}) == "shapes, round 2: 3 picks"

    sheet = Image.open(io.BytesIO(review.picks_sheet(picks, labels, title=title, score_name="epig")))
    lay = cs.layout(3, review.SHEET_COLUMNS, 128, title=True, legend=True)
    assert sheet.size == (lay.width, lay.height)
    frame = [sheet.convert("RGB").getpixel((x0, y0)) for x0, y0, _, _ in map(lay.cell, range(3))]
    assert frame == [cs.GREEN, cs.RED, cs.BORDER]  # agrees, differs, not labelled yet
    x0, y0, _, _ = lay.cell(0)
    middle = (x0 + cs.INSET + lay.caption_width // 2, y0 + cs.INSET + lay.thumb // 2)
    assert sheet.convert("RGB").getpixel(middle) == (0, 0, 255)  # the image itself, thumbnailed


def _metrics(recalls: dict[str, tuple[float, float]]) -> dict:
    return {"classes": {c: {"n": 10, "MAP": m, "Bayes": b} for c, (m, b) in recalls.items()}}


def test_classes_that_have_not_moved_are_tabled_and_the_worst_named() -> None:
    start = _metrics({"circle": (0.5, 0.5), "star": (0.05, 0.04), "cross": (0.1, 0.1), "square": (0.3, 0.3)})
    middle = _metrics({"circle": (0.7, 0.7), "star": (0.05, 0.05), "cross": (0.1, 0.2), "square": (0.3, 0.3)})
    end = _metrics({"circle": (0.8, 0.9), "star": (0.06, 0.06), "cross": (0.2, 0.3), "square": (0.3, 0.32)})
    trends = review.class_trends([start, middle, end], {"circle": 7, "star": 1})
    assert [t.name for t in trends] == ["star", "cross", "square", "circle"]  # worst Bayes recall first
    assert [t.name for t in trends if not t.moved] == ["star", "square"]
    assert trends[0].labels == 1 and trends[2].labels == 0
    table = review.not_moved_table(trends)
    assert "(2 of 4)" in table
    assert "| star | 10 | 1 | 0.050 -> 0.060 | 0.040 -> 0.060 |" in table
    assert "circle" not in table and "cross" not in table
    assert review.series([start, end], "Bayes")["circle"] == [0.5, 0.9]

    worst = review.worst_classes(end, start)
    assert [(w["class"], w["Bayes"], w["Bayes_start"]) for w in worst] == [
        ("star", 0.06, 0.04),
        ("cross", 0.3, 0.1),
        ("square", 0.32, 0.3),
    ]
    assert review.worst_classes({}, None) == [] and review.class_trends([{}], {}) == []


@pytest.mark.slow
def test_rounds_log_their_sheets_and_per_class_figures_and_status_names_the_worst_classes(
    campaign_world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = campaign_world.config(max_rounds=2, tracking=True, tracking_uri=uri, experiment="review")
    directory = tmp_path / "camp"
    campaign.init(str(directory), cfg, log=lambda _: None)
    state = campaign.run(str(directory), 2, log=lambda _: None).state
    ml = MlflowClient(uri)

    for r in state.rounds:
        assert set(r.metrics["classes"]) <= set(json.loads(campaign_world.classes.read_text())["classes"])
        assert sum(c["n"] for c in r.metrics["classes"].values()) == r.metrics["n"]
        run = ml.get_run(r.mlflow_run_id)
        for name, c in r.metrics["classes"].items():
            assert run.data.metrics[f"eval.classes.{name}.Bayes"] == pytest.approx(c["Bayes"])
        artifacts = {a.path for a in ml.list_artifacts(r.mlflow_run_id)}
        assert {"picks.png", "per_class.png"} <= artifacts
        path = ml.download_artifacts(r.mlflow_run_id, "picks.png", str(tmp_path / f"r{r.index}"))
        (REPO_ROOT / "out" / "test-artifacts").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, REPO_ROOT / "out" / "test-artifacts" / f"picks-round-{r.index}.png")
        sheet = Image.open(path)
        lay = cs.layout(r.picked, review.SHEET_COLUMNS, 128, title=True, legend=True)
        assert sheet.size == (lay.width, lay.height)  # every pick, and the legend of the answers
        # The oracle answered every pick: each cell is framed green or red, none is still unanswered.
        rgb = sheet.convert("RGB")
        frames = {rgb.getpixel((x0 + 1, y0 + 1)) for x0, y0, _, _ in map(lay.cell, range(r.picked))}
        assert frames <= {cs.GREEN, cs.RED}

    parent = {a.path for a in ml.list_artifacts(state.mlflow_run_id)}
    assert {"per_class.png", "classes_not_moved.md", "active_learning.png"} <= parent
    table = Path(ml.download_artifacts(state.mlflow_run_id, "classes_not_moved.md", str(tmp_path)))
    assert table.read_text().startswith(
        "Classes whose Bayes recall on the evaluation set moved by less than 0.05"
    )

    assert campaign_cli.main(["status", str(directory), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    worst = report["worst_classes"]
    assert worst["round"] == 1 and len(worst["classes"]) == review.WORST
    recalls = sorted(c["Bayes"] for c in state.rounds[1].metrics["classes"].values())
    assert [c["Bayes"] for c in worst["classes"]] == recalls[: review.WORST]
    assert campaign_cli.main(["status", str(directory)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("worst classes"))
    name = worst["classes"][0]["class"]
    assert line.startswith(f"worst classes, Bayes recall on the evaluation set after round 1: {name} ")
