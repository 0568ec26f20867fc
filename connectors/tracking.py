"""MLflow tracking for curation projects: one experiment per project, one run per round under a parent run.

Works against the server `bayescurate services up` starts (proxied artifacts) or, with no services, against
a local `sqlite:///` store. Uses `MlflowClient` only (no global "active run"), so trackers are independent
and thread-safe. Parameters and tags whose key looks like a secret are dropped before they leave the process.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from connectors.mlflow_server import ensure_sqlite_db
from pipeline.io import storage

log = logging.getLogger(__name__)

SECRET_KEY = re.compile(r"token|secret|passw|api[_-]?key|credential|auth|private[_-]?key", re.IGNORECASE)
MAX_PARAM_CHARS = 6000  # MLflow's limit on one parameter value


def _drop_secrets(values: Mapping[str, Any], kind: str) -> dict[str, Any]:
    kept = {}
    for key, value in values.items():
        if SECRET_KEY.search(key):
            log.warning("not sending %s %r to MLflow: its name looks like a secret", kind, key)
            continue
        kept[key] = value
    return kept


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested configs become dotted parameter names."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


class Run:
    """One MLflow run; created by `Tracker.run`."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self._client = client
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"Run(run_id={self.run_id!r})"

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) parameters; values are stringified and secret-looking keys dropped."""
        kept = _drop_secrets(flatten(params), "parameter")
        entries = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in kept.items()]
        for start in range(0, len(entries), 100):  # MLflow accepts at most 100 params per batch
            self._client.log_batch(self.run_id, params=entries[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        kept = _drop_secrets(tags, "tag")
        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in kept.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(entries), 1000):
            self._client.log_batch(self.run_id, metrics=entries[start : start + 1000])

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, under `artifact_path`; `path` may be a URI (s3://)."""
        if not storage.is_local(path):  # MLflow uploads local files: read the objects through storage
            _, root = storage.resolve(path)
            files = storage.list_files(path)
            if not files:
                raise FileNotFoundError(f"artifact {os.fspath(path)!r} does not exist or is empty")
            base = root.rstrip("/").rsplit("/", 1)[-1]
            for uri in files:
                inner = storage.resolve(uri)[1]
                rel = base if inner == root else inner[len(root) :].strip("/")
                self.log_bytes(storage.read_bytes(uri), "/".join(p for p in (artifact_path, rel) if p))
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {str(path)!r} does not exist")
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """`obj` as a JSON (or YAML, by extension) artifact named `name`, e.g. "round/metrics.json"."""
        self._client.log_dict(self.run_id, obj, name)

    def log_figure(self, fig: Any, name: str) -> None:
        """A matplotlib figure as an image artifact, e.g. "plots/reliability.png"."""
        self._client.log_figure(self.run_id, fig, name)

    def log_text(self, text: str, name: str) -> None:
        self._client.log_text(self.run_id, text, name)

    def log_bytes(self, data: bytes, name: str) -> None:
        """`data` as the artifact `name`, e.g. "plots/curve.png" (replaces an earlier one of that name)."""
        import tempfile

        folder, _, base = name.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="bc-artifact-") as tmp:
            path = Path(tmp) / base
            storage.write_bytes(path, data)
            self._client.log_artifact(self.run_id, str(path), folder or None)


