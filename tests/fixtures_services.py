"""Session fixtures: the REAL MLflow and Label Studio servers, started once per test session.

They use the same code as `bayescurate services up` (connectors.services) on a temporary state dir. Label
Studio's initialised data dir is copied from a template kept across sessions (BAYESCURATE_TEST_LS_TEMPLATE,
default `<repo>/.state/labelstudio-template`), so only the very first session pays its ~35 s of migrations.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors import services
from connectors.label_studio import LabelStudioClient

TEMPLATE = Path(
    os.environ.get("BAYESCURATE_TEST_LS_TEMPLATE", services.REPO_ROOT / ".state" / "labelstudio-template")
)


@pytest.fixture(scope="session")
def services_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """State dir shared by the session's servers (data, logs, services.json, images/)."""
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def mlflow_server(services_state_dir: Path) -> Iterator[str]:
    """URL of a live MLflow server (sqlite backend, proxied artifacts): use it as the tracking URI."""
    state = services.ensure_services(services_state_dir, labelstudio=False, mlflow=True)
    assert state.mlflow is not None
    yield state.mlflow.url
    services.stop_services(services_state_dir, labelstudio=False, mlflow=True)


@pytest.fixture(scope="session")
def label_studio_server(services_state_dir: Path) -> Iterator[services.LabelStudioService]:
    """A live Label Studio: `.url`, `.token()`, `.token_file`, `.image_root` (local-files root)."""
    state = services.ensure_services(
        services_state_dir, labelstudio=True, mlflow=False, template_dir=TEMPLATE
    )
    assert state.label_studio is not None
    yield state.label_studio
    services.stop_services(services_state_dir, labelstudio=True, mlflow=False)


@pytest.fixture(scope="session")
def label_studio_client(
    label_studio_server: services.LabelStudioService, services_state_dir: Path
) -> LabelStudioClient:
    """An admin `LabelStudioClient` for `label_studio_server` (follows it across restarts)."""
    return LabelStudioClient.from_services(services_state_dir)


def restart_label_studio(state_dir: Path) -> services.LabelStudioService:
    """Stop and start the session's Label Studio on the same data dir (and port, when still free)."""
    services.stop_services(state_dir, labelstudio=True, mlflow=False)
    state = services.ensure_services(state_dir, labelstudio=True, mlflow=False, template_dir=TEMPLATE)
    assert state.label_studio is not None
    return state.label_studio
