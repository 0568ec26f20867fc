"""`bayescurate campaign step` submitted as a Ray job to a REAL `ray start --head` cluster and its job server.

This is what a scheduled tick does on a cluster (`ray job submit -- bayescurate campaign step DIR`, from a
CronJob or cron). The cluster runs from this virtual environment, where the package is installed editable,
so a job's entrypoint finds `bayescurate` on PATH and imports this checkout; the job's runtime_env also puts
the repository on PYTHONPATH. Ports are free ports of 127.0.0.1 and the temp dir is the test's own.

Every process the cluster starts inherits a marker variable. The teardown stops the head's `ray start
--block` (which stops what it started), then finds any process still carrying the marker (job drivers run
in sessions of their own) and ends it by pid, and fails if one survives. `ray stop` is not used: it stops
every Ray of the user on the machine, other people's included.

The overlap test holds its first job deterministically right after it took the campaign's lease: that job's
checkpoint log (`pipeline.io.faults`) is a FIFO, and opening a FIFO for writing blocks until it has a reader.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.io import faults
from pipeline.rounds import campaign, lease
from pipeline.rounds.state import STATE_FILE, RoundState, read_state
from tests.fixtures_world import World

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # `ray` and `bayescurate` of this environment
MARKER = "BAYESCURATE_TEST_RAY_CLUSTER"
START_S = 180.0  # a 2-core machine shared with others may take long to bring up the dashboard
JOB_S = 600.0


def _quiet(_: str) -> None:
    pass


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports that were free on 127.0.0.1 a moment ago (all bound at once, so distinct)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _marked(marker: str) -> list[int]:
    """Pids of the live processes whose environment carries `MARKER=marker` (ours, and only ours)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@dataclass
class Head:
    """A running `ray start --head --block` with its dashboard and job server."""

    process: subprocess.Popen[bytes]
    temp_dir: Path
    log: Path
    address: str  # http://127.0.0.1:PORT, the job server
    marker: str
    client: Any = None  # ray.job_submission.JobSubmissionClient, once the server answers

    @classmethod
    def start(cls, temp_dir: Path, log: Path) -> Head:
        gcs, dashboard, client, agent, agent_grpc, env_agent, metrics, node, objects = _free_ports(9)
        marker = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env |= {
            MARKER: marker,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        }
        command = [
            str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}", f"--node-manager-port={node}",
            f"--object-manager-port={objects}",
            "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000", f"--temp-dir={temp_dir}",
        ]  # fmt: skip
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=temp_dir, start_new_session=True
            )
        head = cls(process, temp_dir, log, f"http://127.0.0.1:{dashboard}", marker)
        try:
            head.client = head._connect()
        except BaseException:
            head.stop()
            raise
        return head

    def _connect(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + START_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"`ray start --head` exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                return JobSubmissionClient(self.address)  # checks the server's /api/version
            except (ConnectionError, RuntimeError) as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"Ray's job server at {self.address} did not answer in {START_S:g} s ({exc}):\n"
                        f"{self.log_tail()}"
                    ) from None
            time.sleep(0.5)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else "(no log)"

    def stop(self) -> None:
        """Stop the head (it takes down what it started), then any marked process left; fail if one stays."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        deadline = time.monotonic() + 30
        while _marked(self.marker) and time.monotonic() < deadline:  # drivers notice their supervisor died
            time.sleep(0.5)
        for pid in _marked(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (left := _marked(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"processes of the test's Ray cluster survived SIGKILL: {left}")


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    logs = tmp_path_factory.mktemp("ray-head")
    # Ray's socket paths must stay under ~107 characters: pytest's tmp paths are too long for them.
    temp_dir = Path(tempfile.mkdtemp(prefix="bcjob", dir="/tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # the client must not send a token the cluster does not know
        started = Head.start(temp_dir, logs / "ray-start.log")
        try:
            yield started
        finally:
            started.stop()


def _step_entrypoint(directory: Path, *flags: str) -> str:
    return shlex.join(["bayescurate", "campaign", "step", str(directory), *flags])


def _runtime_env(**env: str) -> dict[str, Any]:
    return {"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", **env}}


def _submit(head: Head, directory: Path, *flags: str, **env: str) -> str:
    return str(
        head.client.submit_job(
            entrypoint=_step_entrypoint(directory, *flags),
            runtime_env=_runtime_env(**env),
            entrypoint_num_cpus=0,
        )
    )


def _finished(head: Head, job: str) -> tuple[Any, str]:
    """(JobInfo, logs) of `job` once it ended."""
    deadline = time.monotonic() + JOB_S
    while True:
        info = head.client.get_job_info(job)
        if info.status.is_terminal():
            return info, head.client.get_job_logs(job)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job} still {info.status} after {JOB_S:g} s:\n{head.client.get_job_logs(job)[-3000:]}"
            )
        time.sleep(0.5)


def _lease_taken(head: Head, job: str, directory: Path) -> dict[str, Any]:
    """The lease owner once `job` holds the campaign's lease (its note names a live `campaign step`)."""
    deadline = time.monotonic() + JOB_S
    while True:
        owner = lease.holder(str(directory))
        if owner is not None and owner.get("command") == "campaign step":
            return owner
        info = head.client.get_job_info(job)
        if info.status.is_terminal():
            raise AssertionError(
                f"job {job} ended ({info.status}) before it held the lease:\n"
                f"{head.client.get_job_logs(job)[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job} did not take the lease of {directory} in {JOB_S:g} s")
        time.sleep(0.2)


