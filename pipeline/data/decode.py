"""Image decoding and validation: encoded bytes -> preprocessed pixel arrays, or a quarantine reason.

Checks run cheapest first: missing bytes, then the header (`Image.open` reads only the header, so an image
that claims 100k x 100k pixels is rejected before anything is allocated), then the pixel mode, then the
full decode (truncated files fail here), then `preprocess` (the model's transform, PIL -> [3, H, W]).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.quarantine import Reason

# Modes that convert to RGB without losing meaning. 16-bit ("I;16"), 32-bit int ("I") and float ("F")
# images need a domain-specific scaling, so they are quarantined rather than silently clipped.
RGB_CONVERTIBLE: frozenset[str] = frozenset(
    {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"}
)


@dataclass(frozen=True)
class Limits:
    """Sanity limits on image geometry, checked from the header before decoding."""

    min_side: int = 2  # pixels
    max_side: int = 16384  # pixels
    max_pixels: int = 64_000_000  # width * height
    max_aspect: float = 50.0  # max(w, h) / min(w, h)


@dataclass
class Decoded:
    """Result of decoding a batch: pixels for every row (zeros where not ok) and the verdict per row."""

    pixels: np.ndarray  # [N, 3, H, W] float32
    ok: np.ndarray  # [N] bool
    reason: list[str]  # "" where ok, else a quarantine.Reason value
    error: list[str]  # "" where ok, else a short message


def check_header(image: Image.Image, limits: Limits) -> str | None:
    """A message when the geometry or mode is unusable, else None."""
    w, h = image.size
    if min(w, h) < limits.min_side or max(w, h) > limits.max_side or w * h > limits.max_pixels:
        return f"{Reason.ABSURD_SIZE.value}:{w}x{h} outside limits {limits}"
    if max(w, h) / min(w, h) > limits.max_aspect:
        return f"{Reason.ABSURD_SIZE.value}:{w}x{h} has aspect > {limits.max_aspect}"
    if image.mode not in RGB_CONVERTIBLE:
        return f"{Reason.WRONG_MODE.value}:mode {image.mode!r} has no faithful RGB conversion"
    return None


def decode_one(data: bytes | None, limits: Limits) -> tuple[Image.Image | None, str, str]:
    """(RGB image, "", "") or (None, reason, error)."""
    if data is None or len(data) == 0:
        return None, Reason.EMPTY.value, "no image bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            problem = check_header(image, limits)
            if problem is not None:
                reason, _, message = problem.partition(":")
                return None, reason, message
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, Reason.ABSURD_SIZE.value, f"{type(exc).__name__}: {exc}"[:500]
    except (OSError, ValueError, SyntaxError) as exc:
        return None, Reason.UNDECODABLE.value, f"{type(exc).__name__}: {exc}"[:500]
    return image.convert("RGB"), "", ""


def text_or_none(value: object) -> str | None:
    """A non-blank string, or None for None/NaN/blank (columns that crossed Arrow may carry NaN for null)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value)
    return text if text.strip() else None


def decode_batch(
    images: Sequence[bytes | None],
    preprocess: Callable[[Image.Image], object],
    pixel_shape: tuple[int, int, int],
    *,
    captions: Sequence[str | None] | None = None,
    read_errors: Sequence[str | None] | None = None,
    limits: Limits = Limits(),
) -> Decoded:
    """Decode and preprocess `images` (encoded bytes) into one [N, 3, H, W] float32 array.

    `captions` given means the rows are image–text pairs: a missing/blank caption quarantines the row.
    `read_errors[i]` set means the bytes could not be fetched: the row is quarantined as unreadable.
    """
    n = len(images)
    pixels = np.zeros((n, *pixel_shape), dtype=np.float32)  # [N, 3, H, W]
    ok = np.zeros(n, dtype=bool)
    reasons, errors = [""] * n, [""] * n
    for i, data in enumerate(images):
        read_error = None if read_errors is None else text_or_none(read_errors[i])
        if read_error is not None:
            reasons[i], errors[i] = Reason.UNREADABLE.value, read_error[:500]
            continue
        if captions is not None and text_or_none(captions[i]) is None:
            reasons[i], errors[i] = Reason.MISSING_CAPTION.value, "image-text pair without a caption"
            continue
        image, reasons[i], errors[i] = decode_one(data, limits)
        if image is None:
            continue
        array = np.asarray(preprocess(image), dtype=np.float32)
        if array.shape != pixel_shape:
            raise ValueError(f"preprocess returned shape {list(array.shape)}, expected {list(pixel_shape)}")
        pixels[i] = array
        ok[i] = True
    return Decoded(pixels, ok, reasons, errors)
