"""The local Label Studio and MLflow servers behind `bayescurate services` and the pytest session.

Layout under the state dir (`default_state_dir()`):

    services.json                 pids, start times, ports, URLs, token file location (never the token)
    logs/{labelstudio,mlflow,labelstudio-template}.log
    labelstudio/data/             the server's data dir (sqlite, media)
    labelstudio/template/         migrated data dir copied into data/ (first start ~35 s, later ~4 s)
    labelstudio/token             API token (0600); labelstudio/admin.json: UI login (0600)
    mlflow/mlflow.db, mlflow/artifacts/
    images/                       local-files document root (Label Studio serves images below it)

This module starts and stops them together; `service_state` records them, `mlflow_server` and
`labelstudio_server` know how each one runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from connectors import labelstudio_server, mlflow_server, processes
from connectors.processes import ProcessRecord
from connectors.service_state import (
    REPO_ROOT,
    STATE_FILE,
    LabelStudioService,
    MlflowService,
    ServicesState,
    default_state_dir,
    locked,
    read_state,
    resolve_state_dir,
    running_mlflow_url,
    write_state,
)

__all__ = [
    "REPO_ROOT",
    "STATE_FILE",
    "LabelStudioService",
    "MlflowService",
    "ServicesState",
    "default_state_dir",
    "ensure_services",
    "read_state",
    "running_mlflow_url",
    "service_status",
    "stop_services",
]


def service_status(state_dir: Path | str | None = None) -> dict[str, dict[str, object]]:
    """Per service: url, pid, running (our process is alive), healthy (answers /health)."""
    state = read_state(state_dir)
    report: dict[str, dict[str, object]] = {}
    checks = (
        ("mlflow", state.mlflow, mlflow_server.healthy),
        ("label_studio", state.label_studio, labelstudio_server.healthy),
    )
    for name, service, healthy in checks:
        if service is None:
            report[name] = {"running": False, "healthy": False}
            continue
        running = processes.is_running(service.process)
        report[name] = {
            "url": service.url,
            "pid": service.process.pid,
            "running": running,
            "healthy": running and healthy(service.url),
            "log": service.process.log,
        }
    return report


# --------------------------------------------------------------------------------------------- up and down


def ensure_services(
    state_dir: Path | str | None = None,
    labelstudio: bool = True,
    mlflow: bool = True,
    *,
    image_root: Path | str | None = None,
    template_dir: Path | str | None = None,
) -> ServicesState:
    """Start the requested servers unless ours are already running and healthy; idempotent.

    `image_root` is Label Studio's local-files document root (default `<state>/images`); `template_dir` an
    initialised Label Studio data dir to copy (default `<state>/labelstudio/template`, built on first use).
    """
    state_dir = resolve_state_dir(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with locked(state_dir / ".services.lock"):
        state = read_state(state_dir)
        ml = state.mlflow
        ls = state.label_studio
        started: list[tuple[str, ProcessRecord, str]] = []
        ports = dict(state.ports)
        if mlflow and not (ml and processes.is_running(ml.process)):
            ml = mlflow_server.start(state_dir, _port(ports.get("mlflow")), processes.clean_env())
            ports["mlflow"] = ml.port
            started.append(("MLflow", ml.process, ml.url))
        if labelstudio and not (ls and processes.is_running(ls.process)):
            root = Path(image_root).expanduser().absolute() if image_root else state_dir / "images"
            template = Path(template_dir).expanduser().absolute() if template_dir else None
            ls = labelstudio_server.start(state_dir, root, template, _port(ports.get("label_studio")))
            ports["label_studio"] = ls.port
            started.append(("Label Studio", ls.process, ls.url))
        state = ServicesState(state_dir=state_dir, mlflow=ml, label_studio=ls, ports=ports)
        write_state(state)  # before waiting, so `down` can clean up a server that never got healthy
        try:
            if ml is not None and mlflow:
                processes.wait_healthy(
                    ml.process,
                    lambda: mlflow_server.healthy(ml.url),
                    name="MLflow",
                    timeout=mlflow_server.START_TIMEOUT,
                )
            if ls is not None and labelstudio:
                processes.wait_healthy(
                    ls.process,
                    lambda: labelstudio_server.healthy(ls.url),
                    name="Label Studio",
                    timeout=labelstudio_server.START_TIMEOUT,
                )
        except (RuntimeError, TimeoutError):
            for _, record, _ in started:
                processes.stop(record)
            raise
        return state


def stop_services(
    state_dir: Path | str | None = None, labelstudio: bool = True, mlflow: bool = True
) -> list[str]:
    """Stop the servers recorded in the state dir (only if still our processes); returns the names stopped."""
    state_dir = resolve_state_dir(state_dir)
    if not (state_dir / STATE_FILE).is_file():
        return []
    with locked(state_dir / ".services.lock"):
        state = read_state(state_dir)
        stopped: list[str] = []
        ml, ls = state.mlflow, state.label_studio
        if mlflow and ml is not None:
            if processes.stop(ml.process):
                stopped.append("mlflow")
            ml = None
        if labelstudio and ls is not None:
            if processes.stop(ls.process):
                stopped.append("label_studio")
            ls = None
        write_state(ServicesState(state_dir=state_dir, mlflow=ml, label_studio=ls, ports=state.ports))
        return stopped


def _port(previous: int | None) -> int:
    """The previous port when it is free again (clients keep their URL across a restart), else a new one."""
    if previous is not None:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            if processes.port_free(previous):
                return previous
            time.sleep(0.2)
    return processes.free_port()
