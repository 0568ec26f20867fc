"""What a reviewer of a campaign looks at first: which images a round asked about and what people answered
(a contact sheet), and which classes the labels leave behind (per-class accuracy against labels).

Per-class accuracy is the recall on the evaluation set (`evaluation.evaluate` puts it under
`metrics["classes"]`); a class "has not moved" when its Bayes recall changed by less than `MOVED` since the
start. Pure functions of tables and metrics, plus the image reads of the sheet; MLflow logging is
`tracking.CampaignTracker`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.data.sources import read_images
from pipeline.reports.contact_sheet import SheetItem, contact_sheet

MOVED = 0.05  # a change of Bayes recall below this (5 points) since the start: the class has not moved
WORST = 3  # classes `campaign status` names
SHEET_COLUMNS = 8


def _images(sources: Sequence[str]) -> dict[str, bytes]:
    """The images that can be read; one that cannot is a grey cell on the sheet, not a failed round."""
    try:
        return read_images(list(sources))
    except ValueError:
        found: dict[str, bytes] = {}
        for source in sources:
            try:
                found.update(read_images([source]))
            except ValueError:
                continue
        return found


def picks_sheet(
    picks: Sequence[Mapping[str, Any]], labels: Mapping[str, str], *, title: str, score_name: str
) -> bytes:
    """PNG contact sheet of a round's picks (rows of `picks.parquet`, in rank order): each with its predicted
    class, confidence and score, and the label people gave when there is one (`labels`: sample_id -> class;
    a label that differs from the prediction frames the cell in red)."""
    images = _images([str(p["source"]) for p in picks if p.get("source")])
    items = [
        SheetItem(
            image=images.get(str(p.get("source") or "")),
            predicted=str(p["predicted"]),
            confidence=float(p["confidence"]),
            score=float(p["score"]),
            rank=int(p["rank"]),
            label=labels.get(str(p["sample_id"])),
        )
        for p in picks
    ]
    return contact_sheet(items, title=title, columns=SHEET_COLUMNS, score_name=score_name)


def sheet_title(
    campaign: str, index: int, picks: Sequence[Mapping[str, Any]], labels: Mapping[str, str]
) -> str:
    """`<campaign>, round R: N picks; K labelled, W predictions wrong` (the second half once labels exist)."""
    title = f"{campaign}, round {index}: {len(picks)} picks"
    given = [(str(p["predicted"]), labels[p["sample_id"]]) for p in picks if p["sample_id"] in labels]
    if given:
        wrong = sum(predicted != label for predicted, label in given)
        title += f"; {len(given)} labelled, {wrong} predictions wrong"
    return title


@dataclass(frozen=True)
class ClassTrend:
    """One class of the evaluation set, from the start to the latest evaluated round."""

    name: str
    n: int  # evaluation images of the class
    labels: int  # labels of the class collected so far
    start: Mapping[str, float]  # recall per predictive ("MAP", "Bayes") before any label
    now: Mapping[str, float]  # the same after the latest round

    @property
    def change(self) -> float:
        """Change of the Bayes recall since the start."""
        return self.now["Bayes"] - self.start["Bayes"]

    @property
    def moved(self) -> bool:
        return abs(self.change) >= MOVED


def class_trends(points: Sequence[Mapping[str, Any]], labels: Mapping[str, int]) -> list[ClassTrend]:
    """Per class, its recall at the first and the last of `points` (evaluation metrics in label order, each
    with a "classes" entry), worst Bayes recall first; `labels`: class -> labels collected so far."""
    points = [m for m in points if m.get("classes")]
    if not points:
        return []
    first, last = points[0]["classes"], points[-1]["classes"]
    trends = [
        ClassTrend(
            name,
            int(now["n"]),
            int(labels.get(name, 0)),
            {k: float(first.get(name, now)[k]) for k in ("MAP", "Bayes")},
            {k: float(now[k]) for k in ("MAP", "Bayes")},
        )
        for name, now in last.items()
    ]
    return sorted(trends, key=lambda t: (t.now["Bayes"], t.name))


def series(points: Sequence[Mapping[str, Any]], predictive: str) -> dict[str, list[float]]:
    """class -> its recall under `predictive` at each point (NaN where a point lacks the class)."""
    names = dict.fromkeys(name for m in points for name in m.get("classes", {}))
    return {
        name: [float(m.get("classes", {}).get(name, {}).get(predictive, math.nan)) for m in points]
        for name in names
    }


def not_moved_table(trends: Sequence[ClassTrend]) -> str:
    """Markdown table of the classes whose Bayes recall moved less than `MOVED` since the start."""
    stuck = [t for t in trends if not t.moved]
    lines = [
        f"Classes whose Bayes recall on the evaluation set moved by less than {MOVED:g} since the start "
        f"({len(stuck)} of {len(trends)}), worst first.",
        "",
        "| class | evaluation images | labels so far | recall MAP start -> now | recall Bayes start -> now |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {t.name} | {t.n} | {t.labels} | {t.start['MAP']:.3f} -> {t.now['MAP']:.3f} "
        f"| {t.start['Bayes']:.3f} -> {t.now['Bayes']:.3f} |"
        for t in stuck
    ]
    return "\n".join(lines) + "\n"


def worst_classes(metrics: Mapping[str, Any], start: Mapping[str, Any] | None, k: int = WORST) -> list[dict]:
    """The `k` classes with the lowest Bayes recall in `metrics`, with their recall at `start` (if known)."""
    classes = metrics.get("classes") or {}
    before = (start or {}).get("classes") or {}
    ranked = sorted(classes.items(), key=lambda item: (item[1]["Bayes"], item[0]))[:k]
    return [
        {
            "class": name,
            "n": int(m["n"]),
            "MAP": float(m["MAP"]),
            "Bayes": float(m["Bayes"]),
            "Bayes_start": float(before[name]["Bayes"]) if name in before else None,
        }
        for name, m in ranked
    ]
