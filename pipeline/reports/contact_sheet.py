"""A contact sheet: one PNG grid of the images the model asked about, each captioned with its rank, score,
prediction and (once annotators answered) the label, so a reviewer sees a round's picks at a glance in MLflow.

Pillow only. Each image is decoded straight into a thumbnail and pasted at once, so a 64-item sheet holds one
full-size decode at a time; the same items always give the same PNG bytes.
"""

from __future__ import annotations

import functools
import io
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

# Layout, in pixels. `layout` is the one place that turns these into a sheet's geometry.
MARGIN = 8  # around the sheet and between cells
FRAME = 3  # width of the red / green frame around a labelled cell
INSET = 6  # cell edge to thumbnail and caption (holds the frame plus a little air)
CAPTION_GAP = 3  # thumbnail to the first caption line
LINE = 15  # height of one caption or legend line
CAPTION_LINES = 3  # rank+score, prediction, label: reserved in every cell so the grid stays regular
TITLE_LINE = 22  # height of the title line
HEADER_GAP = 4  # header (title / legend) to the first row of cells
MIN_WIDTH = 240  # so the title, the legend and "no picks" have room even for one narrow cell
EMPTY_HEIGHT = 40  # body of a sheet without items
MIN_THUMB = 16  # smallest thumbnail worth drawing
MIN_CAPTION = 100  # caption width when the thumbnail is narrower, so captions stay legible

FONT_SIZE = 12
TITLE_SIZE = 16

WHITE = (255, 255, 255)
INK = (40, 40, 40)
RED = (214, 39, 40)  # label differs from the prediction
GREEN = (44, 160, 44)  # label agrees with the prediction
BORDER = (215, 215, 215)  # thin outline of a cell without a label yet
PLACEHOLDER = (200, 200, 200)  # stands in for a missing or undecodable image
PLACEHOLDER_INK = (100, 100, 100)

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
_DASHES = str.maketrans(dict.fromkeys("‐‑‒–—―−", "-"))
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class SheetItem:
    """One picked image and what is known about it."""

    image: bytes | None  # encoded image (PNG, JPEG, ...); None or undecodable shows a grey "no image"
    predicted: str  # the model's predicted class
    confidence: float  # probability of `predicted`, shown as a percentage
    score: float  # acquisition score, shown with 3 significant digits
    rank: int  # 0-based rank, shown as #1, #2, ...
    label: str | None = None  # the annotators' answer once back; a differing one frames the cell in red


@dataclass(frozen=True)
class Layout:
    """Where everything goes on a sheet: its size and each cell's box."""

    width: int
    height: int
    columns: int  # cells per row actually used (fewer than asked when there are fewer items)
    thumb: int  # thumbnails fit in thumb x thumb
    top: int  # y of the first row of cells

    @property
    def caption_width(self) -> int:
        return max(self.thumb, MIN_CAPTION)

    @property
    def cell_width(self) -> int:
        return self.caption_width + 2 * INSET

    @property
    def cell_height(self) -> int:
        return INSET + self.thumb + CAPTION_GAP + CAPTION_LINES * LINE + INSET

    def cell(self, i: int) -> tuple[int, int, int, int]:
        """Box (x0, y0, x1, y1), end exclusive, of the i-th cell in reading order."""
        row, col = divmod(i, self.columns)
        x0 = MARGIN + col * (self.cell_width + MARGIN)
        y0 = self.top + row * (self.cell_height + MARGIN)
        return x0, y0, x0 + self.cell_width, y0 + self.cell_height


def layout(n: int, columns: int, thumb: int, *, title: bool = False, legend: bool = False) -> Layout:
    """Geometry of a sheet of `n` cells, `columns` per row, with an optional title and legend line."""
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    if thumb < MIN_THUMB:
        raise ValueError(f"thumb must be at least {MIN_THUMB} pixels, got {thumb}")
    header = (TITLE_LINE if title else 0) + (LINE if legend else 0)
    top = MARGIN + header + (HEADER_GAP if header else 0)
    used = max(1, min(columns, n))
    cell_w = max(thumb, MIN_CAPTION) + 2 * INSET
    cell_h = INSET + thumb + CAPTION_GAP + CAPTION_LINES * LINE + INSET
    width = max(MIN_WIDTH, MARGIN + used * (cell_w + MARGIN))
    rows = math.ceil(n / used)
    height = top + (rows * (cell_h + MARGIN) if n else EMPTY_HEIGHT + MARGIN)
    return Layout(width=width, height=height, columns=used, thumb=thumb, top=top)


