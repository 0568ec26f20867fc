"""Session-scoped local Ray for the `ray`-marked tests: 2 CPUs, token auth off, short temp dir, quiet.

Workers get the repository root on PYTHONPATH so test-only helpers (stand-in models) import there too.
The multi-node test starts its own `ray.cluster_utils.Cluster` in a subprocess, so it never meets this one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from pipeline import runtime

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
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}},
    )
    runtime.configure_data(progress=False)
    try:
        yield
    finally:
        ray.shutdown()
