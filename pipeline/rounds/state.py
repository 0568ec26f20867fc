"""Where a campaign stands: the records of `state.json`, the one file every transition writes last.

A round moves `selected -> pushed -> collecting -> trained -> updated`; its outputs (picks, labels, weights,
posterior, metrics) are written atomically BEFORE the state that points at them, so a crash at any point
leaves either the old state (the transition is redone from its inputs, which are deterministic) or the
new one. Where each file lives is `layout.py`'s.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any

from pipeline.io import storage
from pipeline.rounds.labels import LabelCounts
from pipeline.rounds.layout import CONFIG_FILE as CONFIG_FILE  # re-exported: its old home
from pipeline.rounds.layout import STATE_FILE, CampaignDir

FORMAT = "bayescurate.campaign/1"


class RoundState(str, Enum):
    """How far a round has come."""

    SELECTED = "selected"
    """Its picks are chosen and written (`picks.parquet`)."""
    PUSHED = "pushed"
    """Its tasks exist at the label source."""
    COLLECTING = "collecting"
    """Answers are being collected; the round waits for `min_answered` of its tasks."""
    TRAINED = "trained"
    """The image projection was re-fitted on all labels so far (`projection.safetensors`)."""
    UPDATED = "updated"
    """The posterior was updated at the new MAP and the round evaluated: the round is complete."""


ORDER = list(RoundState)


@dataclass(frozen=True)
class SelectionCounts:
    """What choosing a round's picks saw, and what pushing them created."""

    tasks: int = 0  # the picks, a task each
    candidates: int = 0  # pool rows scored
    pool_left: int = 0  # pool rows no earlier round had picked
    created: int | None = None  # tasks the push created at the label source (None: not pushed yet)

    def to_json(self) -> dict[str, int]:
        out = {"tasks": self.tasks, "candidates": self.candidates, "pool_left": self.pool_left}
        return out if self.created is None else {**out, "created": self.created}


@dataclass(frozen=True)
class RoundCounts:
    """A round's counts: its selection's, and its tasks' answers once collected. In `state.json` (and in
    `status --json`'s `labels`) they are one flat object, as every version so far has written them."""

    selection: SelectionCounts = field(default_factory=SelectionCounts)
    labels: LabelCounts | None = None  # None until the round's first collection

    @property
    def answered(self) -> int:
        """Tasks answered (labelled, skipped or quarantined) at the last collection."""
        return 0 if self.labels is None else self.labels.answered

    def to_json(self) -> dict[str, int | float]:
        # the labels' `tasks` (the round's distinct picks) equals the selection's: the flat object has one
        return {**self.selection.to_json(), **({} if self.labels is None else asdict(self.labels))}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundCounts:
        selection = SelectionCounts(
            tasks=int(data.get("tasks", 0)),
            candidates=int(data.get("candidates", 0)),
            pool_left=int(data.get("pool_left", 0)),
            created=None if data.get("created") is None else int(data["created"]),
        )
        if "answered" not in data:  # not collected yet
            return cls(selection)
        return cls(selection, LabelCounts(**{f.name: data[f.name] for f in fields(LabelCounts)}))


@dataclass(frozen=True)
class Round:
    """One round's record in `state.json`."""

    index: int
    state: RoundState
    posterior_id: str  # the posterior the round selected with
    picked: int = 0  # samples the round picked (`picks` in state.json)
    seed: int = 0
    mlflow_run_id: str | None = None
    counts: RoundCounts = field(default_factory=RoundCounts)
    labels_used: int = 0  # labels the round's re-fit learned from (all rounds so far)
    new_posterior_id: str | None = None  # the posterior after the round's update
    metrics: dict[str, Any] = field(default_factory=dict)  # evaluation after the update
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    train: dict[str, Any] = field(default_factory=dict)  # re-fit summary

    def at_least(self, state: RoundState) -> bool:
        return ORDER.index(self.state) >= ORDER.index(state)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        out["counts"] = self.counts.to_json()
        return {("picks" if k == "picked" else k): v for k, v in out.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Round:
        values = {("picked" if k == "picks" else k): v for k, v in data.items()}
        return cls(
            **{
                **values,
                "state": RoundState(data["state"]),
                "counts": RoundCounts.from_json(data.get("counts") or {}),
            }
        )


@dataclass(frozen=True)
class CampaignState:
    """All rounds so far, the MLflow parent run and the baseline metrics (before any label)."""

    rounds: tuple[Round, ...] = ()
    mlflow_run_id: str | None = None
    baseline: dict[str, Any] = field(default_factory=dict)
    updated: str = ""

    @property
    def current(self) -> Round | None:
        return self.rounds[-1] if self.rounds else None

    @property
    def completed(self) -> int:
        """Rounds that reached `updated`."""
        return sum(1 for r in self.rounds if r.state is RoundState.UPDATED)

    def with_round(self, round_: Round) -> CampaignState:
        """This state with `round_` replacing the round of its index (or appended as the next one)."""
        rounds = list(self.rounds)
        if round_.index < len(rounds):
            rounds[round_.index] = round_
        elif round_.index == len(rounds):
            rounds.append(round_)
        else:
            raise ValueError(f"round {round_.index} cannot follow {len(rounds)} rounds")
        return replace(self, rounds=tuple(rounds))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "rounds": [r.to_json() for r in self.rounds],
            "mlflow_run_id": self.mlflow_run_id,
            "baseline": self.baseline,
            "updated": self.updated,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CampaignState:
        if data.get("format") != FORMAT:
            raise ValueError(f"campaign state has format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(
            rounds=tuple(Round.from_json(r) for r in data.get("rounds", [])),
            mlflow_run_id=data.get("mlflow_run_id"),
            baseline=dict(data.get("baseline") or {}),
            updated=str(data.get("updated", "")),
        )


_RESTORE = (
    "every transition writes its outputs before state.json, so a copy of state.json from a backup (or an "
    "earlier version of the object) resumes the campaign from where that copy stood; without one, start "
    "again in a new directory with `campaign init`"
)


def read_state(directory: str) -> CampaignState:
    path = CampaignDir(directory).state
    if not storage.is_file(path):
        raise FileNotFoundError(
            f"{directory!r} is not a campaign directory (no {STATE_FILE}); create it with `campaign init`"
        )
    try:
        data = json.loads(storage.read_text(path))
    except ValueError as exc:  # not JSON (truncated, edited), or not text
        raise ValueError(f"the campaign state {path!r} is damaged ({exc}): {_RESTORE}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"the campaign state {path!r} has format {found!r}, expected {FORMAT!r}")
    try:
        return CampaignState.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:  # a record with a key missing, unknown or mistyped
        raise ValueError(
            f"the campaign state {path!r} is damaged ({type(exc).__name__}: {exc}): {_RESTORE}"
        ) from None


def write_state(directory: str, state: CampaignState) -> CampaignState:
    """Write `state` (atomically; the last write of every transition) and return it as written."""
    state = replace(state, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    storage.write_json(CampaignDir(directory).state, state.to_json())
    return state
