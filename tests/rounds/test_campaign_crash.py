"""A campaign survives SIGKILL between ANY two of its writes, against the real Label Studio server.

Scenario: step (round 0 is selected and pushed, then waits), the bot annotator answers, step (round 0 is
collected, trained and updated; round 1 is selected and pushed, then waits). A reference run without
crashes counts the writes and side effects of each step (`pipeline.io.faults` checkpoints). Then, for
every checkpoint k, a fresh campaign runs the same scenario with the step SIGKILLed right after its k-th
checkpoint (in a subprocess), resumed by the next step. Every time, Label Studio ends up with each picked
sample exactly once, the labels table with every answer exactly once, and the picks of both rounds are
those of the reference run.

The reference run steps through the CLI in real subprocesses (`python -m jobs.cli campaign step`); the
crashed steps are forked children of the test process (torch and the data already loaded: a second each
instead of a fresh interpreter), killed by the same checkpoint hook.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from connectors.annotator_bot import answer_open_tasks
from connectors.label_studio import LabelStudioClient
from jobs.annotate_bot import bot_session, read_truth
from pipeline.io import faults
from pipeline.rounds import campaign
from pipeline.rounds.config import CampaignConfig
from pipeline.rounds.labels import read_rows, resolve
from pipeline.rounds.state import RoundState, read_state
from tests.fixtures_world import World

pytestmark = [pytest.mark.slow, pytest.mark.services]

BUDGET = 3
ROOT = Path(__file__).resolve().parents[2]


def _step_in_subprocess(directory: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", "campaign", "step", str(directory)],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def _step_killed_after(directory: Path, k: int) -> None:
    """`campaign.step` in a forked child that SIGKILLs itself right after its k-th checkpoint."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)  # OpenMP's thread pool does not survive a fork
            faults.reset()
            os.environ[faults.KILL_AFTER] = str(k)
            campaign.step(str(directory), log=lambda _: None)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)


class Scenario:
    def __init__(self, world: World, state_dir: Path, client: LabelStudioClient, tmp: Path) -> None:
        self.world, self.state_dir, self.client, self.tmp = world, state_dir, client, tmp
        self.truth = read_truth(str(world.pool), "shape")
        self.bot = bot_session(client, "crash-bot@bayescurate.local", str(state_dir))

    def config(self, name: str) -> CampaignConfig:
        return self.world.config(
            label_source="label-studio",
            truth=None,
            project=f"crash-{name}",
            state_dir=str(self.state_dir),
            budget=BUDGET,
            max_rounds=2,
            eval=None,
        )

    def init(self, name: str) -> Path:
        """A fresh campaign with its own Label Studio project: `campaign init` once, copies after that
        (the same directory with another project name: init's checks need not run 32 times)."""
        directory = self.tmp / name
        template = self.tmp / "template"
        if not template.exists():
            campaign.init(str(template), self.config("template"), log=lambda _: None)
        shutil.copytree(template, directory)
        (directory / "campaign.yaml").write_text(yaml.safe_dump(self.config(name).model_dump(mode="json")))
        return directory

    def answer(self, name: str) -> None:
        project = self.client.find_project(f"crash-{name}")
        assert project is not None
        answer_open_tasks(self.bot, self.client, project, self.truth)

    def phase(self, directory: Path, kill_after: int | None = None, log: Path | None = None) -> None:
        """One `campaign step`: through the CLI in a subprocess counting its checkpoints (`log`), in a forked
        child SIGKILLed after `kill_after` checkpoints and then resumed, or in-process."""
        if log is not None:
            done = _step_in_subprocess(directory, {faults.CHECKPOINT_LOG: str(log)})
            assert done.returncode == 0, done.stderr[-2000:]
        elif kill_after is not None:
            _step_killed_after(directory, kill_after)
            campaign.step(str(directory), log=lambda _: None)  # the next tick resumes
        else:
            campaign.step(str(directory), log=lambda _: None)

    def outcome(self, name: str, directory: Path) -> dict[str, object]:
        project = self.client.find_project(f"crash-{name}")
        assert project is not None
        tasks = self.client.sample_ids(project)
        rows = read_rows(str(directory))
        state = read_state(str(directory))
        return {
            "tasks": sorted(tasks),
            "duplicate_tasks": len(tasks) - len(set(tasks)),
            "label_rows": len(rows),
            "labels": sorted(resolve(rows, self._classes()).labels),
            "states": [r.state for r in state.rounds],
            "picks": [campaign.Campaign(str(directory)).picks(i) for i in range(len(state.rounds))],
        }

    def _classes(self) -> list[str]:
        import json

        return json.loads(self.world.classes.read_text())["classes"]


@pytest.fixture(scope="module")
def scenario(
    campaign_world: World,
    services_state_dir: Path,
    label_studio_client: LabelStudioClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Scenario:
    return Scenario(campaign_world, services_state_dir, label_studio_client, tmp_path_factory.mktemp("crash"))


def _checkpoints(log: Path) -> list[str]:
    return [line.split("\t", 1)[1] for line in log.read_text().splitlines()]


@pytest.mark.timeout(2400)  # about 30 crash points, each a whole scenario
def test_a_step_killed_after_any_write_resumes_without_duplicates_or_losses(
    scenario: Scenario, tmp_path: Path
) -> None:
    # The reference run, counting each phase's checkpoints.
    ref = scenario.init("ref")
    scenario.phase(ref, log=tmp_path / "a.log")
    scenario.answer("ref")
    scenario.phase(ref, log=tmp_path / "b.log")
    expected = scenario.outcome("ref", ref)
    assert expected["states"] == [RoundState.UPDATED, RoundState.COLLECTING]
    assert expected["duplicate_tasks"] == 0 and len(expected["tasks"]) == 2 * BUDGET
    assert expected["label_rows"] == BUDGET and len(expected["labels"]) == BUDGET
    points = {"a": _checkpoints(tmp_path / "a.log"), "b": _checkpoints(tmp_path / "b.log")}
    assert len(points["a"]) >= 5 and len(points["b"]) >= 10  # picks, images, import, push, labels, ...

    for phase, names in points.items():
        for k, where in enumerate(names, start=1):
            name = f"{phase}{k}"
            directory = scenario.init(name)
            scenario.phase(directory, kill_after=k if phase == "a" else None)
            scenario.answer(name)
            scenario.phase(directory, kill_after=k if phase == "b" else None)
            got = scenario.outcome(name, directory)
            assert got == expected, f"killed after checkpoint {k} of step {phase} ({where})"