class Tracker:
    """MLflow experiment `experiment` on `tracking_uri` (an http URL or `sqlite:///path`)."""

    def __init__(
        self, tracking_uri: str | None, experiment: str, *, artifact_root: str | None = None
    ) -> None:
        if not experiment:
            raise ValueError("empty MLflow experiment name")
        # MLflow prints "View run ... at" for every finished run; commands print the URLs that matter.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        uri = tracking_uri or _default_uri()
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            # Without a server, artifacts go next to the database, not to ./mlruns of whatever the cwd is.
            artifact_root = artifact_root or (db.parent / "artifacts").absolute().as_uri()
            ensure_sqlite_db(db, f"{artifact_root}/0")
        self.tracking_uri = uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._ensure_experiment(artifact_root)

    def __repr__(self) -> str:
        return f"Tracker(tracking_uri={self.tracking_uri!r}, experiment={self.experiment!r})"

    @classmethod
    def default(cls, experiment: str, state_dir: Path | str | None = None) -> Tracker:
        """$MLFLOW_TRACKING_URI, else the `bayescurate services` MLflow, else sqlite in the state dir."""
        return cls(_default_uri(state_dir), experiment)

    def _ensure_experiment(self, artifact_root: str | None) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(self.experiment, artifact_location=artifact_root))
        except MlflowException:  # created concurrently by another process
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return str(found.experiment_id)

    @contextmanager
    def run(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent: Run | str | None = None,
        run_id: str | None = None,
    ) -> Iterator[Run]:
        """A run named `name` (nested under `parent`), FINISHED on exit or FAILED on an exception.

        `run_id` resumes an existing run (a restarted round keeps logging to the same run).
        """
        all_tags = dict(tags or {})
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id if isinstance(parent, Run) else parent
        if run_id is None:
            created = self.client.create_run(
                self.experiment_id,
                run_name=name,
                tags={k: str(v) for k, v in _drop_secrets(all_tags, "tag").items()},
            )
            run = Run(self.client, created.info.run_id)
        else:
            run = Run(self.client, run_id)
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            if all_tags:
                run.set_tags(all_tags)
        if params:
            run.log_params(params)
        try:
            yield run
        except BaseException:
            self.client.set_terminated(run.run_id, status=RunStatus.to_string(RunStatus.FAILED))
            raise
        self.client.set_terminated(run.run_id, status=RunStatus.to_string(RunStatus.FINISHED))

    def open_run(
        self,
        name: str,
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent: str | None = None,
    ) -> Run:
        """The run named `name` (under `parent`), created RUNNING if there is none yet; left open.

        For runs that outlive one process (a campaign, an annotation round): find-or-create makes a resumed
        step log to the same run; `finish` ends it.
        """
        found = self.find_run(name, parent)
        if found is not None:
            run = Run(self.client, found)
            if tags:
                run.set_tags(tags)
            return run
        all_tags = dict(tags or {})
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent
        created = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={k: str(v) for k, v in _drop_secrets(all_tags, "tag").items()},
        )
        run = Run(self.client, created.info.run_id)
        if params:
            run.log_params(params)
        return run

    def finish(self, run_id: str, failed: bool = False) -> None:
        status = RunStatus.FAILED if failed else RunStatus.FINISHED
        self.client.set_terminated(run_id, status=RunStatus.to_string(status))

    def ui_url(self, run_id: str | None = None) -> str | None:
        """The MLflow UI page of the experiment's runs (or of one run); None without an http server."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        base = f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}"
        return f"{base}/runs/{run_id}" if run_id else f"{base}/runs"

    def find_run(self, name: str, parent: Run | str | None = None) -> str | None:
        """Id of the latest run named `name` (under `parent` if given), to resume it after a restart."""
        query = f"attributes.run_name = '{name}'"
        if parent is not None:
            parent_id = parent.run_id if isinstance(parent, Run) else parent
            query += f" and tags.mlflow.parentRunId = '{parent_id}'"
        runs = self.client.search_runs([self.experiment_id], query, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None


def _default_uri(state_dir: Path | str | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    from connectors.service_state import running_mlflow_url

    url = running_mlflow_url(state_dir)
    if url is not None:
        return url
    return local_tracking_uri(state_dir)


def local_tracking_uri(state_dir: Path | str | None = None) -> str:
    """Server-less tracking: the sqlite database the local MLflow server would use, in the state dir."""
    from connectors.service_state import default_state_dir

    root = Path(state_dir).absolute() if state_dir is not None else default_state_dir()
    return f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