def _init(world: World, directory: Path) -> None:
    campaign.init(str(directory), world.config(max_rounds=1, eval=None), log=_quiet)


def test_a_step_submitted_as_a_ray_job_advances_the_campaign(
    head: Head, campaign_world: World, tmp_path: Path
) -> None:
    from ray.job_submission import JobStatus

    directory = tmp_path / "scheduled"
    _init(campaign_world, directory)
    info, logs = _finished(head, _submit(head, directory))
    assert info.status == JobStatus.SUCCEEDED, logs[-3000:]
    state = read_state(str(directory))
    assert [(r.index, r.state) for r in state.rounds] == [(0, RoundState.UPDATED)]
    assert state.rounds[0].counts.labels is not None and state.rounds[0].counts.labels.labelled == 6
    for what in ("selected", "pushed", "collected", "trained", "updated"):
        assert f"round 0: {what}" in logs, (what, logs[-3000:])


def test_a_second_step_while_one_runs_exits_3_naming_the_owner_and_changes_nothing(
    head: Head, campaign_world: World, tmp_path: Path
) -> None:
    from ray.job_submission import JobStatus

    directory = tmp_path / "overlap"
    _init(campaign_world, directory)
    before = (directory / STATE_FILE).read_bytes()
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    first = _submit(head, directory, **{faults.CHECKPOINT_LOG: str(gate)})
    owner = _lease_taken(head, first, directory)  # now blocked in its first checkpoint, lease held

    info, logs = _finished(head, _submit(head, directory))
    assert info.status == JobStatus.FAILED, logs[-3000:]
    assert info.driver_exit_code == 3, (info.driver_exit_code, info.message)
    assert "busy: campaign" in logs and "(campaign step)" in logs, logs[-3000:]
    assert f"pid {owner['pid']} on {owner['host']}" in logs, (owner, logs[-3000:])
    assert (directory / STATE_FILE).read_bytes() == before  # the refused step wrote nothing
    assert not (directory / "rounds").exists()

    # A scheduled tick (the CronJob's `--busy-ok`): the same line and nothing changed, but a success.
    info, logs = _finished(head, _submit(head, directory, "--busy-ok"))
    assert info.status == JobStatus.SUCCEEDED and info.driver_exit_code == 0, (info.message, logs[-3000:])
    assert "busy: campaign" in logs and f"pid {owner['pid']} on {owner['host']}" in logs, logs[-3000:]
    assert (directory / STATE_FILE).read_bytes() == before
    assert not (directory / "rounds").exists()

    # Release the first job: a reader that never blocks a writer (Linux opens a FIFO O_RDWR at once). The
    # pipe buffer (64 KiB) holds the checkpoint lines of a one-round step many times over.
    fd = os.open(gate, os.O_RDWR | os.O_NONBLOCK)
    try:
        info, logs = _finished(head, first)
        checkpoints = os.read(fd, 1 << 16).decode().splitlines()
    finally:
        os.close(fd)
    assert info.status == JobStatus.SUCCEEDED, logs[-3000:]
    assert checkpoints[0].split("\t", 1)[1] == str(directory / lease.LEASE_FILE)  # held right after the lease
    state = read_state(str(directory))
    assert [(r.index, r.state) for r in state.rounds] == [(0, RoundState.UPDATED)]
    assert sorted(p.name for p in (directory / "rounds").iterdir()) == ["000"]  # one round, not two
