"""Image decoding and validation: encoded bytes -> preprocessed pixel arrays, or a quarantine reason.

Checks run cheapest first: missing bytes, then the header (`Image.open` reads only the header, so an image
that claims 100k x 100k pixels is rejected before anything is allocated), then the pixel mode, then the
full decode (truncated files fail here), then `preprocess` (the model's transform, PIL -> [3, H, W]).

`split_preprocess` cuts a standard transform where pixels are still uint8 (resize/crop on the decode
workers, the float conversion and normalisation batched on the model side): 4x fewer bytes cross the object
store between decode and model, the per-image `ToTensor` disappears, and the result is bit-identical.
The PIL steps themselves are re-expressed without torch (`Resize`, `CenterCrop`, `ConvertMode`, same size
rules and PIL filters as torchvision's), so a decode worker imports PIL and numpy only: importing torch and
torchvision costs each fresh worker process about 5 s of CPU, which on a small node is stolen from the model.
Steps this module does not know are kept as they are (and then do import their library when unpickled).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from pipeline.data.quarantine import Reason

if TYPE_CHECKING:
    import torch

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


# PIL -> PIL steps that may run before the cut: torchvision's (matched by class) and open_clip's (matched by
# name, so that open_clip is not imported here).
_PIL_STEP_NAMES = frozenset({"MaybeConvertMode", "ResizeKeepRatio", "CenterCropOrPad", "_convert_to_rgb"})


@dataclass(frozen=True)
class Resize:
    """torchvision `Resize` on a PIL image, without torch: the same output-size rule and PIL filter."""

    size: tuple[int, ...]  # (shorter side,) or (height, width)
    resample: int  # PIL filter (torchvision's `pil_modes_mapping` of its interpolation mode)
    max_size: int | None = None  # cap on the longer side (only with a shorter-side size)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if len(self.size) == 1:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size[0], int(self.size[0] * long / short)
            if self.max_size is not None and new_long > self.max_size:
                new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = self.size
        return image if (new_w, new_h) == (w, h) else image.resize((new_w, new_h), self.resample)


@dataclass(frozen=True)
class CenterCrop:
    """torchvision `CenterCrop` on a PIL image, without torch: zero padding when the crop is larger."""

    size: tuple[int, int]  # (height, width)

    def __call__(self, image: Image.Image) -> Image.Image:
        crop_h, crop_w = self.size
        w, h = image.size
        if crop_w > w or crop_h > h:
            dw, dh = max(crop_w - w, 0), max(crop_h - h, 0)
            bands = len(image.getbands())
            fill: Any = (0,) * bands if bands > 1 else 0
            image = ImageOps.expand(image, border=(dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2), fill=fill)
            w, h = image.size
            if (crop_w, crop_h) == (w, h):
                return image
        top, left = round((h - crop_h) / 2.0), round((w - crop_w) / 2.0)  # round-half-even, as torchvision
        return image.crop((left, top, left + crop_w, top + crop_h))


@dataclass(frozen=True)
class ConvertMode:
    """`image.convert(mode)`: open_clip's `MaybeConvertMode` and `_convert_to_rgb` on PIL images."""

    mode: str = "RGB"

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert(self.mode)


@dataclass(frozen=True)
class PilSteps:
    """The PIL part of a transform, applied in order."""

    steps: tuple[Callable[[Image.Image], Image.Image], ...]

    def __call__(self, image: Image.Image) -> Image.Image:
        for step in self.steps:
            image = step(image)
        return image

    @property
    def torch_free(self) -> bool:
        """True when every step is one of this module's: unpickling them imports no torch or open_clip."""
        return all(isinstance(s, (Resize, CenterCrop, ConvertMode)) for s in self.steps)