def contact_sheet(
    items: Sequence[SheetItem],
    *,
    title: str = "",
    columns: int = 8,
    thumb: int = 128,
    score_name: str = "score",
) -> bytes:
    """PNG bytes of `items` in a grid, in the order given, each cell captioned (see `SheetItem`)."""
    legend = any(item.label is not None for item in items)
    lay = layout(len(items), columns, thumb, title=bool(title), legend=legend)
    sheet = Image.new("RGB", (lay.width, lay.height), WHITE)
    draw = ImageDraw.Draw(sheet)

    y = MARGIN
    if title:
        font = _font(TITLE_SIZE)
        draw.text((MARGIN, y), _fit(font, "", title, "", lay.width - 2 * MARGIN), font=font, fill=INK)
        y += TITLE_LINE
    if legend:
        _legend(draw, MARGIN, y)
    if not items:
        _centred(draw, (0, lay.top, lay.width, lay.top + EMPTY_HEIGHT), "no picks", INK)

    for i, item in enumerate(items):
        _cell(sheet, draw, lay, lay.cell(i), item, score_name)

    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _cell(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    lay: Layout,
    box: tuple[int, int, int, int],
    item: SheetItem,
    score_name: str,
) -> None:
    x0, y0, x1, y1 = box
    thumb, width = lay.thumb, lay.caption_width
    tx, ty = x0 + INSET + (width - thumb) // 2, y0 + INSET  # thumbnail slot, thumb x thumb
    image = _thumbnail(item.image, thumb)
    if image is None:
        draw.rectangle((tx, ty, tx + thumb - 1, ty + thumb - 1), fill=PLACEHOLDER)
        _centred(draw, (tx, ty, tx + thumb, ty + thumb), "no image", PLACEHOLDER_INK)
    else:
        sheet.paste(image, (tx + (thumb - image.width) // 2, ty + (thumb - image.height) // 2))
        image.close()

    font = _font(FONT_SIZE)
    x, y = x0 + INSET, ty + thumb + CAPTION_GAP
    lines = [
        (_fit(font, f"#{item.rank + 1} ", score_name, f"={item.score:#.3g}", width), INK),
        (_fit(font, "pred: ", item.predicted, f" {item.confidence:.0%}", width), INK),
    ]
    differs = item.label is not None and item.label != item.predicted
    if item.label is not None:
        lines.append((_fit(font, "label: ", item.label, "", width), RED if differs else INK))
    for text, colour in lines:
        draw.text((x, y), text, font=font, fill=colour)
        y += LINE

    if item.label is None:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BORDER, width=1)
    else:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=RED if differs else GREEN, width=FRAME)


def _thumbnail(data: bytes | None, size: int) -> Image.Image | None:
    """The image fitted into size x size on white, or None when there is nothing decodable.

    Shrunk as it is decoded (JPEG draft mode, then `thumbnail`) so memory stays at one thumbnail per cell;
    tiny images are enlarged so they stay visible.
    """
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at 1/2 .. 1/8 scale; no-op otherwise
            opened.thumbnail((size, size), Image.Resampling.LANCZOS)
            image = ImageOps.exif_transpose(opened)  # phone photos: show them upright
            if image.mode in ("RGBA", "LA", "PA", "P") and (
                image.mode != "P" or "transparency" in image.info
            ):
                rgba = image.convert("RGBA")
                flat = Image.new("RGB", rgba.size, WHITE)
                flat.paste(rgba, mask=rgba.getchannel("A"))
            else:
                flat = image.convert("RGB")
    except _DECODE_ERRORS:
        return None
    if max(flat.size) < size:
        scale = size / max(flat.size)
        enlarged = (max(1, round(flat.width * scale)), max(1, round(flat.height * scale)))
        flat = flat.resize(enlarged, Image.Resampling.BICUBIC)
    return flat


def _legend(draw: ImageDraw.ImageDraw, x: int, y: int) -> None:
    font = _font(FONT_SIZE)
    for colour, text in ((GREEN, "label agrees"), (RED, "label differs")):
        draw.rectangle((x, y + 3, x + 9, y + 12), fill=colour)
        x += 14
        draw.text((x, y), text, font=font, fill=INK)
        x += int(draw.textlength(text, font=font)) + 16


def _centred(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, colour: tuple[int, int, int]
) -> None:
    font = _font(FONT_SIZE)
    x0, y0, x1, y1 = box
    text = _fit(font, "", text, "", x1 - x0)
    width = draw.textlength(text, font=font)
    draw.text((x0 + (x1 - x0 - width) / 2, y0 + (y1 - y0 - LINE) / 2), text, font=font, fill=colour)


def _fit(font: _Font, prefix: str, middle: str, suffix: str, width: float) -> str:
    """`prefix + middle + suffix` within `width` pixels, cutting `middle` short with an ellipsis if needed.

    Keeps the prefix and suffix (e.g. "pred: " and " 87%") whole, as they carry the structure of the line;
    falls back to cutting the whole line when even they do not fit.
    """
    prefix, middle, suffix = (_printable(font, s) for s in (prefix, middle, suffix))
    text = prefix + middle + suffix
    if font.getlength(text) <= width:
        return text
    ellipsis = "…" if isinstance(font, ImageFont.FreeTypeFont) else "..."  # the bitmap font is latin-1
    if font.getlength(prefix + ellipsis + suffix) > width:
        if not prefix and not suffix:
            return ""  # not even the ellipsis fits
        return _fit(font, "", text, "", width)
    lo, hi = 0, len(middle)  # longest cut of `middle` that fits: lo fits, hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(prefix + middle[:mid] + ellipsis + suffix) <= width:
            lo = mid
        else:
            hi = mid - 1
    return prefix + middle[:lo].rstrip() + ellipsis + suffix


def _printable(font: _Font, text: str) -> str:
    """One line the font can draw.

    Control characters (a newline would start a second line) become spaces; accents are dropped and dashes
    made ASCII, as Pillow's built-in font has little beyond ASCII (other scripts still draw as boxes).
    """
    text = unicodedata.normalize("NFKD", text).translate(_DASHES)
    text = "".join(c if c.isprintable() else " " for c in text if not unicodedata.combining(c))
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")
    return text


@functools.lru_cache(maxsize=4)
def _font(size: int) -> _Font:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType: fixed bitmap font
        return ImageFont.load_default()
