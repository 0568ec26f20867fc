"""The local Label Studio and MLflow servers behind `bayescurate services` and the pytest session.

Layout under the state dir (`default_state_dir()`):

    services.json                 pids, start times, ports, URLs, token file location (never the token)
    logs/{labelstudio,mlflow,labelstudio-template}.log
    labelstudio/data/             the server's data dir (sqlite, media)
    labelstudio/template/         migrated data dir copied into data/ (first start ~35 s, later ~4 s)
    labelstudio/token             API token (0600); labelstudio/admin.json: UI login (0600)
    mlflow/mlflow.db, mlflow/artifacts/
    images/                       local-files document root (Label Studio serves images below it)

Label Studio runs from its own venv (`.venv-labelstudio`, made on first use by infra/labelstudio/install.sh)
because its Django pins clash with the project's environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from connectors import processes
from connectors.processes import ProcessRecord

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA = REPO_ROOT / "infra"
LABEL_STUDIO_VERSION = "1.23.2"
DEFAULT_ADMIN = "admin@bayescurate.local"
STATE_FILE = "services.json"

# Seconds to wait for /health: a fresh data dir runs all migrations; a copied template only boots.
LS_TIMEOUT = 300.0
MLFLOW_START_TIMEOUT = 120.0


def default_state_dir() -> Path:
    """`$BAYESCURATE_STATE_DIR`, else `<cwd>/.state`."""
    env = os.environ.get("BAYESCURATE_STATE_DIR")
    return Path(env).expanduser().absolute() if env else Path.cwd() / ".state"


def labelstudio_venv() -> Path:
    """`$BAYESCURATE_LS_VENV`, else `.venv-labelstudio` in the repository root."""
    env = os.environ.get("BAYESCURATE_LS_VENV")
    return Path(env).expanduser().absolute() if env else REPO_ROOT / ".venv-labelstudio"


@dataclass(frozen=True)
class MlflowService:
    url: str  # tracking URI and UI, http://127.0.0.1:PORT
    port: int
    process: ProcessRecord
    backend_store: str  # sqlite:///.../mlflow.db
    artifacts: str  # proxied artifact destination


@dataclass(frozen=True)
class LabelStudioService:
    url: str  # http://127.0.0.1:PORT
    port: int
    process: ProcessRecord
    data_dir: str
    token_file: str  # 0600 file holding the API token
    admin_file: str  # 0600 JSON with the UI login (username, password)
    image_root: str  # local-files document root

    def token(self) -> str:
        return Path(self.token_file).read_text().strip()


@dataclass(frozen=True)
class ServicesState:
    """What `services up` started; persisted as services.json in the state dir."""

    state_dir: Path
    mlflow: MlflowService | None = None
    label_studio: LabelStudioService | None = None
    ports: dict[str, int] = field(default_factory=dict)  # last port per service, reused on restart if free

    @property
    def mlflow_url(self) -> str | None:
        return self.mlflow.url if self.mlflow else None

    @property
    def label_studio_url(self) -> str | None:
        return self.label_studio.url if self.label_studio else None

    @property
    def token_path(self) -> Path | None:
        return Path(self.label_studio.token_file) if self.label_studio else None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"state_dir": str(self.state_dir), "ports": dict(self.ports)}
        for name in ("mlflow", "label_studio"):
            service = getattr(self, name)
            out[name] = None if service is None else asdict(service)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ServicesState:
        mlflow = data.get("mlflow")
        ls = data.get("label_studio")
        return cls(
            state_dir=Path(str(data["state_dir"])),
            mlflow=_service(MlflowService, mlflow) if isinstance(mlflow, dict) else None,
            label_studio=_service(LabelStudioService, ls) if isinstance(ls, dict) else None,
            ports={str(k): int(v) for k, v in dict(data.get("ports") or {}).items()},  # type: ignore[call-overload]
        )


def _service(cls: type, data: dict[str, object]):  # type: ignore[no-untyped-def]
    fields = dict(data)
    fields["process"] = ProcessRecord.from_dict(fields["process"])  # type: ignore[arg-type]
    return cls(**fields)


# ---------------------------------------------------------------------------------------------- state file


def read_state(state_dir: Path | str | None = None) -> ServicesState:
    """The recorded services (possibly dead ones: check `service_status`); empty when nothing was started."""
    state_dir = _state_dir(state_dir)
    path = state_dir / STATE_FILE
    if not path.is_file():
        return ServicesState(state_dir=state_dir)
    return ServicesState.from_json(json.loads(path.read_text()))


def _write_state(state: ServicesState) -> None:
    path = state.state_dir / STATE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


def _state_dir(state_dir: Path | str | None) -> Path:
    return Path(state_dir).expanduser().absolute() if state_dir is not None else default_state_dir()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock on `path` (created), so concurrent `up`/`down`/test sessions do not race."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -------------------------------------------------------------------------------------------------- health


def mlflow_healthy(url: str) -> bool:
    return processes.http_ok(f"{url}/health")


def label_studio_healthy(url: str) -> bool:
    return processes.http_ok(f"{url}/health", lambda r: _json_status(r) == "UP")


def _json_status(response: object) -> str | None:
    try:
        return response.json().get("status")  # type: ignore[attr-defined,no-any-return]
    except ValueError:
        return None


def running_mlflow_url(state_dir: Path | str | None = None) -> str | None:
    """URL of the MLflow server recorded in the state dir when it is still our live process."""
    state = read_state(state_dir)
    if state.mlflow is not None and processes.is_running(state.mlflow.process):
        return state.mlflow.url
    return None


def service_status(state_dir: Path | str | None = None) -> dict[str, dict[str, object]]:
    """Per service: url, pid, running (our process is alive), healthy (answers /health)."""
    state = read_state(state_dir)
    report: dict[str, dict[str, object]] = {}
    checks = (
        ("mlflow", state.mlflow, mlflow_healthy),
        ("label_studio", state.label_studio, label_studio_healthy),
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
    state_dir = _state_dir(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir / ".services.lock"):
        state = read_state(state_dir)
        ml = state.mlflow
        ls = state.label_studio
        started: list[tuple[str, ProcessRecord, str]] = []
        ports = dict(state.ports)
        if mlflow and not (ml and processes.is_running(ml.process)):
            ml = _start_mlflow(state_dir, _port(ports.get("mlflow")))
            ports["mlflow"] = ml.port
            started.append(("MLflow", ml.process, ml.url))
        if labelstudio and not (ls and processes.is_running(ls.process)):
            root = Path(image_root).expanduser().absolute() if image_root else state_dir / "images"
            template = Path(template_dir).expanduser().absolute() if template_dir else None
            ls = _start_label_studio(state_dir, root, template, _port(ports.get("label_studio")))
            ports["label_studio"] = ls.port
            started.append(("Label Studio", ls.process, ls.url))
        state = ServicesState(state_dir=state_dir, mlflow=ml, label_studio=ls, ports=ports)
        _write_state(state)  # before waiting, so `down` can clean up a server that never got healthy
        try:
            if ml is not None and mlflow:
                processes.wait_healthy(
                    ml.process, lambda: mlflow_healthy(ml.url), name="MLflow", timeout=MLFLOW_START_TIMEOUT
                )
            if ls is not None and labelstudio:
                processes.wait_healthy(
                    ls.process, lambda: label_studio_healthy(ls.url), name="Label Studio", timeout=LS_TIMEOUT
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
    state_dir = _state_dir(state_dir)
    if not (state_dir / STATE_FILE).is_file():
        return []
    with _locked(state_dir / ".services.lock"):
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
        _write_state(ServicesState(state_dir=state_dir, mlflow=ml, label_studio=ls, ports=state.ports))
        return stopped


# -------------------------------------------------------------------------------------------------- MLflow


def _port(previous: int | None) -> int:
    """The previous port when it is free again (clients keep their URL across a restart), else a new one."""
    if previous is not None:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            if processes.port_free(previous):
                return previous
            time.sleep(0.2)
    return processes.free_port()


def _start_mlflow(state_dir: Path, port: int) -> MlflowService:
    from connectors.tracking import ensure_sqlite_db  # imports mlflow: only when starting it

    root = state_dir / "mlflow"
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    ensure_sqlite_db(root / "mlflow.db", "mlflow-artifacts:/0")
    env = _clean_env()
    env |= {
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


# -------------------------------------------------------------------------------------------- Label Studio


@dataclass(frozen=True)
class _Credentials:
    username: str
    password: str = field(repr=False)
    token: str = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> _Credentials:
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        _write_private(path, json.dumps(asdict(self)))


def _write_private(path: Path, text: str) -> None:
    """Write a secret file readable by the owner only (created 0600, never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _credentials_from_env() -> dict[str, str]:
    """Admin credentials the user chose through LABEL_STUDIO_USERNAME / _PASSWORD / _USER_TOKEN."""
    names = {
        "username": "LABEL_STUDIO_USERNAME",
        "password": "LABEL_STUDIO_PASSWORD",
        "token": "LABEL_STUDIO_USER_TOKEN",
    }
    chosen = {key: os.environ[var] for key, var in names.items() if os.environ.get(var)}
    if "token" in chosen and len(chosen["token"]) < 6:
        raise ValueError(
            "LABEL_STUDIO_USER_TOKEN must have at least 6 characters (Label Studio ignores shorter)"
        )
    return chosen


def _fill(chosen: Mapping[str, str]) -> _Credentials:
    return _Credentials(
        username=chosen.get("username", DEFAULT_ADMIN),
        password=chosen.get("password", secrets.token_urlsafe(18)),
        token=chosen.get("token", secrets.token_hex(20)),
    )


def ensure_labelstudio_venv(log: Path | None = None) -> Path:
    """Create `.venv-labelstudio` with label-studio==1.23.2 unless it is there already (about 95 s)."""
    venv = labelstudio_venv()
    if _venv_ready(venv):
        return venv
    log = log or default_state_dir() / "logs" / "labelstudio-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with _locked(venv.parent / ".venv-labelstudio.lock"):
        if _venv_ready(venv):
            return venv
        with open(log, "ab") as out:
            code = subprocess.call(
                ["bash", str(INFRA / "labelstudio" / "install.sh"), str(venv), sys.executable],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_clean_env() | {"BAYESCURATE_LS_VERSION": LABEL_STUDIO_VERSION},
            )
        if code != 0 or not _venv_ready(venv):
            raise RuntimeError(
                f"installing label-studio=={LABEL_STUDIO_VERSION} into {venv} failed; see {log}"
            )
    return venv


def _venv_ready(venv: Path) -> bool:
    dist = f"label_studio-{LABEL_STUDIO_VERSION}.dist-info"
    return (venv / "bin" / "label-studio").is_file() and any(venv.glob(f"lib/python*/site-packages/{dist}"))


def _labelstudio_env(venv: Path, data_dir: Path, port: int, image_root: Path) -> dict[str, str]:
    env = _clean_env()
    env |= {
        "BAYESCURATE_LS_VENV": str(venv),
        "BAYESCURATE_LS_PORT": str(port),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(image_root),
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        # Label Studio reports errors (with request data) to its own Sentry by default: never from here.
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "SENTRY_RATE": "0",
    }
    for var in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"):
        env.pop(var, None)  # given only when a data dir is initialised (`_init_env`)
    return env


def _init_env(credentials: _Credentials) -> dict[str, str]:
    return {
        "LABEL_STUDIO_USERNAME": credentials.username,
        "LABEL_STUDIO_PASSWORD": credentials.password,
        "LABEL_STUDIO_USER_TOKEN": credentials.token,
    }


def _ensure_template(template: Path, venv: Path, image_root: Path, log: Path) -> _Credentials:
    """A migrated data dir with the admin user and a legacy-token organisation, built once (~35 s)."""
    marker = template / ".bayescurate-template"
    creds_file = template / ".bayescurate-credentials.json"
    with _locked(template.parent / f".{template.name}.lock"):
        if marker.is_file() and creds_file.is_file():
            return _Credentials.load(creds_file)
        shutil.rmtree(template, ignore_errors=True)
        template.mkdir(parents=True)
        credentials = _fill(_credentials_from_env())
        port = processes.free_port()
        env = _labelstudio_env(venv, template, port, image_root) | _init_env(credentials)
        record = processes.spawn(["bash", str(INFRA / "labelstudio" / "start.sh")], env, log)
        url = f"http://127.0.0.1:{port}"
        try:
            processes.wait_healthy(
                record, lambda: label_studio_healthy(url), name="Label Studio (template)", timeout=LS_TIMEOUT
            )
        finally:
            processes.stop(record)
        credentials.save(creds_file)
        marker.write_text(LABEL_STUDIO_VERSION + "\n")
        return credentials


def _prepare_data_dir(
    ls_root: Path, template: Path, venv: Path, image_root: Path, logs: Path
) -> dict[str, str]:
    """Make `ls_root/data` ready to serve; returns extra env for its first start (credentials, if fresh)."""
    data = ls_root / "data"
    admin_file = ls_root / "admin.json"
    if (data / "label_studio.sqlite3").is_file() and admin_file.is_file():
        return {}  # restart on the same data: nothing to do
    chosen = _credentials_from_env()
    credentials = _ensure_template(template, venv, image_root, logs / "labelstudio-template.log")
    shutil.rmtree(data, ignore_errors=True)
    if any(getattr(credentials, key) != value for key, value in chosen.items()):
        # The user asked for other credentials than the template's: initialise this data dir from scratch.
        credentials = _fill(chosen)
        data.mkdir(parents=True)
        extra = _init_env(credentials)
    else:
        private = shutil.ignore_patterns(".env", ".bayescurate-*")  # .env holds the Django SECRET_KEY
        shutil.copytree(template, data, ignore=private)
        extra = {}
    credentials.save(admin_file)
    _write_private(ls_root / "token", credentials.token + "\n")
    return extra


def _start_label_studio(
    state_dir: Path, image_root: Path, template: Path | None, port: int
) -> LabelStudioService:
    logs = state_dir / "logs"
    venv = ensure_labelstudio_venv(logs / "labelstudio-install.log")
    ls_root = state_dir / "labelstudio"
    image_root.mkdir(parents=True, exist_ok=True)
    extra = _prepare_data_dir(ls_root, template or ls_root / "template", venv, image_root, logs)
    data = ls_root / "data"
    env = _labelstudio_env(venv, data, port, image_root) | extra
    record = processes.spawn(["bash", str(INFRA / "labelstudio" / "start.sh")], env, logs / "labelstudio.log")
    return LabelStudioService(
        url=f"http://127.0.0.1:{port}",
        port=port,
        process=record,
        data_dir=str(data),
        token_file=str(ls_root / "token"),
        admin_file=str(ls_root / "admin.json"),
        image_root=str(image_root),
    )


def _clean_env() -> dict[str, str]:
    """The caller's environment minus what would leak the project's venv into the servers."""
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST"):
        env.pop(var, None)
    return env
