"""`bayescurate services up|down|status`: the local Label Studio and MLflow servers.

`up` is idempotent (servers already running are kept) and prints URLs and the token FILE, never the token;
`down` stops exactly the processes `up` started; `status` checks their health (exit code 1 if one is down)
and says which Label Studio the other commands would use (`--label-studio-url`, `$LABEL_STUDIO_URL` or these
services), whether it answers and whether it accepts the token.
"""

from __future__ import annotations

from enum import Enum

from connectors import services
from jobs._app import ConfigCommand
from pipeline.config import LabelStudioAccess


class Action(str, Enum):
    UP = "up"
    """Start the servers that are not running yet."""
    DOWN = "down"
    """Stop the servers recorded in the state dir."""
    STATUS = "status"
    """Report URL, pid and health of each recorded server."""


class ServicesConfig(LabelStudioAccess):
    """Which local servers to start, stop or check, and where their state lives."""

    action: Action  # up, down or status
    state_dir: str | None = None  # data, logs and services.json (default: $BAYESCURATE_STATE_DIR or ./.state)
    labelstudio: bool = True  # act on Label Studio
    mlflow: bool = True  # act on MLflow
    image_root: str | None = None  # Label Studio's local-files document root (default: STATE_DIR/images)


def run(cfg: ServicesConfig) -> int:
    """Start, stop or check the local Label Studio and MLflow servers."""
    labelstudio, mlflow = cfg.labelstudio, cfg.mlflow
    if cfg.action == Action.UP:
        state = services.ensure_services(
            cfg.state_dir, labelstudio=labelstudio, mlflow=mlflow, image_root=cfg.image_root
        )
        _print_up(state)
        return 0
    if cfg.action == Action.DOWN:
        stopped = services.stop_services(cfg.state_dir, labelstudio=labelstudio, mlflow=mlflow)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    report = services.service_status(cfg.state_dir)
    wanted = {"mlflow": mlflow, "label_studio": labelstudio}
    unhealthy = False
    for name, info in report.items():
        if not wanted[name]:
            continue
        if "url" not in info:
            print(f"{name:<13} not started")
            continue
        health = (
            "healthy" if info["healthy"] else ("running, not answering" if info["running"] else "stopped")
        )
        unhealthy |= not info["healthy"]
        print(f"{name:<13} {info['url']:<26} pid {info['pid']:<8} {health}  (log {info['log']})")
    if labelstudio:
        unhealthy |= not _report_label_studio(cfg)
    return 1 if unhealthy else 0


def _report_label_studio(cfg: ServicesConfig) -> bool:
    """Print the Label Studio that `select`, `campaign` and `annotate-bot` would use; False if it is
    misconfigured, down, or refuses the token (nothing configured and nothing started is no failure)."""
    from connectors import labelstudio_server
    from connectors.label_studio import LabelStudioError
    from connectors.label_studio_access import NoLabelStudio, resolve

    try:
        target = resolve(cfg.label_studio_url, cfg.label_studio_token_file, cfg.state_dir)
    except NoLabelStudio as exc:
        print(f"{'commands use':<13} {exc}")
        return True
    except (ValueError, FileNotFoundError) as exc:
        print(f"{'commands use':<13} {exc}")
        return False
    if not labelstudio_server.healthy(target.url):
        print(f"{'commands use':<13} {target.describe()}: not answering")
        return False
    try:
        target.client(retry_for=0).current_user()
    except LabelStudioError as exc:
        print(f"{'commands use':<13} {target.describe()}: answering, but {exc}")
        return False
    print(f"{'commands use':<13} {target.describe()}: healthy, token accepted")
    return True


def _print_up(state: services.ServicesState) -> None:
    if state.mlflow is not None:
        print(f"MLflow        {state.mlflow.url}   (UI; export MLFLOW_TRACKING_URI={state.mlflow.url})")
    ls = state.label_studio
    if ls is not None:
        print(f"Label Studio  {ls.url}   (UI login in {ls.admin_file})")
        print(f"API token     in {ls.token_file}   (export LABEL_STUDIO_API_KEY=$(cat {ls.token_file}))")
        print(f"Images        {ls.image_root}   (local-files document root)")
    print(f"State         {state.state_dir / services.STATE_FILE}   (`bayescurate services down` stops them)")


CONFIG = ServicesConfig
main = ConfigCommand(ServicesConfig, run, "bayescurate services", positional=("action",))
