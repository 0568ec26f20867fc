"""`campaign serve`: Label Studio's annotation webhooks step the campaign, so a round trains when answered.

Label Studio posts `ANNOTATION_CREATED`, `ANNOTATION_UPDATED`, `ANNOTATIONS_CREATED` (many at once: the Data
Manager's "Create Annotations From Predictions") and `ANNOTATIONS_DELETED` to `POST /webhook` during the
request that made the change, and waits at most a second for the answer. A request is therefore only checked
and acknowledged (202): the shared secret in `X-Bayescurate-Secret` (else 403, and nothing happens), a JSON
body with an `action` and its payload (else 400), the campaign's project (else 202 and ignored).
The work happens in one stepper thread:
- an accepted event sets `pending` and wakes the stepper; the stepper clears `pending`, then runs
  `campaign.step`, which holds the campaign's lease like `campaign step` does (one stepper at a time,
  across processes too). A step while the round still waits only re-counts its answers and returns.
- events that arrive while a step runs set `pending` again, so one more step follows right after: any
  number of events during a step coalesce into one re-check, and none is lost.
- a step refused (another process holds the lease) or failed (Label Studio unreachable after the client's
  retries) is retried after `retry_s`; the server keeps serving.
- one step at start catches up on events sent while nothing listened; `interval_s` adds a periodic one.
`GET /health` answers probes without the secret. HTTP requests run in short-lived threads of their own.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

from connectors.label_studio import WEBHOOK_PAYLOADS, LabelStudioError
from pipeline.rounds import campaign, lease
from pipeline.rounds.config import LabelSource
from pipeline.rounds.layout import project_name, read_config
from pipeline.rounds.webhook import MIN_SECRET, SECRET_HEADER

logger = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhook"
HEALTH_PATH = "/health"
MAX_BODY = 16 * 2**20  # bytes; a payload carries one task's data (inline images included)

Log = Callable[[str], None]


@dataclass
class ServeStats:
    """What the server has seen and done (the body of `GET /health`, less its status)."""

    events: Counter[str] = field(default_factory=Counter)  # accepted events per action
    refused: int = 0  # requests without the right secret (403)
    malformed: int = 0  # authenticated requests with a bad body (400)
    ignored: int = 0  # authenticated events of another project or action
    steps: int = 0  # steps run to the end
    failures: int = 0  # steps that failed (Label Studio unreachable, ...) or found the lease held
    last_step_at: str | None = None  # when the last step ended (UTC)
    last_error: str | None = None  # why the last step failed (cleared by a step that succeeds)
    waiting: str | None = None  # what the campaign waits for, after the last step
    finished: str | None = None  # why no further round starts, after the last step


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never holds up the exit
    app: WebhookServer


class _Handler(BaseHTTPRequestHandler):
    server_version = "bayescurate-campaign-serve"
    timeout = 30  # seconds a client may take to send its request

    @property
    def app(self) -> WebhookServer:
        return cast(_HTTPServer, self.server).app

    def do_GET(self) -> None:
        if urlsplit(self.path).path != HEALTH_PATH:
            self._reply(404, {"error": f"not found; GET {HEALTH_PATH} or POST {WEBHOOK_PATH}"})
            return
        status, body = self.app.health()
        self._reply(status, body)

    def do_POST(self) -> None:
        if urlsplit(self.path).path != WEBHOOK_PATH:
            self._reply(404, {"error": f"not found; Label Studio posts to {WEBHOOK_PATH}"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        # Read before refusing: closing a socket with unread data resets it, and the 403 could be lost.
        try:
            body = self.rfile.read(length) if 0 <= length <= MAX_BODY else None
        except OSError:  # the client went away, or took longer than `timeout`
            self.close_connection = True
            return
        client = self.client_address[0]
        if not self.app.authorized(self.headers.get(SECRET_HEADER), client):
            self._reply(403, {"error": f"missing or wrong {SECRET_HEADER} header"})
        elif body is None and length > MAX_BODY:
            self._reply(413, {"error": f"the body has {length} bytes, more than {MAX_BODY}"})
        elif body is None:
            self._reply(400, {"error": "a webhook needs a Content-Length"})
        else:
            self._reply(*self.app.handle(body, client))

    def _reply(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # the app logs what matters, once
        pass


class WebhookServer:
    """The webhook endpoint of one campaign and its stepper thread; `start()`, then `close()`."""

    def __init__(
        self,
        directory: str,
        secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        retry_s: float = 10.0,
        interval_s: float | None = None,
        log: Log = print,
    ) -> None:
        """`port` 0: any free port (see `url`). `retry_s`: step again this long after a refused or failed
        step. `interval_s`: also step this often without events (None: on events and at start only)."""
        cfg = read_config(directory)  # no campaign there: fail now, not at the first event
        if cfg.label_source is not LabelSource.LABEL_STUDIO:
            raise ValueError(
                f"campaign {directory!r} takes its labels from {cfg.label_source.value}: only a Label "
                "Studio campaign has webhooks to serve"
            )
        if len(secret) < MIN_SECRET:
            raise ValueError(f"the webhook secret must have at least {MIN_SECRET} characters")
        if retry_s <= 0 or (interval_s is not None and interval_s <= 0):
            raise ValueError(f"retry_s ({retry_s}) and interval_s ({interval_s}) must be positive")
        self.directory = directory
        self.project = project_name(cfg, directory)
        self.webhook = cfg.webhook  # the URL `campaign init --webhook` registered, if any
        self.retry_s = retry_s
        self.interval_s = interval_s
        self.stats = ServeStats()
        self._secret = secret.encode()
        self._log = log
        self._cond = threading.Condition()
        self._pending = False  # an event (or the start) asks for a step
        self._stepping = False
        self._stopping = False
        self._due: float | None = None  # monotonic time of a step owed without an event (retry, interval)
        try:
            self._http = _HTTPServer((host, port), _Handler)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port} for campaign {directory!r}: {exc}") from None
        self._http.app = self
        self._threads = [
            threading.Thread(target=self._http.serve_forever, name="campaign-serve-http", daemon=True),
            threading.Thread(target=self._stepper, name="campaign-serve-step", daemon=True),
        ]

    def __repr__(self) -> str:  # never the secret
        return f"WebhookServer(directory={self.directory!r}, url={self.url!r})"

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def start(self) -> WebhookServer:
        """Serve in background threads; the first step catches up on events sent while none listened."""
        self.trigger()
        for thread in self._threads:
            thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop serving, then wait for a running step to end (None: however long it takes; it is crash-safe,
        so a process killed meanwhile loses nothing)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._threads[0].is_alive():
            self._http.shutdown()
        self._http.server_close()
        if self._threads[1].is_alive():
            self._threads[1].join(timeout)

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------------
    def authorized(self, secret: str | None, client: str = "?") -> bool:
        """Whether a request carries the shared secret (compared in constant time); counts refusals."""
        if secret is not None and hmac.compare_digest(secret.encode(), self._secret):
            return True
        with self._cond:
            self.stats.refused += 1
        self._log(f"refused a webhook from {client}: missing or wrong {SECRET_HEADER} header")
        return False

    def handle(self, body: bytes, client: str = "?") -> tuple[int, dict[str, Any]]:
        """Status and JSON reply for the body of an authorized POST to the webhook path."""
        try:
            event = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return self._malformed(client, f"the body is not JSON ({exc})")
        if not isinstance(event, dict) or not isinstance(event.get("action"), str):
            return self._malformed(client, "the body is not a JSON object with a string `action`")
        action: str = event["action"]
        project = event.get("project")
        if project is not None and not isinstance(project, dict):
            return self._malformed(client, f"`project` of {action} is not an object")
        if action not in WEBHOOK_PAYLOADS or (project and project.get("title") != self.project):
            with self._cond:
                self.stats.ignored += 1
            what = f"project {project.get('title')!r}" if project else "any project"
            return 202, {"ignored": f"{action} of {what}: this server steps project {self.project!r}"}
        key, kind = WEBHOOK_PAYLOADS[action]  # what `campaign init --webhook` subscribed to
        if not isinstance(event.get(key), kind):
            return self._malformed(
                client, f"{action} without {'an object' if kind is dict else 'a list'} {key!r}"
            )
        with self._cond:
            self.stats.events[action] += 1
            stepping = self._stepping
        self._log(
            f"{action} in {self.project!r}" + ("; a step runs, one more follows it" if stepping else "")
        )
        self.trigger()
        return 202, {"accepted": action, "step": "after the running one" if stepping else "now"}

    def _malformed(self, client: str, why: str) -> tuple[int, dict[str, Any]]:
        with self._cond:
            self.stats.malformed += 1
        self._log(f"malformed webhook from {client}: {why}")
        return 400, {"error": why}

    def health(self) -> tuple[int, dict[str, Any]]:
        """200 while both threads run (whatever the last step did: probes should not restart a server for
        a Label Studio outage), else 503."""
        with self._cond:
            stats = vars(self.stats) | {"events": dict(self.stats.events)}
            busy = {"stepping": self._stepping, "pending": self._pending}
        up = self.alive and not self._stopping
        body = {"status": "UP" if up else "DOWN", "campaign": self.directory, "project": self.project}
        return (200 if up else 503), body | busy | stats

    # -- stepping ------------------------------------------------------------------------------------
    def trigger(self) -> None:
        """Ask for a step: now when idle, right after the running one otherwise (coalesced)."""
        with self._cond:
            self._pending = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no step runs or is pending (owed retries aside); False when `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._stepping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _stepper(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._pending:
                    left = None if self._due is None else self._due - time.monotonic()
                    if left is not None and left <= 0:
                        self._pending = True
                        break
                    self._cond.wait(left)
                if self._stopping:
                    return
                self._pending, self._due, self._stepping = False, None, True
            try:
                retry = self._step()
            finally:
                with self._cond:
                    self._stepping = False
                    again = self.retry_s if retry else self.interval_s
                    if again is not None:
                        self._due = time.monotonic() + again
                    self._cond.notify_all()

    def _step(self) -> bool:
        """One `campaign.step`; True when it must be retried (lease held, or it failed)."""
        try:
            report = campaign.step(self.directory, log=self._log)
        except lease.LeaseHeld as held:
            why = f"busy: {held}"
        except LabelStudioError as exc:
            why = f"Label Studio failed: {exc}"
        except Exception as exc:  # the server outlives any one step; the traceback goes to the log
            logger.exception("campaign %s: the step failed", self.directory)
            why = f"{type(exc).__name__}: {exc}"
        else:
            with self._cond:
                self.stats.steps += 1
                self.stats.last_step_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
                self.stats.last_error = None
                self.stats.waiting, self.stats.finished = report.waiting, report.finished
            return False
        with self._cond:
            self.stats.failures += 1
            self.stats.last_error = why
        self._log(f"step not done: {why}; stepping again in {self.retry_s:g} s")
        return True
