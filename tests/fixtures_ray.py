"""Session-scoped local Ray for the `ray`-marked tests: 2 CPUs, token auth off, short temp dir, quiet.

Workers get the repository root on PYTHONPATH so test-only helpers (stand-in models) import there too,
and `BAYESCURATE_KILL_ONCE` (`pipeline.io.faults.kill_once`): a test arms a crash of one worker with
`ray_faults`, the folder the workers look in; the driver's own environment never has it.
The multi-node test starts its own `ray.cluster_utils.Cluster` in a subprocess, so it never meets this one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


FAULTS = Path(tempfile.mkdtemp(prefix="bcfaults"))  # where a test arms a worker crash


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from pipeline import runtime
    from pipeline.io import faults

    if ray.is_initialized():
        yield
        return
    temp_dir = tempfile.mkdtemp(prefix="bcr", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        logging_level="warning",
        runtime_env={
            "env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", faults.KILL_ONCE: str(FAULTS)}
        },
    )
    runtime.configure_data(progress=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def ray_faults(ray_session: None) -> Iterator[Path]:
    """The folder where a test arms a worker crash (`faults.kill_once`); emptied after the test."""
    yield FAULTS
    for entry in FAULTS.iterdir():
        entry.unlink()
