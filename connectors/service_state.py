"""Where the local services are recorded: the state dir, `services.json`, and the records in it.

Discovery only: reading the state needs no server library, so tracking, the Label Studio client and
`bayescurate services status` can find the servers without importing MLflow or Label Studio.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from connectors import processes
from connectors.processes import ProcessRecord
from pipeline.io import storage

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA = REPO_ROOT / "infra"
STATE_FILE = "services.json"


def default_state_dir() -> Path:
    """`$BAYESCURATE_STATE_DIR`, else `<cwd>/.state`."""
    env = os.environ.get("BAYESCURATE_STATE_DIR")
    return Path(env).expanduser().absolute() if env else Path.cwd() / ".state"


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


def read_state(state_dir: Path | str | None = None) -> ServicesState:
    """The recorded services (possibly dead ones: check `service_status`); empty when nothing was started."""
    state_dir = resolve_state_dir(state_dir)
    path = state_dir / STATE_FILE
    if not path.is_file():
        return ServicesState(state_dir=state_dir)
    return ServicesState.from_json(storage.read_json(path))


def write_state(state: ServicesState) -> None:
    storage.write_text(state.state_dir / STATE_FILE, json.dumps(state.to_json(), indent=2) + "\n")


def resolve_state_dir(state_dir: Path | str | None) -> Path:
    return Path(state_dir).expanduser().absolute() if state_dir is not None else default_state_dir()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock on `path` (created), so concurrent `up`/`down`/test sessions do not race."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def running_mlflow_url(state_dir: Path | str | None = None) -> str | None:
    """URL of the MLflow server recorded in the state dir when it is still our live process."""
    state = read_state(state_dir)
    if state.mlflow is not None and processes.is_running(state.mlflow.process):
        return state.mlflow.url
    return None
