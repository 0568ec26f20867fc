"""A simulated annotator that answers through Label Studio the way a person in the browser does.

The bot is a real Label Studio user: it signs up through the organisation's invite link (as an invited person
does), keeps the browser session (cookie + CSRF token) and submits annotations with the same API calls the
labelling UI sends.
Tests and the demo use it to close the loop without mocking the server.
"""

from __future__ import annotations

import secrets
from typing import Any

import requests

from connectors.label_studio import FROM_NAME, TO_NAME, LabelStudioClient, LabelStudioError


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
    def create(cls, client: LabelStudioClient, email: str) -> BotAnnotator:
        """Sign up a new user `email` via `client`'s organisation invite link; returns it logged in."""
        invite = client.sdk.organizations.invites.get_invite_link()
        bot = cls(client.url, email)
        bot._form(f"/user/signup/?token={invite.token}", password=secrets.token_urlsafe(16))
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

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        response = self._session.post(
            f"{self.url}{path}",
            json=payload,
            headers={"X-CSRFToken": self._session.cookies.get("csrftoken", ""), "Referer": self.url + "/"},
            timeout=self.timeout,
        )
        if response.status_code >= 400:
            raise LabelStudioError(
                f"bot {self.email!r}: POST {path} -> HTTP {response.status_code}: {response.text}"
            )
        return response.json()  # type: ignore[no-any-return]

    def annotate(self, task_id: int, label: str, lead_time: float = 2.0) -> int:
        """Submit `label` for the task, as the Submit button does; returns the annotation id."""
        region = {
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "type": "choices",
            "value": {"choices": [label]},
        }
        body = self._post(f"/api/tasks/{task_id}/annotations/", {"result": [region], "lead_time": lead_time})
        return int(body["id"])

    def skip(self, task_id: int) -> int:
        """Skip the task, as the Skip button does (a cancelled annotation, not a label)."""
        body = self._post(f"/api/tasks/{task_id}/annotations/", {"result": [], "was_cancelled": True})
        return int(body["id"])
