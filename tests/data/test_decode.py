"""Decode: each kind of bad input lands in the quarantine with its reason; good images are preprocessed."""

from __future__ import annotations

import io

import numpy as np
import torchvision.transforms as T
from PIL import Image

from jobs.make_world import huge_png
from pipeline.data.decode import Limits, decode_batch
from pipeline.data.quarantine import Reason


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_reasons() -> None:
    good = _png(Image.new("RGB", (16, 16), (255, 0, 0)))
    images = [
        good,
        good[: len(good) // 2],
        b"",
        huge_png(),
        _png(Image.fromarray(np.zeros((16, 16), dtype=np.uint16))),
        good,
        None,
        _png(Image.new("RGB", (400, 4))),
    ]
    captions = ["a", "b", "c", "d", "e", None, "g", "h"]
    read_errors = [None, None, None, None, None, None, "FileNotFoundError: x", None]
    out = decode_batch(
        images,
        T.ToTensor(),
        (3, 16, 16),
        captions=captions,
        read_errors=read_errors,
        limits=Limits(max_aspect=50),
    )
    assert out.reason == [
        "",
        Reason.UNDECODABLE.value,
        Reason.EMPTY.value,
        Reason.ABSURD_SIZE.value,
        Reason.WRONG_MODE.value,
        Reason.MISSING_CAPTION.value,
        Reason.UNREADABLE.value,
        Reason.ABSURD_SIZE.value,
    ]
    assert out.ok.tolist() == [True] + [False] * 7
    np.testing.assert_allclose(out.pixels[0, 0], 1.0, rtol=0, atol=1e-7)  # red channel of a red image
    np.testing.assert_allclose(out.pixels[1:], 0.0, rtol=0, atol=0)


def test_modes_are_converted_to_rgb() -> None:
    images = [_png(Image.new(mode, (8, 8))) for mode in ("L", "RGBA", "P")]
    out = decode_batch(images, T.ToTensor(), (3, 8, 8))
    assert out.ok.all()
