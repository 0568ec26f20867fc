"""Which Label Studio a command uses: flag > a named state dir > environment > token file > local services.

The resolution is tested on recorded (not running) services: resolving sends nothing. `tests/jobs/
test_label_studio_commands.py` runs the commands against the REAL server through the same function.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connectors.label_studio_access import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    TOKEN_FILE_FLAG,
    URL_ENV,
    URL_FLAG,
    NoLabelStudio,
    resolve,
)
from connectors.processes import ProcessRecord
from connectors.service_state import LabelStudioService, ServicesState, write_state

SECRET = "s3cret-token-never-shown"


def _file(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    os.chmod(path, 0o600)
    return str(path)


def _services(state_dir: Path, url: str = "http://127.0.0.1:18080") -> LabelStudioService:
    """A Label Studio recorded in `state_dir` as `services up` records one (no process behind it)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    service = LabelStudioService(
        url=url,
        port=int(url.rsplit(":", 1)[1]),
        process=ProcessRecord(pid=1, start_time=0, log=str(state_dir / "ls.log")),
        data_dir=str(state_dir / "data"),
        token_file=_file(state_dir / "token", "services-token"),
        admin_file=str(state_dir / "admin.json"),
        image_root=str(state_dir / "images"),
    )
    write_state(ServicesState(state_dir=state_dir, label_studio=service))
    return service


@pytest.fixture
def empty_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default state dir, with nothing recorded in it."""
    state = tmp_path / "empty-state"
    monkeypatch.setenv("BAYESCURATE_STATE_DIR", str(state))
    return state


def test_the_flag_beats_the_environment_and_the_token_file_flag_beats_the_variables(
    tmp_path: Path, empty_state: Path
) -> None:
    flag_file = _file(tmp_path / "flag-token", "from-the-flag-file")
    env = {URL_ENV: "http://env.example:2", TOKEN_ENV: "from-the-env", TOKEN_FILE_ENV: flag_file + ".x"}
    target = resolve("http://flag.example:1/", flag_file, environ=env)
    assert (target.url, target.url_from) == ("http://flag.example:1", URL_FLAG)
    assert target.client().sdk is not None and TOKEN_FILE_FLAG in target.token_from
    assert target.client()._token == "from-the-flag-file"

    target = resolve(None, None, environ=env)
    assert (target.url, target.url_from, target.token_from) == (
        "http://env.example:2",
        f"${URL_ENV}",
        f"${TOKEN_ENV}",
    )
    assert target.services is None and target.image_root is None  # a server of your own: root unknown

    env_file = _file(tmp_path / "env-token", "from-the-env-file")
    target = resolve(None, None, environ={URL_ENV: "https://env.example", TOKEN_FILE_ENV: env_file})
    assert target.token_from == f"the file {env_file} (${TOKEN_FILE_ENV})"
    assert target.client()._token == "from-the-env-file"


def test_the_local_services_are_the_default_and_a_named_state_dir_beats_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default, named = tmp_path / "default", tmp_path / "named"
    local = _services(default)
    other = _services(named, "http://127.0.0.1:18081")
    monkeypatch.setenv("BAYESCURATE_STATE_DIR", str(default))

    target = resolve(environ={})
    assert (target.url, target.services, target.image_root) == (local.url, local, local.image_root)
    assert target.token_from == f"the services' token file {local.token_file}"
    assert target.client().url == local.url and target.client()._token == "services-token"

    env = {URL_ENV: "http://env.example:2", TOKEN_ENV: "from-the-env"}
    assert resolve(environ=env).url == "http://env.example:2"  # the environment beats the default
    assert resolve(state_dir=named, environ=env).url == other.url  # a state dir you name beats it
    assert resolve("http://flag.example:1", state_dir=named, environ=env).url == "http://flag.example:1"

    # Your URL is the local services' one: their token file serves when no other token is given.
    target = resolve(local.url, environ={})
    assert (target.services, target.token_from) == (local, f"the services' token file {local.token_file}")
    assert resolve(local.url, environ={TOKEN_ENV: "mine"}).token_from == f"${TOKEN_ENV}"


def test_nothing_reachable_names_every_way_to_give_a_server(empty_state: Path) -> None:
    with pytest.raises(NoLabelStudio) as nothing:
        resolve(environ={TOKEN_ENV: SECRET})  # a token alone names no server
    message = str(nothing.value)
    for way in (URL_FLAG, f"${URL_ENV}", f"${TOKEN_ENV}", f"${TOKEN_FILE_ENV}", TOKEN_FILE_FLAG):
        assert way in message
    assert "bayescurate services up" in message and str(empty_state) in message
    assert SECRET not in message
    assert isinstance(nothing.value, FileNotFoundError)  # a user error: one line, exit code 2


def test_a_server_of_your_own_needs_a_token_and_a_clean_url(tmp_path: Path, empty_state: Path) -> None:
    with pytest.raises(
        ValueError, match=rf"http://mine.example:8080 \(from \${URL_ENV}\) needs an API token"
    ):
        resolve(environ={URL_ENV: "http://mine.example:8080"})
    with pytest.raises(ValueError, match=f"{TOKEN_FILE_FLAG} .* name the server too"):
        resolve(None, str(tmp_path / "t"), environ={})
    with pytest.raises(ValueError, match=f"{URL_FLAG} must be an http"):
        resolve("label-studio:8080", environ={TOKEN_ENV: "t"})
    with pytest.raises(ValueError, match="carries a user or password") as userinfo:
        resolve(f"https://admin:{SECRET}@ls.example", environ={TOKEN_ENV: "t"})
    assert SECRET not in str(userinfo.value)
    with pytest.raises(FileNotFoundError, match=rf"token file .*missing. \(\${TOKEN_FILE_ENV}\) does not"):
        resolve(environ={URL_ENV: "http://x.example", TOKEN_FILE_ENV: str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="is empty"):
        resolve("http://x.example", _file(tmp_path / "empty", "  "), environ={})


def test_the_token_is_in_no_repr_description_or_error(tmp_path: Path, empty_state: Path) -> None:
    token_file = _file(tmp_path / "token", SECRET)
    target = resolve("http://x.example", token_file, environ={})
    client = target.client()
    shown = [repr(target), str(target), target.describe(), repr(client), client.token_from]
    assert not [text for text in shown if SECRET in text]
    assert target.describe() == f"http://x.example (URL from {URL_FLAG}; token from {target.token_from})"
