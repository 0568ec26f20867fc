"""A machine that never ran bayescurate: every cache and template the project keeps is built from nothing.

The MLflow database template lives in the cache dir and Label Studio's migrated data dir under the state
dir; both must be created when absent, also by two processes at once, and `services up` must work with
neither there.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from connectors import services
from connectors.mlflow_server import cache_dir, ensure_sqlite_db
from jobs.services import main

ROOT = Path(__file__).resolve().parents[2]


def _default_artifacts(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(
            conn.execute("SELECT artifact_location FROM experiments WHERE experiment_id = 0").fetchone()[0]
        )


def test_mlflow_database_is_built_from_an_empty_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache" / "not-yet-made"
    monkeypatch.setenv("BAYESCURATE_CACHE_DIR", str(cache))
    assert cache_dir() == cache and not cache.exists()
    db = tmp_path / "a" / "mlflow.db"
    ensure_sqlite_db(db, "file:///tmp/a")
    assert _default_artifacts(db) == "file:///tmp/a"
    templates = sorted(p.name for p in cache.iterdir() if p.suffix == ".db")
    assert len(templates) == 1 and templates[0].startswith("mlflow-")
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # no half-built leftovers
    # The second database is a copy of the cached template, with its own artifact location.
    other = tmp_path / "b" / "mlflow.db"
    ensure_sqlite_db(other, "mlflow-artifacts:/0")
    assert _default_artifacts(other) == "mlflow-artifacts:/0"
    assert _default_artifacts(db) == "file:///tmp/a"  # an existing database is left as it was


def test_two_processes_build_the_template_at_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code = (
        "import sys; from pathlib import Path; from connectors.mlflow_server import ensure_sqlite_db; "
        "ensure_sqlite_db(Path(sys.argv[1]), 'file:///x')"
    )
    env = {"BAYESCURATE_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / f"db{i}" / "mlflow.db")], cwd=ROOT, env=env
        )
        for i in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    for i in range(2):
        assert _default_artifacts(tmp_path / f"db{i}" / "mlflow.db") == "file:///x"
    assert len([p for p in cache.iterdir() if p.suffix == ".db"]) == 1


@pytest.mark.slow
@pytest.mark.services
def test_services_up_with_empty_cache_and_state_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`services up` (the demo's first step) with no MLflow template and no Label Studio data dir."""
    state_dir, cache = tmp_path / "state", tmp_path / "cache"
    monkeypatch.setenv("BAYESCURATE_STATE_DIR", str(state_dir))
    monkeypatch.setenv("BAYESCURATE_CACHE_DIR", str(cache))
    try:
        assert main(["up"]) == 0
        state = services.read_state()
        assert state.mlflow is not None and state.label_studio is not None
        assert services.service_status()["mlflow"]["healthy"]
        assert services.service_status()["label_studio"]["healthy"]
        assert (state_dir / "labelstudio" / "template" / ".bayescurate-template").is_file()
        assert any(p.suffix == ".db" for p in cache.iterdir())
    finally:
        assert main(["down"]) == 0
    capsys.readouterr()
