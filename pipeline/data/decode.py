"""Image decoding and validation: encoded bytes -> preprocessed pixel arrays, or a quarantine reason.

Checks run cheapest first: missing bytes, then the header (`Image.open` reads only the header, so an image
that claims 100k x 100k pixels is rejected before anything is allocated), then the pixel mode, then the
full decode (truncated files fail here), then `preprocess` (the model's transform, PIL -> [3, H, W]).

`split_preprocess` cuts a standard transform where pixels are still uint8 (resize/crop on the decode
workers, the float conversion and normalisation batched on the model side): 4x fewer bytes cross the object
store between decode and model, the per-image `ToTensor` disappears, and the result is bit-identical.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

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


# PIL -> PIL steps that may run before the cut (open_clip's own ones are matched by class name, so that
# open_clip is not imported here).
_PIL_STEPS = (T.Resize, T.CenterCrop)
_PIL_STEP_NAMES = frozenset({"MaybeConvertMode", "ResizeKeepRatio", "CenterCropOrPad", "_convert_to_rgb"})


@dataclass(frozen=True)
class SplitPreprocess:
    """A preprocess transform cut at `ToTensor`: `pil` (PIL -> PIL, per image) then `finish` (batched).

    `finish`: uint8 [N, H, W, C] -> float32 [N, C, H, W] = (x / 255 - mean) / std, the same float32
    operations `ToTensor` + `Normalize` apply per image, so the result is bit-identical.
    """

    pil: Callable[[Image.Image], Image.Image]  # resize / crop / mode steps
    mean: tuple[float, ...] | None  # Normalize mean (None: no Normalize step)
    std: tuple[float, ...] | None  # Normalize std

    def finish(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)  # [N, C, H, W] uint8
        x = x.float().div(255)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
            x = x.sub(mean).div(std)
        return x.contiguous()


def split_preprocess(preprocess: Callable[[Image.Image], object]) -> SplitPreprocess | None:
    """`preprocess` as a `SplitPreprocess`, or None when it is not [PIL steps..., ToTensor, Normalize?]."""
    steps = list(getattr(preprocess, "transforms", None) or [])
    if not isinstance(preprocess, T.Compose) or not steps:
        return None
    cut = next((i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
    if cut is None or not all(_is_pil_step(s) for s in steps[:cut]):
        return None
    tail = steps[cut + 1 :]
    if not tail:
        return SplitPreprocess(T.Compose(steps[:cut]), None, None)
    norm = tail[0]
    if len(tail) != 1 or not isinstance(norm, T.Normalize) or norm.inplace:
        return None
    mean = tuple(float(v) for v in torch.as_tensor(norm.mean).reshape(-1))
    std = tuple(float(v) for v in torch.as_tensor(norm.std).reshape(-1))
    return SplitPreprocess(T.Compose(steps[:cut]), mean, std)


def _is_pil_step(step: object) -> bool:
    return isinstance(step, _PIL_STEPS) or getattr(step, "__name__", type(step).__name__) in _PIL_STEP_NAMES


@dataclass
class Decoded:
    """Result of decoding a batch: pixels for every row (zeros where not ok) and the verdict per row."""

    pixels: np.ndarray  # [N, 3, H, W] float32, or [N, H, W, 3] uint8 when decoded with a `SplitPreprocess`
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
    split: SplitPreprocess | None = None,
) -> Decoded:
    """Decode and preprocess `images` (encoded bytes) into one [N, 3, H, W] float32 array.

    With `split` (from `split_preprocess(preprocess)`): only its PIL steps run here and the pixels come
    back as uint8 [N, H, W, C]; `split.finish` turns them into exactly what `preprocess` would have given.
    `captions` given means the rows are image–text pairs: a missing/blank caption quarantines the row.
    `read_errors[i]` set means the bytes could not be fetched: the row is quarantined as unreadable.
    """
    n = len(images)
    c, h, w = pixel_shape
    row_shape = (h, w, c) if split is not None else tuple(pixel_shape)
    pixels = np.zeros((n, *row_shape), dtype=np.uint8 if split is not None else np.float32)
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
        if split is not None:
            array = np.asarray(split.pil(image), dtype=np.uint8)  # [H, W, C]
        else:
            array = np.asarray(preprocess(image), dtype=np.float32)  # [C, H, W]
        if array.shape != row_shape:
            raise ValueError(f"preprocess returned shape {list(array.shape)}, expected {list(row_shape)}")
        pixels[i] = array
        ok[i] = True
    return Decoded(pixels, ok, reasons, errors)