def native_step(step: Any) -> Callable[[Image.Image], Image.Image]:
    """The torch-free equivalent of a torchvision/open_clip PIL step, or `step` itself when there is none."""
    from torchvision import transforms as T
    from torchvision.transforms.functional import pil_modes_mapping

    if type(step) is T.Resize and step.interpolation in pil_modes_mapping:
        size = (step.size,) if isinstance(step.size, int) else tuple(int(v) for v in step.size)
        if len(size) in (1, 2) and (step.max_size is None or (len(size) == 1 and step.max_size > size[0])):
            return Resize(size, pil_modes_mapping[step.interpolation], step.max_size)
    if type(step) is T.CenterCrop:
        crop = tuple(int(v) for v in step.size)
        if len(crop) == 2:
            return CenterCrop((crop[0], crop[1]))
    name = getattr(step, "__name__", type(step).__name__)
    if name == "MaybeConvertMode":
        return ConvertMode(str(step.mode))
    if name == "_convert_to_rgb":
        return ConvertMode("RGB")
    return step


@dataclass(frozen=True)
class SplitPreprocess:
    """A preprocess transform cut at `ToTensor`: `pil` (PIL -> PIL, per image) then `finish` (batched).

    `finish`: uint8 [N, H, W, C] -> float32 [N, C, H, W] = (x / 255 - mean) / std, the same float32
    operations `ToTensor` + `Normalize` apply per image, so the result is bit-identical.
    """

    pil: PilSteps  # resize / crop / mode steps
    mean: tuple[float, ...] | None  # Normalize mean (None: no Normalize step)
    std: tuple[float, ...] | None  # Normalize std

    def finish(self, pixels: np.ndarray) -> torch.Tensor:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)  # [N, C, H, W] uint8
        x = x.float().div(255)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
            x = x.sub(mean).div(std)
        return x.contiguous()


def split_preprocess(preprocess: Callable[[Image.Image], object]) -> SplitPreprocess | None:
    """`preprocess` as a `SplitPreprocess`, or None when it is not [PIL steps..., ToTensor, Normalize?]."""
    import torch
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", None) or [])
    if not isinstance(preprocess, T.Compose) or not steps:
        return None
    cut = next((i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
    if cut is None or not all(_is_pil_step(s) for s in steps[:cut]):
        return None
    pil = PilSteps(tuple(native_step(s) for s in steps[:cut]))
    tail = steps[cut + 1 :]
    if not tail:
        return SplitPreprocess(pil, None, None)
    norm = tail[0]
    if len(tail) != 1 or not isinstance(norm, T.Normalize) or norm.inplace:
        return None
    mean = tuple(float(v) for v in torch.as_tensor(norm.mean).reshape(-1))
    std = tuple(float(v) for v in torch.as_tensor(norm.std).reshape(-1))
    return SplitPreprocess(pil, mean, std)


def _is_pil_step(step: object) -> bool:
    from torchvision import transforms as T

    return isinstance(step, (T.Resize, T.CenterCrop)) or (
        getattr(step, "__name__", type(step).__name__) in _PIL_STEP_NAMES
    )


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
    preprocess: Callable[[Image.Image], object] | None,
    pixel_shape: tuple[int, int, int],
    *,
    captions: Sequence[str | None] | None = None,
    read_errors: Sequence[str | None] | None = None,
    limits: Limits = Limits(),
    split: SplitPreprocess | None = None,
) -> Decoded:
    """Decode and preprocess `images` (encoded bytes) into one [N, 3, H, W] float32 array.

    With `split` (from `split_preprocess(preprocess)`): only its PIL steps run here and the pixels come
    back as uint8 [N, H, W, C]; `split.finish` turns them into exactly what `preprocess` would have given
    (`preprocess` may then be None).
    `captions` given means the rows are image–text pairs: a missing/blank caption quarantines the row.
    `read_errors[i]` set means the bytes could not be fetched: the row is quarantined as unreadable.
    """
    if preprocess is None and split is None:
        raise ValueError("decode_batch needs a preprocess transform or a split one")
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
            array = np.asarray(preprocess(image), dtype=np.float32)  # type: ignore[misc]  # [C, H, W]
        if array.shape != row_shape:
            raise ValueError(f"preprocess returned shape {list(array.shape)}, expected {list(row_shape)}")
        pixels[i] = array
        ok[i] = True
    return Decoded(pixels, ok, reasons, errors)
