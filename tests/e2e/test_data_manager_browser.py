"""The Data Manager as annotators see it, in a real browser: headless Chromium (Debian's `chromium`, driven by
playwright) logs in to the test session's Label Studio and opens the tab `push_tasks` made. The first screen
must show the images and the model's doubt, most informative first; Label Studio's bookkeeping stays hidden.

The screenshot is kept: `out/test-artifacts/data-manager.png`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from connectors.label_studio import LabelStudioClient
from connectors.services import REPO_ROOT, LabelStudioService
from pipeline.annotation import ImageStore, TaskRow, push_tasks

pytestmark = [pytest.mark.slow, pytest.mark.services]

CHROMIUM = Path(os.environ.get("BAYESCURATE_CHROMIUM", "/usr/bin/chromium"))
# Headless, and nothing that reaches outside this machine (no updates, sync or QUIC probes).
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREEN = {"width": 1400, "height": 900}  # the first screen of a laptop: what must show without scrolling
ARTIFACTS = REPO_ROOT / "out" / "test-artifacts"
CLASSES = ["circle", "square", "star"]
SHOWN = ["image", "predicted", "confidence", "informativeness", "epig", "rank", "round"]
BOOKKEEPING = ["id", "completed_at", "total_annotations", "annotators", "predictions_score", "created_at"]
WAIT_MS = 60_000  # how long to wait for the page at most (a busy 2-core machine), never a measured time


def _chromium() -> Any:
    """playwright's sync API, or a skip (a failure under CI=true) naming what is missing."""
    missing = None
    if not CHROMIUM.is_file():
        missing = f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    else:
        try:
            from playwright import sync_api
        except ImportError:
            missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    return sync_api


def _image(colour: tuple[int, int, int]) -> bytes:
    image = Image.new("RGB", (96, 96), (235, 235, 235))
    ImageDraw.Draw(image).ellipse((16, 16, 80, 80), fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# Reads the table as drawn: each header's column id and box, each row's box, cell texts and image state.
READ_TABLE = """() => {
  const box = (e) => { const r = e.getBoundingClientRect();
                       return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; };
  const headers = [...document.querySelectorAll('.lsf-th[data-id]')].map(
    (h) => ({id: h.dataset.id, ...box(h)}));
  const rows = [...document.querySelectorAll('[data-testid="table-row"]')].map((row) => {
    const img = row.querySelector('img');
    return {...box(row),
            cells: [...row.querySelectorAll(':scope > div.lsf-table__cell')].map((c) => c.innerText.trim()),
            image: img ? {...box(img), loaded: img.complete && img.naturalWidth > 0} : null};
  });
  return {headers, rows};
}"""


def test_the_tab_leads_with_the_image_and_the_score_sorted_most_informative_first(
    label_studio_client: LabelStudioClient, label_studio_server: LabelStudioService, tmp_path: Path
) -> None:
    sync_api = _chromium()
    # Eight picks of one round, handed over out of score order.
    epig = [0.0000425, 0.0002125, 0.00001, 0.000106, 0.0000708, 0.00019, 0.0000531, 0.0000354]
    colours = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (200, 160, 0)] * 2
    by_score = sorted(range(len(epig)), key=lambda i: -epig[i])
    rows, sources = [], {}
    for i, (score, colour) in enumerate(zip(epig, colours, strict=True)):
        sid = f"pick-{i}"
        (tmp_path / f"{sid}.png").write_bytes(_image(colour))
        sources[sid] = str(tmp_path / f"{sid}.png")
        rows.append(
            TaskRow(sid, 0, by_score.index(i), CLASSES[i % 3], 0.9 - i / 20, {"epig": score, "entropy": 1.0})
        )
    title = f"browser {uuid.uuid4().hex[:8]}"
    store = ImageStore(Path(label_studio_server.image_root))
    pushed = push_tasks(label_studio_client, title, CLASSES, rows, sources, store, model_version="p-1")
    assert pushed["created"] == len(rows) and pushed["url"].endswith(f"?tab={pushed['view']}")
    login = json.loads(Path(label_studio_server.admin_file).read_text())

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport=SCREEN)
            page.set_default_timeout(WAIT_MS)
            page.goto(f"{label_studio_server.url}/user/login/")
            page.fill("input[name=email]", login["username"])
            page.fill("input[name=password]", login["password"])
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)
            page.goto(pushed["url"])  # the URL a campaign prints: the project, on the tab push_tasks made
            page.locator('[data-testid="table-row"]').nth(len(rows) - 1).wait_for()
            page.wait_for_function(
                "() => [...document.querySelectorAll('[data-testid=\"table-row\"] img')]"
                ".every((i) => i.complete && i.naturalWidth > 0)"
            )
            shot = tmp_path / "data-manager.png"
            page.screenshot(path=str(shot))
            table = page.evaluate(READ_TABLE)
        finally:
            browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "data-manager.png")

    def on_screen(b: dict[str, float]) -> bool:
        return (
            b["left"] >= 0
            and b["top"] >= 0
            and b["right"] <= SCREEN["width"]
            and b["bottom"] <= SCREEN["height"]
        )

    # The columns, in this order, all on the first screen; none of Label Studio's own.
    headers = [h["id"] for h in table["headers"]]
    assert headers == [f"tasks:data.{name}" for name in SHOWN], headers
    assert all(on_screen(h) for h in table["headers"])
    assert not {f"tasks:{name}" for name in BOOKKEEPING} & set(headers)
    # Every row on the first screen, with its image drawn, most informative first.
    drawn = sorted(table["rows"], key=lambda r: r["top"])
    assert len(drawn) == len(rows) and all(on_screen(r) for r in drawn)
    assert all(r["image"] is not None and r["image"]["loaded"] and on_screen(r["image"]) for r in drawn)
    column = {name: [r["cells"][SHOWN.index(name)] for r in drawn] for name in SHOWN[1:]}
    shares = [float(v) for v in column["informativeness"]]
    assert shares[0] == 100 and shares == sorted(shares, reverse=True) and len(set(shares)) == len(rows)
    assert [float(v) for v in column["epig"]] == sorted(epig, reverse=True)  # the raw score, as written
    assert column["epig"][0] == "0.0002125"
    assert [int(v) for v in column["rank"]] == list(range(1, len(rows) + 1))
    assert column["predicted"] == [CLASSES[i % 3] for i in by_score]
    assert set(column["round"]) == {"0"}
