"""`campaign status`: its `--json` keys, structure and values, and its text, pinned on a `state.json` in the
format every version so far writes (external checks read the JSON: it must not drift)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs import campaign as campaign_cli
from pipeline.rounds.state import read_state, write_state

CONFIG = {
    "pool": "pool.parquet",
    "classes": "classes.json",
    "posterior": "posterior",
    "label_source": "oracle",
    "truth": "pool.parquet",
    "tracking": False,
    "budget": 4,
    "min_answered": 0.5,
    "max_rounds": 3,
    "method": "epig",
}
METRICS = {
    "n": 8,
    "MAP": {"accuracy": 0.5, "nll": 1.25, "ece": 0.125, "brier": 0.625, "mean_confidence": 0.75},
    "Bayes": {"accuracy": 0.625, "nll": 1.0, "ece": 0.0625, "brier": 0.5, "mean_confidence": 0.625},
    "classes": {
        "circle": {"n": 4, "MAP": 0.75, "Bayes": 0.75},
        "square": {"n": 4, "MAP": 0.25, "Bayes": 0.5},
    },
    "domains": {
        "blur": {
            "MAP": {"accuracy": 0.5, "nll": 1.25, "ece": 0.125, "brier": 0.625},
            "Bayes": {"accuracy": 0.625, "nll": 1.0, "ece": 0.0625, "brier": 0.5},
        }
    },
}
BASELINE = {
    "n": 8,
    "MAP": {"accuracy": 0.375, "nll": 1.5, "ece": 0.25, "brier": 0.75, "mean_confidence": 0.75},
    "Bayes": {"accuracy": 0.5, "nll": 1.125, "ece": 0.125, "brier": 0.625, "mean_confidence": 0.5},
    "classes": {
        "circle": {"n": 4, "MAP": 0.5, "Bayes": 0.75},
        "square": {"n": 4, "MAP": 0.25, "Bayes": 0.25},
    },
}
SELECTED = {"tasks": 4, "candidates": 36, "pool_left": 36}
# A state.json as `campaign step` writes it: round 0 updated, round 1 collecting (1 of 4 answered).
STATE: dict[str, Any] = {
    "format": "bayescurate.campaign/1",
    "rounds": [
        {
            "index": 0,
            "state": "updated",
            "posterior_id": "start0001",
            "picks": 4,
            "seed": 0,
            "mlflow_run_id": None,
            "counts": {
                "tasks": 4,
                "candidates": 40,
                "pool_left": 40,
                "created": 4,
                "answered": 4,
                "labelled": 3,
                "skipped": 1,
                "quarantined": 0,
                "multi_annotated": 1,
                "agreement": 0.5,
                "labels_total": 3,
            },
            "labels_used": 3,
            "new_posterior_id": "round0001",
            "metrics": METRICS,
            "timings": {
                "rescore": 0.5,
                "select": 0.25,
                "push": 0.125,
                "collect": 0.0625,
                "train": 1.5,
                "update": 0.75,
            },
            "train": {
                "steps_run": 20,
                "best_step": 18,
                "stopped_early": True,
                "converged": False,
                "seconds": 1.25,
                "labels": 3,
                "labels_digest": "ab" * 32,
                "trainer": "local",
            },
        },
        {
            "index": 1,
            "state": "collecting",
            "posterior_id": "round0001",
            "picks": 4,
            "seed": 1,
            "mlflow_run_id": None,
            "counts": {
                **SELECTED,
                "created": 4,
                "answered": 1,
                "labelled": 1,
                "skipped": 0,
                "quarantined": 0,
                "multi_annotated": 0,
                "agreement": 1.0,
                "labels_total": 4,
            },
            "labels_used": 0,
            "new_posterior_id": None,
            "metrics": {},
            "timings": {"rescore": 0.5, "select": 0.25, "push": 0.125, "collect": 0.0625},
            "train": {},
        },
    ],
    "mlflow_run_id": None,
    "baseline": BASELINE,
    "updated": "2024-05-01T12:00:00Z",
}


def _expected(directory: Path) -> dict[str, Any]:
    """`status --json` of STATE, key for key and in order, as every version so far prints it."""
    return {
        "directory": str(directory),
        "label_source": "oracle",
        "method": "epig",
        "budget": 4,
        "min_answered": 0.5,
        "max_rounds": 3,
        "rounds_completed": 1,
        "rounds": [
            {
                "round": 0,
                "state": "updated",
                "posterior_id": "start0001",
                "new_posterior_id": "round0001",
                "picks": 4,
                "labels": {
                    "agreement": 0.5,
                    "answered": 4,
                    "candidates": 40,
                    "created": 4,
                    "labelled": 3,
                    "labels_total": 3,
                    "multi_annotated": 1,
                    "pool_left": 40,
                    "quarantined": 0,
                    "skipped": 1,
                    "tasks": 4,
                },
                "labels_used": 3,
                "metrics": {
                    "MAP": {"accuracy": 0.5, "nll": 1.25, "ece": 0.125, "brier": 0.625},
                    "Bayes": {"accuracy": 0.625, "nll": 1.0, "ece": 0.0625, "brier": 0.5},
                    "domains": METRICS["domains"],
                },
                "seconds": STATE["rounds"][0]["timings"],
            },
            {
                "round": 1,
                "state": "collecting",
                "posterior_id": "round0001",
                "new_posterior_id": None,
                "picks": 4,
                "labels": {
                    "agreement": 1.0,
                    "answered": 1,
                    "candidates": 36,
                    "created": 4,
                    "labelled": 1,
                    "labels_total": 4,
                    "multi_annotated": 0,
                    "pool_left": 36,
                    "quarantined": 0,
                    "skipped": 0,
                    "tasks": 4,
                },
                "labels_used": 0,
                "metrics": {},
                "seconds": STATE["rounds"][1]["timings"],
            },
        ],
        "baseline": BASELINE,
        "waiting": "round 1: 1 of 4 tasks answered at the last step (trains at 2)",
        "lease": None,
        "mlflow": None,
        "updated": "2024-05-01T12:00:00Z",
        "worst_classes": {
            "round": 0,
            "classes": [
                {"class": "square", "n": 4, "MAP": 0.25, "Bayes": 0.5, "Bayes_start": 0.25},
                {"class": "circle", "n": 4, "MAP": 0.75, "Bayes": 0.75, "Bayes_start": 0.75},
            ],
        },
    }


def _campaign(directory: Path, state: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "campaign.yaml").write_text(yaml.safe_dump(CONFIG))
    (directory / "state.json").write_text(json.dumps(state, indent=2))
    return directory


def _status_json(directory: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert campaign_cli.main(["status", str(directory), "--json"]) == 0
    return capsys.readouterr().out


def test_status_json_keeps_its_keys_structure_and_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _campaign(tmp_path / "camp", STATE)
    out = _status_json(directory, capsys)
    assert out == json.dumps(_expected(directory), indent=2) + "\n"


def test_status_text_keeps_its_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = _campaign(tmp_path / "camp", STATE)
    assert campaign_cli.main(["status", str(directory)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"campaign {directory}: 1 rounds done, labels from oracle, epig x 4 a round",
        "round  state      tasks answered labels  used"
        "  MAP acc Bayes acc MAP ECE Bayes ECE MAP NLL Bayes NLL",
        "start                                       0"
        "    0.375     0.500   0.250     0.125   1.500     1.125",
        "    0  updated        4        4      3     3"
        "    0.500     0.625   0.125     0.062   1.250     1.000",
        "    1  collecting     4        1      1     0",
        "worst classes, Bayes recall on the evaluation set after round 0: "
        "square 0.50 (start 0.25), circle 0.75 (start 0.75)",
        "waiting: round 1: 1 of 4 tasks answered at the last step (trains at 2)",
    ]


@pytest.mark.parametrize(
    ("state", "counts", "waiting", "row"),
    [
        (
            "selected",
            SELECTED,
            "round 1: picks chosen, tasks not pushed yet (the next step pushes them)",
            "    1  selected       4        0      0     0",
        ),
        (
            "pushed",
            {**SELECTED, "created": 4},
            "round 1: 0 of 4 tasks answered at the last step (trains at 2)",
            "    1  pushed         4        0      0     0",
        ),
    ],
)
def test_a_round_before_its_first_collection_reports_its_selection_counts_alone(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    state: str,
    counts: dict[str, int],
    waiting: str,
    row: str,
) -> None:
    data = copy.deepcopy(STATE)
    data["rounds"][1] |= {"state": state, "counts": counts, "timings": {"rescore": 0.5, "select": 0.25}}
    directory = _campaign(tmp_path / "camp", data)
    report = json.loads(_status_json(directory, capsys))
    assert report["rounds"][1]["labels"] == dict(sorted(counts.items()))
    assert report["waiting"] == waiting
    assert campaign_cli.main(["status", str(directory)]) == 0
    assert row in capsys.readouterr().out.splitlines()


def test_a_state_json_in_todays_format_loads_and_writes_back_the_same(tmp_path: Path) -> None:
    directory = _campaign(tmp_path / "camp", STATE)
    state = read_state(str(directory))
    assert state.to_json() == STATE
    written = write_state(str(directory), state)
    expected = {**STATE, "updated": written.updated}
    assert (directory / "state.json").read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"
