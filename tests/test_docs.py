"""The documentation builds, and the README's links and promises hold.

`mkdocs build --strict` fails on a broken link or anchor, an image that is not there, or a page missing from
the navigation. The README is not part of the site, so its links to the pages are checked here.
"""

from __future__ import annotations

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
