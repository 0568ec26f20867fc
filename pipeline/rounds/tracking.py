"""MLflow for a campaign: one parent run, one nested run per round, the active-learning curve on the parent.

Runs are found by name before they are created, so a step resumed after a crash logs to the same runs.
A round's run is opened when its picks are chosen (its URL goes onto every task) and finished when the
round is updated, with its parameters, picks table and contact sheet (`picks.png`: logged at the push, and
again with the answers once they are back), label counts and agreement, step timings, evaluation metrics
(MAP and Bayes, per domain, per class), reliability diagram, per-class accuracy and posterior directory. The
parent run holds the curves against labels, per class too, and the table of classes that have not moved.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pipeline.io import storage
from pipeline.plots import curves_png, panels_png, shares_png
from pipeline.rounds import review
from pipeline.rounds.config import CampaignConfig
from pipeline.rounds.layout import RoundFiles
from pipeline.rounds.state import CampaignState, Round

_UNSAFE = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in a metric name (class names may have them)


def _flat(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        name = prefix + _UNSAFE.sub("_", str(key))
        if isinstance(value, dict):
            out |= _flat(f"{name}.", value)
        elif isinstance(value, int | float) and value == value:
            out[name] = float(value)
    return out


class CampaignTracker:
    """The campaign's MLflow runs (a no-op when tracking is off)."""

    def __init__(self, cfg: CampaignConfig, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self.tracker = cfg.tracker() if cfg.tracking else None

    @property
    def enabled(self) -> bool:
        return self.tracker is not None

    def parent(self) -> str | None:
        """Id of the campaign's run (created on first use)."""
        if self.tracker is None:
            return None
        # the token file's location is no secret, but its name looks like one (and would be dropped noisily)
        skip = {"tracking", "tracking_uri", "experiment", "label_studio_token_file"}
        params = self.cfg.model_dump(mode="json", exclude=skip)
        run = self.tracker.open_run(
            f"campaign: {self.name}", params=params, tags={"bayescurate.kind": "campaign"}
        )
        return run.run_id

    def finish_campaign(self, parent: str | None) -> None:
        """Mark the campaign's run finished (its rounds are done); a later round re-opens it."""
        if self.tracker is not None and parent is not None:
            self.tracker.finish(parent)

    def round_run(self, parent: str | None, index: int, params: dict[str, Any]) -> str | None:
        if self.tracker is None:
            return None
        run = self.tracker.open_run(
            f"round-{index:03d}",
            params=params,
            tags={"bayescurate.kind": "round", "bayescurate.round": index},
            parent=parent,
        )
        return run.run_id

    def url(self, run_id: str | None = None) -> str | None:
        return None if self.tracker is None else self.tracker.ui_url(run_id)

    def log_picks(self, run_id: str | None, sheet: bytes) -> None:
        """The round's contact sheet (`review.picks_sheet`), replacing an earlier one."""
        if self.tracker is None or run_id is None:
            return
        from connectors.tracking import Run

        Run(self.tracker.client, run_id).log_bytes(sheet, "picks.png")

    def log_round(
        self,
        run_id: str | None,
        round_: Round,
        files: RoundFiles,
        reliability: bytes | None,
        sheet: bytes | None = None,
    ) -> None:
        """Everything a finished round shows in MLflow (`sheet`: the picks with their answers); then the run
        is finished."""
        if self.tracker is None or run_id is None:
            return
        from connectors.tracking import Run

        run = Run(self.tracker.client, run_id)
        step = round_.index
        run.log_metrics(_flat("labels.", round_.counts.to_json()), step=step)  # selection and labels
        run.log_metrics({"labels.used": float(round_.labels_used)}, step=step)
        run.log_metrics(_flat("seconds.", round_.timings), step=step)
        run.log_metrics(_flat("eval.", round_.metrics), step=step)
        run.log_metrics(_flat("train.", {k: v for k, v in round_.train.items() if k != "history"}), step=step)
        run.set_tags({"bayescurate.new_posterior_id": round_.new_posterior_id or ""})
        run.log_dict({"picks": files.read_picks()}, "picks.json")
        run.log_dict(round_.to_json(), "round.json")
        if reliability is not None:
            run.log_bytes(reliability, "reliability.png")
        if sheet is not None:
            run.log_bytes(sheet, "picks.png")
        classes = round_.metrics.get("classes") or {}
        if classes:
            recall = {name: {c: m[name] for c, m in classes.items()} for name in ("MAP", "Bayes")}
            title = f"{self.name}, round {round_.index}: accuracy per class ({round_.labels_used} labels)"
            run.log_bytes(shares_png(recall, title=title, ylabel="recall"), "per_class.png")
        for path in storage.list_files(files.posterior):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            run.log_bytes(storage.read_bytes(path), f"posterior/{name}")
        self.tracker.finish(run_id)

    def log_curve(
        self, parent: str | None, state: CampaignState, labels: Mapping[str, int] | None = None
    ) -> None:
        """The active-learning curve on the campaign's run: metrics against labels, a point per round; the
        same per class, and the classes that have not moved (`labels`: class -> labels collected so far)."""
        if self.tracker is None or parent is None:
            return
        from connectors.tracking import Run

        points = [(0, state.baseline)] if state.baseline else []
        points += [(r.labels_used, r.metrics) for r in state.rounds if r.metrics]
        if not points:
            return
        run = Run(self.tracker.client, parent)
        x = [float(n) for n, _ in points]
        panels = {}
        for metric in ("accuracy", "nll", "ece"):
            series = {
                name: [float(m.get(name, {}).get(metric, float("nan"))) for _, m in points]
                for name in ("MAP", "Bayes")
            }
            panels[metric] = series
            png = curves_png(
                x,
                series,
                xlabel="labels",
                ylabel=metric,
                title=f"{self.name}: {metric} on the evaluation set",
            )
            run.log_bytes(png, f"curves/{metric}.png")
        chosen = self.cfg.selection
        title = f"{self.name}: evaluation set after each round ({chosen.method.value} x {chosen.budget})"
        run.log_bytes(panels_png(x, panels, xlabel="labels", title=title), "active_learning.png")
        for i, (n, m) in enumerate(points):
            run.log_metrics({**_flat("eval.", m), "labels": float(n)}, step=i)
        run.log_text(json.dumps([{"labels": n, **m} for n, m in points], indent=2), "curve.json")
        metrics = [m for _, m in points]
        if any(m.get("classes") for m in metrics):
            panels = {f"{name} recall": review.series(metrics, name) for name in ("MAP", "Bayes")}
            title = f"{self.name}: accuracy per class on the evaluation set"
            run.log_bytes(panels_png(x, panels, xlabel="labels", title=title), "per_class.png")
            trends = review.class_trends(metrics, labels or {})
            run.log_text(review.not_moved_table(trends), "classes_not_moved.md")
