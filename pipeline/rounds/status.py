"""What `campaign status` reports: where a campaign stands, read without the lease, as typed records.

`CampaignStatus.to_json()` is the `status --json` contract that scripts and external checks read: its keys
and structure are those every version so far has printed (a round's counts, selection and labels alike,
under `labels`; its step timings under `seconds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.rounds import lease, review
from pipeline.rounds.config import LabelSource
from pipeline.rounds.layout import CampaignDir, project_name
from pipeline.rounds.state import Round, RoundCounts, RoundState, read_state
from pipeline.rounds.tracking import CampaignTracker
from pipeline.selection import Acquisition

REPORTED = ("accuracy", "nll", "ece", "brier")  # of a round's MAP and Bayes metrics


@dataclass(frozen=True)
class RoundStatus:
    """One round as `campaign status` shows it."""

    index: int
    state: RoundState
    posterior_id: str  # the posterior the round selected with
    new_posterior_id: str | None  # the posterior after its update
    picked: int  # samples it picked
    counts: RoundCounts
    labels_used: int  # labels its re-fit learned from (all rounds so far)
    metrics: dict[str, Any]  # {"MAP": {accuracy, nll, ece, brier}, "Bayes": {...}, "domains": {...}}
    seconds: dict[str, float]  # per step

    @classmethod
    def of(cls, r: Round) -> RoundStatus:
        metrics: dict[str, Any] = {
            name: {k: r.metrics[name][k] for k in REPORTED if k in r.metrics[name]}
            for name in ("MAP", "Bayes")
            if name in r.metrics
        }
        if "domains" in r.metrics:
            metrics["domains"] = r.metrics["domains"]
        return cls(
            index=r.index,
            state=r.state,
            posterior_id=r.posterior_id,
            new_posterior_id=r.new_posterior_id,
            picked=r.picked,
            counts=r.counts,
            labels_used=r.labels_used,
            metrics=metrics,
            seconds=r.timings,
        )

    def to_json(self) -> dict[str, Any]:
        counts = self.counts.to_json()
        return {
            "round": self.index,
            "state": self.state.value,
            "posterior_id": self.posterior_id,
            "new_posterior_id": self.new_posterior_id,
            "picks": self.picked,
            "labels": {k: counts[k] for k in sorted(counts)},
            "labels_used": self.labels_used,
            "metrics": self.metrics,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class CampaignStatus:
    """Where a campaign stands: its settings, rounds, baseline, what it waits for and who steps it."""

    directory: str
    label_source: LabelSource
    method: Acquisition
    budget: int  # picks a round
    min_answered: float  # share of a round's tasks answered for it to train
    max_rounds: int | None
    rounds_completed: int
    rounds: tuple[RoundStatus, ...]
    baseline: dict[str, Any]  # the evaluation before any label
    waiting: str | None  # what the current round waits for, if anything
    lease: dict[str, Any] | None  # who steps it now (`lease.holder`)
    mlflow: str | None  # the campaign's MLflow URL (tracking on)
    updated: str  # when state.json was written (UTC)
    worst_round: int | None  # the latest evaluated round (None: the classes are the baseline's)
    worst_classes: list[dict[str, Any]]  # lowest Bayes recall then (`review.worst_classes`)

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "label_source": self.label_source.value,
            "method": self.method.value,
            "budget": self.budget,
            "min_answered": self.min_answered,
            "max_rounds": self.max_rounds,
            "rounds_completed": self.rounds_completed,
            "rounds": [r.to_json() for r in self.rounds],
            "baseline": self.baseline,
            "waiting": self.waiting,
            "lease": self.lease,
            "mlflow": self.mlflow,
            "updated": self.updated,
            # The classes with the lowest Bayes recall on the evaluation set after the latest evaluated round
            # (None: before any round), with their recall at the start.
            "worst_classes": {"round": self.worst_round, "classes": self.worst_classes},
        }


def status(directory: str) -> CampaignStatus:
    """Where the campaign stands (read-only, no lease): per round its state, counts and metrics."""
    where = CampaignDir(directory)
    cfg = where.read_config()
    state = read_state(directory)
    current = state.current
    waiting = None
    if current is not None and current.state in (RoundState.PUSHED, RoundState.COLLECTING):
        tasks = current.counts.selection.tasks
        waiting = (
            f"round {current.index}: {current.counts.answered} of {tasks} tasks answered at the last step "
            f"(trains at {math.ceil(cfg.min_answered * tasks - 1e-9)})"
        )
    elif current is not None and current.state is RoundState.SELECTED:
        waiting = f"round {current.index}: picks chosen, tasks not pushed yet (the next step pushes them)"
    tracker = CampaignTracker(cfg, project_name(cfg, directory)) if cfg.tracking else None
    latest = next((r for r in reversed(state.rounds) if r.metrics.get("classes")), None)
    return CampaignStatus(
        directory=directory,
        label_source=cfg.label_source,
        method=cfg.selection.method,
        budget=cfg.selection.budget,
        min_answered=cfg.min_answered,
        max_rounds=cfg.max_rounds,
        rounds_completed=state.completed,
        rounds=tuple(RoundStatus.of(r) for r in state.rounds),
        baseline=state.baseline,
        waiting=waiting,
        lease=lease.holder(directory),
        mlflow=tracker.url() if tracker else None,
        updated=state.updated,
        worst_round=latest.index if latest else None,
        worst_classes=review.worst_classes(latest.metrics if latest else state.baseline, state.baseline),
    )
