"""The local MLflow server: its sqlite database (bootstrapped from a migrated template) and its start.

`bayescurate services up` runs it with one worker, job execution and telemetry off (see
infra/mlflow/start.sh). The sqlite bootstrap is also what server-less tracking (`sqlite:///...`) uses.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
from pathlib import Path

from connectors import processes
from connectors.service_state import INFRA, MlflowService, locked
from pipeline.io import storage

START_TIMEOUT = 120.0  # seconds to wait for /health


def cache_dir() -> Path:
    """`$BAYESCURATE_CACHE_DIR`, else ~/.cache/bayescurate: rebuildable things (database templates)."""
    env = os.environ.get("BAYESCURATE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bayescurate"


def ensure_sqlite_db(db: Path, default_artifacts: str) -> None:
    """Create an MLflow sqlite database at `db` unless it exists, by copying a migrated template.

    A fresh database runs every MLflow migration (7 to 15 s here); the template is built once per MLflow
    version in `cache_dir()`. `default_artifacts` becomes the "Default" experiment's artifact location
    (the template was built elsewhere), e.g. "mlflow-artifacts:/0" behind a server.
    """
    if db.exists():
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    template = cache_dir() / f"mlflow-{mlflow.__version__}.db"
    with locked(template.with_suffix(".lock")):
        if not template.exists():
            with storage.local_target(template) as building:
                # `building` is only a name (nothing is created there): MLflow creates the file and runs
                # every migration itself. A leftover from an interrupted build would be half-migrated.
                building.unlink(missing_ok=True)
                MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments()
    with locked(db.with_name(f".{db.name}.lock")):
        if db.exists():  # another process created it meanwhile: keep theirs
            return
        with storage.local_target(db) as copy:
            shutil.copyfile(template, copy)
            conn = sqlite3.connect(copy)
            with conn:
                conn.execute(
                    "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (default_artifacts,),
                )
            conn.close()


def healthy(url: str) -> bool:
    return processes.http_ok(f"{url}/health")


def start(state_dir: Path, port: int, env: dict[str, str]) -> MlflowService:
    """Spawn the server on `port` with its data under `state_dir/mlflow` (returns at once; poll `healthy`)."""
    root = state_dir / "mlflow"
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    ensure_sqlite_db(root / "mlflow.db", "mlflow-artifacts:/0")
    env = dict(env) | {
        "BAYESCURATE_MLFLOW_PYTHON": sys.executable,
        "BAYESCURATE_MLFLOW_DIR": str(root),
        "BAYESCURATE_MLFLOW_PORT": str(port),
    }
    record = processes.spawn(
        ["bash", str(INFRA / "mlflow" / "start.sh")], env, state_dir / "logs" / "mlflow.log", cwd=root
    )
    return MlflowService(
        url=f"http://127.0.0.1:{port}",
        port=port,
        process=record,
        backend_store=f"sqlite:///{root / 'mlflow.db'}",
        artifacts=str(root / "artifacts"),
    )
