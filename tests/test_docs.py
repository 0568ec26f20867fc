"""The documentation builds, and the README's links and promises hold.

`mkdocs build --strict` fails on a broken link or anchor, an image that is not there, or a page missing from
the navigation. The README is not part of the site, so its links to the pages are checked here.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def test_the_docs_build_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [
            *(sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet"),
            *("--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "method" / "index.html").is_file()


def test_every_readme_link_into_the_repository_exists() -> None:
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert any(t.startswith("docs/") for t in local)
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "index.md")
    assert [p for p in pages if f"(docs/{p})" not in readme] == []


def test_the_readme_has_what_the_makefile_points_at_and_stays_short() -> None:
    readme = (REPO / "README.md").read_text()
    assert 'README "Install"' in (REPO / "Makefile").read_text()
    assert "\n## Install\n" in readme
    assert "make demo" in readme and "make test" in readme
    assert len(readme.splitlines()) <= 220


def test_the_docs_explain_the_method_themselves() -> None:
    """The method is in the repository: no page sends the reader to a file outside it."""
    for page in [REPO / "README.md", *DOCS.glob("*.md")]:
        text = page.read_text()
        assert "MATH.md" not in text and "../shared" not in text, page.name


# ------------------------------------------------------------------ commands and flags the docs name

SHELL_SEPARATORS = re.compile(r"\n|&&|\|\||;| \| ")


def _code_in(text: str) -> list[str]:
    """The code of a Markdown page: fenced blocks (line continuations joined) and inline code spans."""
    fence = re.compile(r"```[^\n]*\n(.*?)```", re.S)
    blocks = [block.replace("\\\n", " ") for block in fence.findall(text)]
    return blocks + [span.replace("\\|", "|") for span in re.findall(r"`([^`\n]+)`", fence.sub("", text))]


def _doc_pages() -> list[tuple[str, str]]:
    """(name, text) of the README and every docs page; of docs/cli.md only the hand-written part (the
    reference tables are generated from the commands themselves)."""
    from jobs._reference import BEGIN, END

    pages = []
    for page in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text()
        if BEGIN in text:
            head, _, rest = text.partition(BEGIN)
            text = head + rest.partition(END)[2]
        pages.append((page.name, text))
    return pages


def command_problems(words: list[str]) -> list[str]:
    """What is wrong with `bayescurate WORDS...`: an unknown command or subcommand, or a flag the command
    does not have (or has only as a deprecated name)."""
    from jobs._app import resolve_target
    from jobs.cli import COMMANDS

    if not words or words[0] in ("-h", "--help", "--version", "...") or words[0].isupper():
        return []
    name, rest = words[0], words[1:]
    if name not in COMMANDS:
        return [f"no command {name!r}"]
    table = getattr(importlib.import_module(COMMANDS[name][0]), "SUBCOMMANDS", None)
    targets = [COMMANDS[name][0]]
    if table is not None:
        if not rest or rest[0] in ("-h", "--help"):
            return []
        subs = rest[0].split("|")
        if unknown := [s for s in subs if s not in table]:
            return [f"no subcommand {name} {unknown[0]!r}"]
        targets, rest = [table[s][0] for s in subs], rest[1:]
    problems = []
    for target in targets:
        command = resolve_target(target)
        flags = command.option_names() | {"-h"}
        for flag in _flags(rest):
            if flag not in flags:
                renamed = command.renamed_options().get(flag)
                problems.append(f"{flag} is deprecated: use {renamed}" if renamed else f"no flag {flag}")
    return problems


def _flags(words: list[str]) -> list[str]:
    """The flags among `words`: `--out=x` is `--out`, `--variance/--no-variance` is both."""
    parts = [p for w in words for p in w.split("=", 1)[0].rstrip(".,)").split("/")]
    return [p for p in parts if p.startswith("--")]


def test_every_command_and_flag_the_docs_name_exists() -> None:
    """`bayescurate CMD [SUB] --flag` (also `CMD --flag` without the program name) names a command, a
    subcommand and its current flags; a flag on its own is a current flag of some command."""
    from jobs.cli import COMMANDS, config_commands

    every_flag = set().union(*(c.option_names() for c in config_commands().values())) | {"-h", "--version"}
    problems = []
    for page, text in _doc_pages():
        for code in _code_in(text):
            for line in SHELL_SEPARATORS.split(code):
                words = line.split("#", 1)[0].replace("[", " ").replace("]", " ").split()
                programs = [i for i, w in enumerate(words) if w.rsplit("/", 1)[-1] == "bayescurate"]
                if programs:
                    found = command_problems(words[programs[0] + 1 :])
                elif words and words[0].split("|")[0] in COMMANDS:
                    found = command_problems(words)
                elif words and words[0].startswith("--"):
                    found = [f"no flag {f}" for f in _flags(words) if f not in every_flag]
                else:  # another program's command line (ray, kubectl, make, pytest, ...)
                    found = []
                problems += [f"{page}: `{line.strip()}`: {p}" for p in found]
    assert problems == []


def test_the_docs_check_catches_a_wrong_flag_or_command() -> None:
    assert command_problems(["demo", "--pool-size", "100"]) == []
    assert command_problems(["demo", "--pool", "100"]) == ["--pool is deprecated: use --pool-size"]
    assert command_problems(["embed", "--bogus"]) == ["no flag --bogus"]
    assert command_problems(["campaign", "init|step", "DIR", "--json"]) == [
        "no flag --json",
        "no flag --json",
    ]
    assert command_problems(["bench", "frobnicate"]) == ["no subcommand bench 'frobnicate'"]
    assert command_problems(["frobnicate"]) == ["no command 'frobnicate'"]
