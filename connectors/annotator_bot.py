"""A simulated annotator that answers through Label Studio the way a person in the browser does.

The bot is a real Label Studio user: it signs up through the organisation's invite link (as an invited person
does), keeps the browser session (cookie + CSRF token) and submits, skips and edits annotations with the same
API calls the labelling UI sends. `answer_open_tasks` lets it work through a project from a ground truth, so
tests and simulated campaigns close the loop without mocking the server.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests

from connectors.label_studio import (
    FROM_NAME,
    TO_NAME,
    LabelStudioClient,
    LabelStudioError,
    Project,
)


class BotAnnotator:
    """A logged-in Label Studio user session that labels tasks."""

    def __init__(self, url: str, email: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.email = email
        self.timeout = timeout
        self._session = requests.Session()

    def __repr__(self) -> str:
        return f"BotAnnotator(url={self.url!r}, email={self.email!r})"

    @classmethod
    def create(cls, client: LabelStudioClient, email: str, *, password: str | None = None) -> BotAnnotator:
        """Sign up a new user `email` via `client`'s organisation invite link; returns it logged in.

        `password`: the new user's (default: random, for a bot that never logs in again).
        """
        invite = client.sdk.organizations.invites.get_invite_link()
        bot = cls(client.url, email)
        bot._form(f"/user/signup/?token={invite.token}", password=password or secrets.token_urlsafe(16))
        return bot

    def login(self, password: str) -> None:
        """Log in an existing user through the login form."""
        self._form("/user/login/", password=password)

    def _form(self, path: str, password: str) -> None:
        """GET a form for its CSRF cookie, POST it; success is Django's redirect after login/signup."""
        url = f"{self.url}{path}"
        self._session.get(url, timeout=self.timeout).raise_for_status()
        csrf = self._session.cookies.get("csrftoken", "")
        response = self._session.post(
            url,
            data={"email": self.email, "password": password, "csrfmiddlewaretoken": csrf},
            headers={"Referer": url},
            timeout=self.timeout,
            allow_redirects=False,
        )
        if response.status_code != 302:
            raise LabelStudioError(f"bot {self.email!r}: {path.split('?')[0]} at {self.url} was refused")

    def _send(self, method: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        response = self._session.request(
            method,
            f"{self.url}{path}",
            json=payload,
            headers={"X-CSRFToken": self._session.cookies.get("csrftoken", ""), "Referer": self.url + "/"},
            timeout=self.timeout,
        )
        if response.status_code >= 400:
            raise LabelStudioError(
                f"bot {self.email!r}: {method} {path} at {self.url} -> HTTP {response.status_code}: "
                f"{response.text[:500]}"
            )
        return response.json()  # type: ignore[no-any-return]

    def annotate(self, task_id: int, label: str, lead_time: float = 2.0) -> int:
        """Submit `label` for the task, as the Submit button does; returns the annotation id."""
        body = self._send(
            "POST", f"/api/tasks/{task_id}/annotations/", {"result": [_region(label)], "lead_time": lead_time}
        )
        return int(body["id"])

    def skip(self, task_id: int) -> int:
        """Skip the task, as the Skip button does (a cancelled annotation, not a label)."""
        body = self._send("POST", f"/api/tasks/{task_id}/annotations/", {"result": [], "was_cancelled": True})
        return int(body["id"])

    def update(self, annotation_id: int, label: str, lead_time: float | None = None) -> int:
        """Change a submitted annotation to `label`, as the Update button does (PATCH); Label Studio moves
        its `updated_at` and keeps `created_at`. Returns the annotation id."""
        payload: dict[str, Any] = {"result": [_region(label)], "was_cancelled": False}
        if lead_time is not None:
            payload["lead_time"] = lead_time
        body = self._send("PATCH", f"/api/annotations/{annotation_id}/", payload)
        return int(body["id"])


@dataclass(frozen=True)
class AnswerCounts:
    """What one `answer_open_tasks` run did."""

    answered: int  # labels submitted (right or wrong)
    skipped: int  # tasks skipped
    wrong: int  # of `answered`, how many were not the ground truth (noise)
    missing: int = 0  # open tasks whose sample id the ground truth lacks (left open)


def answer_open_tasks(
    bot: BotAnnotator,
    client: LabelStudioClient,
    project: Project,
    truth: Mapping[str, str],
    *,
    noise: float = 0.0,
    skip: float = 0.0,
    delay: float = 0.0,
    seed: int = 0,
    limit: int | None = None,
) -> AnswerCounts:
    """Answer the project's open tasks from the ground truth `truth` (sample_id -> label), in task order.

    Open: neither answered nor skipped by this bot, and not labelled by anyone else, so a re-run (or a run
    after a crash) never answers a task twice. Each task skips with probability `skip`, else gets a wrong
    label with probability `noise` (uniform over the other classes); the draws depend only on `seed` and the
    sample id, so a re-run makes the same choices whatever was done before. `delay`: seconds between
    answers; `limit`: at most this many answers (labels and skips) in this run.
    """
    if not 0.0 <= noise <= 1.0 or not 0.0 <= skip <= 1.0:
        raise ValueError(f"noise ({noise}) and skip ({skip}) must be probabilities in [0, 1]")
    if delay < 0 or (limit is not None and limit < 0):
        raise ValueError(f"delay ({delay}) and limit ({limit}) must not be negative")
    strangers = sorted({label for label in truth.values() if label not in project.classes})
    if strangers:
        raise ValueError(f"ground-truth labels {strangers} are not classes of project {project.title!r}")
    closed = {
        r.task_id
        for r in client.annotations(project)
        if r.annotator.lower() == bot.email.lower() or (not r.cancelled and r.label is not None)
    }
    open_tasks = sorted((tid, sid) for sid, tid in client.task_ids(project).items() if tid not in closed)
    answered = skipped = wrong = missing = 0
    for task_id, sample_id in open_tasks:
        if limit is not None and answered + skipped >= limit:
            break
        if sample_id not in truth:
            missing += 1
            continue
        if answered + skipped and delay:
            time.sleep(delay)
        rng = random.Random(f"{seed}:{sample_id}")  # str seeds are stable across processes
        skip_draw, noise_draw = rng.random(), rng.random()
        if skip_draw < skip:
            bot.skip(task_id)
            skipped += 1
            continue
        label = truth[sample_id]
        others = [c for c in project.classes if c != label]
        if others and noise_draw < noise:
            label = rng.choice(others)
            wrong += 1
        bot.annotate(task_id, label)
        answered += 1
    return AnswerCounts(answered=answered, skipped=skipped, wrong=wrong, missing=missing)


def _region(label: str) -> dict[str, Any]:
    return {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}
