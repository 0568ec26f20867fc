from __future__ import annotations

import io
import math

import pytest
from PIL import Image, ImageChops, ImageDraw

from pipeline.reports import contact_sheet as cs
from pipeline.reports.contact_sheet import SheetItem, contact_sheet, layout

BLUE = (30, 60, 200)


def _encoded(size: tuple[int, int], colour: tuple[int, int, int] = BLUE, fmt: str = "PNG") -> bytes:
    """A solid image with an ellipse on it, so it is neither blank nor a single colour."""
    image = Image.new("RGB", size, colour)
    w, h = size
    ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(250, 200, 0))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _solid(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _item(
    rank: int = 0, image: bytes | None = None, label: str | None = None, predicted: str = "cat"
) -> SheetItem:
    return SheetItem(image=image, predicted=predicted, confidence=0.87, score=0.123, rank=rank, label=label)


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.convert("RGB")


def _thumb_slot(lay: cs.Layout, i: int) -> tuple[int, int, int, int]:
    x0, y0, _, _ = lay.cell(i)
    tx = x0 + cs.INSET + (max(lay.thumb, cs.MIN_CAPTION) - lay.thumb) // 2
    ty = y0 + cs.INSET
    return tx, ty, tx + lay.thumb, ty + lay.thumb


@pytest.mark.parametrize("n", [1, 8, 9, 64])
def test_grid_size_follows_the_layout_constants(n: int) -> None:
    shapes = [(60, 40), (40, 60), (50, 50), (200, 20)]
    items = [_item(i, _encoded(shapes[i % 4])) for i in range(n)]
    image = _decode(contact_sheet(items, columns=8, thumb=128))

    cols, rows = min(8, n), math.ceil(n / 8)
    cell_w = 128 + 2 * cs.INSET
    cell_h = cs.INSET + 128 + cs.CAPTION_GAP + cs.CAPTION_LINES * cs.LINE + cs.INSET
    expected = (
        max(cs.MIN_WIDTH, cs.MARGIN + cols * (cell_w + cs.MARGIN)),
        cs.MARGIN + rows * (cell_h + cs.MARGIN),
    )
    assert image.size == expected
    lay = layout(n, 8, 128)
    assert (lay.width, lay.height) == expected
    assert lay.cell(n - 1)[2:] == (
        cs.MARGIN + ((n - 1) % 8 + 1) * (cell_w + cs.MARGIN) - cs.MARGIN,
        cs.MARGIN + rows * (cell_h + cs.MARGIN) - cs.MARGIN,
    )


def test_title_and_legend_add_header_lines_above_the_grid() -> None:
    plain = _decode(contact_sheet([_item(0, _encoded((40, 40)))]))
    both = _decode(contact_sheet([_item(0, _encoded((40, 40)), label="dog")], title="round 3"))
    assert both.width == plain.width
    assert both.height == plain.height + cs.TITLE_LINE + cs.LINE + cs.HEADER_GAP
    header = both.crop((0, 0, both.width, layout(1, 8, 128, title=True, legend=True).top))
    colours = {colour for _, colour in header.getcolors(maxcolors=100_000)}
    assert cs.GREEN in colours and cs.RED in colours  # the legend's swatches


def test_no_items_gives_a_small_sheet_that_says_so() -> None:
    image = _decode(contact_sheet([]))
    assert image.width == cs.MIN_WIDTH and image.height < 100
    assert ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox() is not None


@pytest.mark.parametrize(
    "data",
    [None, b"", b"definitely not an image", _encoded((80, 60))[:200]],
    ids=["none", "empty", "garbage", "truncated-png"],
)
def test_missing_or_corrupt_image_gets_a_grey_placeholder(data: bytes | None) -> None:
    image = _decode(contact_sheet([_item(0, data)]))
    slot = image.crop(_thumb_slot(layout(1, 8, 128), 0))
    counts = dict((colour, count) for count, colour in slot.getcolors(maxcolors=100_000))
    assert counts.get(cs.PLACEHOLDER, 0) > 0.8 * 128 * 128
    assert any(max(colour) < 150 for colour in counts)  # the "no image" text


@pytest.mark.parametrize(
    ("size", "fitted"),
    [((400, 100), (128, 32)), ((50, 200), (32, 128)), ((16, 8), (128, 64)), ((128, 128), (128, 128))],
    ids=["wide", "tall", "tiny-enlarged", "exact"],
)
def test_thumbnail_keeps_aspect_ratio_and_is_centred(size: tuple[int, int], fitted: tuple[int, int]) -> None:
    image = _decode(contact_sheet([_item(0, _solid(size, BLUE))]))
    tx, ty, tx1, ty1 = _thumb_slot(layout(1, 8, 128), 0)
    slot = image.crop((tx, ty, tx1, ty1))
    bbox = ImageChops.difference(slot, Image.new("RGB", slot.size, "white")).getbbox()
    w, h = fitted
    assert bbox == ((128 - w) // 2, (128 - h) // 2, (128 - w) // 2 + w, (128 - h) // 2 + h)


def test_large_jpeg_is_fitted_and_transparency_lands_on_white() -> None:
    half_clear = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    ImageDraw.Draw(half_clear).rectangle((0, 0, 49, 99), fill=(*BLUE, 255))
    buffer = io.BytesIO()
    half_clear.save(buffer, format="PNG")
    items = [_item(0, _solid((2000, 1500), BLUE, fmt="JPEG")), _item(1, buffer.getvalue())]
    image = _decode(contact_sheet(items))
    lay = layout(2, 8, 128)

    jpeg = image.crop(_thumb_slot(lay, 0))
    bbox = ImageChops.difference(jpeg, Image.new("RGB", jpeg.size, "white")).point(lambda v: v > 40).getbbox()
    assert bbox is not None
    assert abs((bbox[2] - bbox[0]) - 128) <= 1 and abs((bbox[3] - bbox[1]) - 96) <= 2

    png = image.crop(_thumb_slot(lay, 1))
    assert png.getpixel((120, 64)) == (255, 255, 255)  # the transparent half, not black
    assert png.getpixel((8, 64)) == BLUE


def _reddish(colour: tuple[int, int, int]) -> bool:
    r, g, b = colour
    return r > 150 and g < 110 and b < 110


def test_frames_are_red_for_a_wrong_label_and_green_for_a_right_one() -> None:
    items = [_item(0, _encoded((60, 60)), label="dog"), _item(1, _encoded((60, 60)), label="cat"), _item(2)]
    image = _decode(contact_sheet(items))
    lay = layout(3, 8, 128, legend=True)
    for i, colour in enumerate([cs.RED, cs.GREEN]):
        x0, y0, x1, y1 = lay.cell(i)
        for xy in [
            (x0 + 1, (y0 + y1) // 2),
            (x1 - 2, (y0 + y1) // 2),
            ((x0 + x1) // 2, y0 + 1),
            ((x0 + x1) // 2, y1 - 2),
        ]:
            assert image.getpixel(xy) == colour, (i, xy)
    x0, y0, x1, y1 = lay.cell(2)
    assert image.getpixel((x0 + 1, (y0 + y1) // 2)) == (255, 255, 255)  # no label yet: no coloured frame

    def label_line(i: int) -> Image.Image:
        x0, _, x1, _ = lay.cell(i)
        top = _thumb_slot(lay, i)[3] + cs.CAPTION_GAP + 2 * cs.LINE
        return image.crop((x0 + cs.FRAME, top, x1 - cs.FRAME, top + cs.LINE))

    assert any(_reddish(colour) for _, colour in label_line(0).getcolors(maxcolors=100_000))
    assert not any(_reddish(colour) for _, colour in label_line(1).getcolors(maxcolors=100_000))


def test_long_names_are_cut_to_stay_inside_their_cells() -> None:
    long = "an extraordinarily long class name " * 20
    items = [
        SheetItem(_encoded((60, 30)), long, 0.5, 12345.678, 0, label=long + "!"),
        SheetItem(_encoded((30, 60)), "W" * 300, 1.0, 1e-9, 1, label="W" * 300),
    ]
    for thumb in (128, 32):
        image = _decode(contact_sheet(items, columns=2, thumb=thumb, score_name="expected information gain"))
        lay = layout(2, 2, thumb, legend=True)
        outside = image.copy()
        for i, frame in enumerate([cs.RED, cs.GREEN]):  # the second label agrees with its prediction
            x0, y0, x1, y1 = lay.cell(i)
            outside.paste((255, 255, 255), (x0, y0, x1, y1))
            assert image.crop((x1 - cs.FRAME, y0, x1, y1)).getcolors() == [(cs.FRAME * (y1 - y0), frame)]
            air = image.crop(
                (x1 - cs.INSET, y0 + cs.FRAME, x1 - cs.FRAME, y1 - cs.FRAME)
            )  # right of the text
            assert air.getcolors() == [(air.width * air.height, (255, 255, 255))]
        grid = outside.crop((0, lay.top, outside.width, outside.height))
        assert ImageChops.difference(grid, Image.new("RGB", grid.size, "white")).getbbox() is None


def test_same_input_gives_identical_bytes() -> None:
    items = [_item(i, _encoded((40 + 10 * i, 50)), label=["cat", "dog", None][i % 3]) for i in range(12)]
    items.append(_item(12, b"corrupt"))
    first = contact_sheet(items, title="round 1", score_name="epig")
    assert contact_sheet(list(items), title="round 1", score_name="epig") == first
    assert contact_sheet(items, title="round 2", score_name="epig") != first


def test_rejects_a_grid_without_columns() -> None:
    with pytest.raises(ValueError, match="columns must be at least 1, got 0"):
        contact_sheet([_item()], columns=0)
