"""`select --project`, `annotate-bot` and `services status` reach a Label Studio of your own by URL and token.

Each command runs in-process under a state dir of its own (`BAYESCURATE_STATE_DIR`), where no services are
recorded, so only `--label-studio-url` / `$LABEL_STUDIO_URL` with a token can reach the REAL server of the
session; its token is never printed.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from connectors.label_studio import LabelStudioClient
from connectors.label_studio_access import TOKEN_ENV, TOKEN_FILE_ENV, URL_ENV
from connectors.service_state import LabelStudioService
from jobs import annotate_bot, select, services
from jobs.annotate_bot import read_truth
from tests.fixtures_world import World

pytestmark = [pytest.mark.slow, pytest.mark.services]

BUDGET = 4


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state dir with no services in it, and no Label Studio in the environment."""
    state = tmp_path / "elsewhere"
    monkeypatch.setenv("BAYESCURATE_STATE_DIR", str(state))
    for name in (URL_ENV, TOKEN_ENV, TOKEN_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    return state


def _select_args(world: World, out: Path, project: str) -> list[str]:
    return [
        "--pool", str(world.pool), "--targets", str(world.targets), "--posterior", str(world.posterior),
        "--classes", str(world.classes), "--out", str(out), "--project", project, "--budget", str(BUDGET),
        "--draws", "8", "--inline-max-bytes", "1000000", "--no-tracking",
    ]  # fmt: skip


def test_select_and_the_bot_reach_a_server_of_your_own(
    campaign_world: World,
    label_studio_server: LabelStudioService,
    label_studio_client: LabelStudioClient,
    elsewhere: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = label_studio_server.token()
    project = f"own-server-{uuid.uuid4().hex[:8]}"
    args = _select_args(campaign_world, tmp_path / "sel", project)

    # Nothing names a server, and none is recorded here: one line that says how to give one.
    assert select.main(args) == 2
    err = capsys.readouterr().err
    assert (
        "no Label Studio server to talk to" in err and "--label-studio-url" in err and str(elsewhere) in err
    )

    # select: the URL by flag, the token from a file named by flag.
    token_file = tmp_path / "ls-token"
    token_file.write_text(token + "\n")
    os.chmod(token_file, 0o600)
    own = ["--label-studio-url", label_studio_server.url, "--label-studio-token-file", str(token_file)]
    assert select.main([*args, *own]) == 0
    out = capsys.readouterr()
    assert f"Label Studio: {BUDGET} new tasks" in out.out and label_studio_server.url in out.out
    found = label_studio_client.find_project(project)
    assert found is not None and len(label_studio_client.task_ids(found)) == BUDGET

    # annotate-bot: the URL and the token from the environment (a cluster pod's Secret).
    monkeypatch.setenv(URL_ENV, label_studio_server.url)
    monkeypatch.setenv(TOKEN_ENV, token)
    email = f"bot-{uuid.uuid4().hex[:8]}@bayescurate.local"
    bot = ["--project", project, "--truth", str(campaign_world.pool), "--label-column", "shape"]
    bot += ["--email", email]
    assert annotate_bot.main(bot) == 0
    out2 = capsys.readouterr()
    assert f"answered {BUDGET} tasks of {project!r}" in out2.out
    truth = read_truth(str(campaign_world.pool), "shape")
    answers = label_studio_client.annotations(found)
    assert sorted((a.sample_id, a.label) for a in answers) == sorted(
        (sid, truth[sid]) for sid in label_studio_client.task_ids(found)
    )
    # The bot's login lives under this state dir, per server, not next to the session's services.
    assert list((elsewhere / "labelstudio" / "bots").glob(f"*/{email}.json"))
    assert token not in out.out + out.err + out2.out + out2.err


def test_services_status_names_the_server_commands_use_and_checks_its_token(
    label_studio_server: LabelStudioService,
    elsewhere: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert services.main(["status"]) == 0  # nothing recorded, nothing named: not a failure
    assert "no Label Studio server to talk to" in capsys.readouterr().out

    monkeypatch.setenv(URL_ENV, label_studio_server.url)
    monkeypatch.setenv(TOKEN_ENV, label_studio_server.token())
    assert services.main(["status", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert f"{label_studio_server.url} (URL from ${URL_ENV}; token from ${TOKEN_ENV}): healthy" in out
    assert "token accepted" in out and label_studio_server.token() not in out

    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv(TOKEN_ENV, wrong)
    assert services.main(["status", "--no-mlflow"]) == 1
    out = capsys.readouterr().out
    assert "refused the API token" in out and wrong not in out
