"""The local Label Studio server: its own virtual environment, a migrated template data dir, credentials.

Label Studio runs from its own venv (`.venv-labelstudio`, made on first use by infra/labelstudio/install.sh)
because its Django pins clash with the project's environment. The first start of a data dir runs every
migration (about 35 s), so one initialised template is copied per state dir (restarts take about 4 s).
Credentials (admin login, API token) come from LABEL_STUDIO_USERNAME / _PASSWORD / _USER_TOKEN or are
generated, and live only in 0600 files.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from connectors import processes
from connectors.service_state import INFRA, REPO_ROOT, LabelStudioService, default_state_dir, locked
from pipeline.io import storage

VERSION = "1.23.2"
DEFAULT_ADMIN = "admin@bayescurate.local"
START_TIMEOUT = 300.0  # seconds to wait for /health: a fresh data dir runs all migrations


def labelstudio_venv() -> Path:
    """`$BAYESCURATE_LS_VENV`, else `.venv-labelstudio` in the repository root."""
    env = os.environ.get("BAYESCURATE_LS_VENV")
    return Path(env).expanduser().absolute() if env else REPO_ROOT / ".venv-labelstudio"


def healthy(url: str) -> bool:
    return processes.http_ok(f"{url}/health", lambda r: _json_status(r) == "UP")


def _json_status(response: object) -> str | None:
    try:
        return response.json().get("status")  # type: ignore[attr-defined,no-any-return]
    except ValueError:
        return None


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
    """A secret file readable by the owner only (created 0600, never world-readable in between)."""
    storage.write_text(path, text, private=True)


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
    with locked(venv.parent / ".venv-labelstudio.lock"):
        if _venv_ready(venv):
            return venv
        with open(log, "ab") as out:
            code = subprocess.call(
                ["bash", str(INFRA / "labelstudio" / "install.sh"), str(venv), sys.executable],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=processes.clean_env() | {"BAYESCURATE_LS_VERSION": VERSION},
            )
        if code != 0 or not _venv_ready(venv):
            raise RuntimeError(f"installing label-studio=={VERSION} into {venv} failed; see {log}")
    return venv


def _venv_ready(venv: Path) -> bool:
    dist = f"label_studio-{VERSION}.dist-info"
    return (venv / "bin" / "label-studio").is_file() and any(venv.glob(f"lib/python*/site-packages/{dist}"))


def _labelstudio_env(venv: Path, data_dir: Path, port: int, image_root: Path) -> dict[str, str]:
    env = processes.clean_env()
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
        # Webhooks (`campaign serve`) are delivered to a loopback address, which SSRF protection refuses.
        "SSRF_PROTECTION_ENABLED": "false",
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
    with locked(template.parent / f".{template.name}.lock"):
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
                record, lambda: healthy(url), name="Label Studio (template)", timeout=START_TIMEOUT
            )
        finally:
            processes.stop(record)
        credentials.save(creds_file)
        storage.write_text(marker, VERSION + "\n")
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


def start(state_dir: Path, image_root: Path, template: Path | None, port: int) -> LabelStudioService:
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
