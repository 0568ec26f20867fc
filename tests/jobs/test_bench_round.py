"""`bench round` on tiny sizes against the real Label Studio: every step of "labels in -> next batch in
Label Studio" is timed, and the next batch really is there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connectors.label_studio import LabelStudioClient
from jobs import bench_round

pytestmark = [pytest.mark.slow, pytest.mark.services]


def test_the_quick_round_benchmark_times_every_step(
    tmp_path: Path, services_state_dir: Path, label_studio_client: LabelStudioClient
) -> None:
    argv = ["--quick", "--out", str(tmp_path), "--state-dir", str(services_state_dir)]
    assert bench_round.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    [run] = result["runs"]
    assert (run["trainer"], run["selection"]) == ("local", "float64:1")
    assert run["answered"] == 6 and run["labels"] == 6
    assert set(run["steps_s"]) == {"collect", "train", "update", "rescore", "select", "push"}
    assert all(v >= 0 for v in run["steps_s"].values()) and run["round_s"] >= sum(run["steps_s"].values())
    project = label_studio_client.find_project(run["project"])
    assert project is not None and len(label_studio_client.sample_ids(project)) == 2 * 6  # both rounds there
    assert "| local |" in (tmp_path / "summary.md").read_text()
