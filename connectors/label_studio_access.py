"""Which Label Studio server a command talks to, and with which API token: one resolution for every command.

`select --project`, `campaign`, `annotate-bot` and `services status` all call `resolve`:

    URL     --label-studio-url  >  the services of a --state-dir you name  >  $LABEL_STUDIO_URL
            >  the local services (`bayescurate services up`, in $BAYESCURATE_STATE_DIR or ./.state)
    token   for a URL of your own: --label-studio-token-file  >  $LABEL_STUDIO_API_KEY
            >  $LABEL_STUDIO_API_KEY_FILE  >  the local services' token file when the URL is theirs;
            for the local services: their own 0600 token file

What you name in the command (a flag or its YAML key) beats the environment, which beats the default. The
token is read here and handed to the client only: it is never in a repr, a log line, an error message or an
MLflow parameter, and a URL carrying a user or password is refused. `describe()` says where both came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from connectors.service_state import LabelStudioService, read_state

if TYPE_CHECKING:  # the client imports label-studio-sdk: only when one is built
    from connectors.label_studio import LabelStudioClient

URL_ENV = "LABEL_STUDIO_URL"  # the server's base URL, e.g. https://label-studio.example.com
TOKEN_ENV = "LABEL_STUDIO_API_KEY"  # its API token (the variable label-studio-sdk itself reads)
TOKEN_FILE_ENV = "LABEL_STUDIO_API_KEY_FILE"  # a file holding the token (a mounted Secret, a 0600 file)
URL_FLAG = "--label-studio-url"
TOKEN_FILE_FLAG = "--label-studio-token-file"


class NoLabelStudio(FileNotFoundError):
    """Nothing names a server and no local services are recorded."""


@dataclass(frozen=True)
class LabelStudioTarget:
    """A resolved server: its URL, where the URL and the token came from, and the local services' record
    when the server is theirs (its local-files root; a client that follows a restart to another port)."""

    url: str
    url_from: str  # e.g. "--label-studio-url", "$LABEL_STUDIO_URL", "the services in /path/.state"
    token_from: str  # e.g. "$LABEL_STUDIO_API_KEY", "the file /run/secrets/ls (--label-studio-token-file)"
    services: LabelStudioService | None = None
    state_dir: Path | None = None  # the services' state dir when they are used as they are
    _token: str | None = field(default=None, repr=False, compare=False)  # None: the services' token file

    @property
    def image_root(self) -> str | None:
        """Label Studio's local-files root when it is the local services' server (else unknown here)."""
        return self.services.image_root if self.services is not None else None

    def describe(self) -> str:
        """One line for people: the URL and where it and the token came from (never the token)."""
        return f"{self.url} (URL from {self.url_from}; token from {self.token_from})"

    def client(self, **kwargs: Any) -> LabelStudioClient:
        """A `LabelStudioClient` for this server (`kwargs`: its timeouts and retries)."""
        from connectors.label_studio import LabelStudioClient

        if self._token is None:
            client = LabelStudioClient.from_services(self.state_dir, **kwargs)
        else:
            client = LabelStudioClient(self.url, self._token, **kwargs)
        client.token_from = self.token_from
        return client


def resolve(
    url: str | None = None,
    token_file: str | None = None,
    state_dir: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> LabelStudioTarget:
    """The server and token a command uses, in the order of the module docstring.

    `url`, `token_file`: the command's `--label-studio-url`, `--label-studio-token-file`; `state_dir`: its
    `--state-dir` (None: `$BAYESCURATE_STATE_DIR` or ./.state, which the environment's URL overrides).
    """
    env = os.environ if environ is None else environ
    url = (url or "").strip()
    url_from = URL_FLAG
    if not url and state_dir is None:
        url, url_from = env.get(URL_ENV, "").strip(), f"${URL_ENV}"
    if not url:
        if token_file:
            raise ValueError(
                f"{TOKEN_FILE_FLAG} {token_file!r} is the token of a server of your own: "
                f"name the server too ({URL_FLAG} or ${URL_ENV})"
            )
        return _local_services(state_dir)
    _check_url(url, url_from)
    url = url.rstrip("/")
    local = read_state(state_dir).label_studio
    local = local if local is not None and local.url.rstrip("/") == url else None
    token, token_from = _token(url, url_from, token_file, env, local)
    return LabelStudioTarget(url, url_from, token_from, services=local, _token=token)


def _local_services(state_dir: Path | str | None) -> LabelStudioTarget:
    state = read_state(state_dir)
    ls = state.label_studio
    if ls is None:
        raise NoLabelStudio(
            "no Label Studio server to talk to: pass "
            f"{URL_FLAG} (or set ${URL_ENV}) with its API token in ${TOKEN_ENV}, ${TOKEN_FILE_ENV} or "
            f"{TOKEN_FILE_FLAG}; or start the local one with `bayescurate services up` (none is recorded "
            f"in {state.state_dir})"
        )
    where = f"the services in {state.state_dir}"
    return LabelStudioTarget(
        ls.url, where, f"the services' token file {ls.token_file}", services=ls, state_dir=state.state_dir
    )


def _check_url(url: str, url_from: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # the value is shown: a URL without a user or password holds no secret
        shown = url if "@" not in url else "(a URL with a user or password)"
        raise ValueError(f"{url_from} must be an http(s) URL of a Label Studio server, got {shown!r}")
    if parts.username or parts.password:
        raise ValueError(
            f"{url_from} carries a user or password: give the URL without them and the API token in "
            f"${TOKEN_ENV}, ${TOKEN_FILE_ENV} or {TOKEN_FILE_FLAG}"
        )


def _token(
    url: str,
    url_from: str,
    token_file: str | None,
    env: Mapping[str, str],
    local: LabelStudioService | None,
) -> tuple[str, str]:
    """(token, where it came from) for a URL named by a flag or the environment."""
    if token_file:
        return _read_token_file(token_file, TOKEN_FILE_FLAG), f"the file {token_file} ({TOKEN_FILE_FLAG})"
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    path = env.get(TOKEN_FILE_ENV, "").strip()
    if path:
        return _read_token_file(path, f"${TOKEN_FILE_ENV}"), f"the file {path} (${TOKEN_FILE_ENV})"
    if local is not None:
        where = f"the services' token file {local.token_file}"
        return _read_token_file(local.token_file, "the services"), where
    raise ValueError(
        f"Label Studio at {url} (from {url_from}) needs an API token: set ${TOKEN_ENV}, or point "
        f"${TOKEN_FILE_ENV} or {TOKEN_FILE_FLAG} at a file holding it"
    )


def _read_token_file(path: str, named_by: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"the Label Studio token file {str(file)!r} ({named_by}) does not exist")
    token = file.read_text().strip()
    if not token:
        raise ValueError(f"the Label Studio token file {str(file)!r} ({named_by}) is empty")
    return token
