"""Where a campaign stands: `state.json`, the one file every transition writes last.

A round moves `selected -> pushed -> collecting -> trained -> updated`; its outputs (picks, labels, weights,
posterior, metrics) are written atomically BEFORE the state that points at them, so a crash at any point
leaves either the old state (the transition is redone from its inputs, which are deterministic) or the
new one. The campaign directory layout:

    campaign.yaml                  the CampaignConfig (written by `campaign init`)
    state.json                     this state (written last at every transition)
    lease                          who is stepping right now
    cache/model.safetensors        class text activations and the starting projections (steps load no model)
    labels/part-NNNNNN.parquet     the append-only labels table: one row per annotation version seen
    labels/quarantine/...          answers that are not a class, with the reason
    rounds/RRR/picks.parquet       the round's picks; push.json, labels.parquet (the labels it trained on),
    rounds/RRR/projection.safetensors, train.json, posterior/ (the updated posterior), metrics.json
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from pipeline.io import storage

FORMAT = "bayescurate.campaign/1"
STATE_FILE = "state.json"
CONFIG_FILE = "campaign.yaml"


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
class Round:
    """One round's record in `state.json`."""

    index: int
    state: RoundState
    posterior_id: str  # the posterior the round selected with
    picks: int = 0
    seed: int = 0
    mlflow_run_id: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)  # tasks, answered, labelled, skipped, ...
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
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Round:
        return cls(**{**data, "state": RoundState(data["state"])})


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


def read_state(directory: str) -> CampaignState:
    path = storage.join(directory, STATE_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(
            f"{directory!r} is not a campaign directory (no {STATE_FILE}); create it with `campaign init`"
        )
    return CampaignState.from_json(storage.read_json(path))


def write_state(directory: str, state: CampaignState) -> CampaignState:
    """Write `state` (atomically; the last write of every transition) and return it as written."""
    state = replace(state, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    storage.write_json(storage.join(directory, STATE_FILE), state.to_json())
    return state


def round_dir(directory: str, index: int) -> str:
    return storage.join(directory, "rounds", f"{index:03d}")
