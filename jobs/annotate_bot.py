"""`bayescurate annotate-bot`: a simulated annotator that answers a project's open tasks from ground truth.

It is a real Label Studio user (signed up through the organisation's invite link, its password kept in a
0600 file under the services state dir) submitting through the same API as the labelling UI, so a
campaign collects its answers exactly as it would collect a person's. `--noise` gives wrong answers,
`--skip` skips tasks, `--delay` paces it; with `--follow` it keeps answering new tasks as they appear.
The server is found as every command finds it: `--label-studio-url` or `$LABEL_STUDIO_URL` with its token,
else the local services (`connectors.label_studio_access`).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Annotated

from jobs._app import ConfigCommand
from pipeline.config import LabelStudioAccess, Renamed
from pipeline.io import storage


class AnnotateBotConfig(LabelStudioAccess):
    """Which project the bot answers, from what truth, how well."""

    project: str  # Label Studio project title
    truth: str  # Parquet file or folder with sample_id and the label column (e.g. the pool's embeddings)
    label_column: Annotated[str, Renamed("column")]  # the label column of `truth`
    email: str = "bot@bayescurate.local"  # the bot's user (created on first use)
    noise: float = 0.0  # probability of a wrong label (uniform over the other classes)
    skip: float = 0.0  # probability of skipping a task
    delay: float = 0.0  # seconds between two answers
    seed: int = 0  # draws of noise and skips (per sample id: a re-run makes the same choices)
    limit: int | None = None  # answer at most this many tasks in this run
    follow: bool = False  # keep answering new tasks (poll every `poll_s`) until interrupted
    poll_s: float = 5.0  # with --follow: seconds between looks for new tasks
    state_dir: str | None = None  # services state dir (their Label Studio, beating the env; the bot's login)


def read_truth(uri: str, column: str) -> dict[str, str]:
    files = [f for f in storage.list_files(uri, suffix=".parquet") if "/quarantine/" not in f]
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri!r}")
    truth: dict[str, str] = {}
    for path in files:
        table = storage.read_parquet(path)
        if "sample_id" not in table.column_names or column not in table.column_names:
            raise ValueError(
                f"{path!r} needs columns 'sample_id' and {column!r}; it has {table.column_names}"
            )
        for sid, label in zip(
            table.column("sample_id").to_pylist(), table.column(column).to_pylist(), strict=True
        ):
            if label is not None:
                truth[str(sid)] = str(label)
    return truth


def bot_session(client, email: str, state_dir: str | None, *, local: bool = True):  # type: ignore[no-untyped-def]
    """The bot logged in: signed up on first use, its password in `<state>/labelstudio/bots/<email>.json`
    for the local services' server, `.../bots/<host_port>/<email>.json` for a server of your own."""
    from urllib.parse import urlsplit

    from connectors.annotator_bot import BotAnnotator
    from connectors.service_state import resolve_state_dir

    def safe(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9@._-]+", "_", name)

    folder = resolve_state_dir(state_dir) / "labelstudio" / "bots"
    if not local:  # the local server may change port across restarts; another server is its own user base
        folder = folder / safe(urlsplit(client.url).netloc)
    login_file = folder / f"{safe(email)}.json"
    bot = BotAnnotator(client.url, email)
    if login_file.is_file():
        bot.login(json.loads(login_file.read_text())["password"])
        return bot
    password = secrets.token_urlsafe(18)
    storage.write_json(login_file, {"email": email, "password": password}, private=True)
    return BotAnnotator.create(client, email, password=password)


def run(cfg: AnnotateBotConfig) -> int:
    """Answer the open tasks of a Label Studio project from ground truth, as a signed-up user would."""
    from connectors.annotator_bot import answer_open_tasks

    target = cfg.label_studio(cfg.state_dir)
    truth = read_truth(cfg.truth, cfg.label_column)
    client = target.client()
    project = client.find_project(cfg.project)
    if project is None:
        raise ValueError(f"Label Studio at {client.url} has no project {cfg.project!r}")
    bot = bot_session(client, cfg.email, cfg.state_dir, local=target.services is not None)
    total = 0
    while True:
        counts = answer_open_tasks(
            bot,
            client,
            project,
            truth,
            noise=cfg.noise,
            skip=cfg.skip,
            delay=cfg.delay,
            seed=cfg.seed,
            limit=cfg.limit,
        )
        total += counts.answered + counts.skipped
        if counts.answered or counts.skipped or not cfg.follow:
            print(
                f"{cfg.email}: answered {counts.answered} tasks of {cfg.project!r} ({counts.wrong} wrong on "
                f"purpose), skipped {counts.skipped}"
                + (f", {counts.missing} not in the truth" if counts.missing else "")
            )
        if not cfg.follow or (cfg.limit is not None and total >= cfg.limit):
            return 0
        time.sleep(cfg.poll_s)


CONFIG = AnnotateBotConfig
main = ConfigCommand(AnnotateBotConfig, run, "bayescurate annotate-bot")
