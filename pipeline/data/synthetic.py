"""A deterministic procedural image–caption world: coloured shapes of three sizes on textured backgrounds.

Every sample is a pure function of `(seed, i)` for the scene and `(seed, i, domain, severity)` for the
corruption, so sample `i` of a seed is the same scene in every domain: a shifted test set is the clean one
seen through a corruption, which is what calibration-under-shift needs.

Domains (severity 1..5 for every shifted domain; "clean" has severity 0):
- clean: the training distribution, backgrounds from `TRAIN_TEXTURES`.
- unseen_textures: backgrounds from `UNSEEN_TEXTURES` (never in training); severity raises their contrast.
- noise: additive Gaussian pixel noise.
- blur: Gaussian blur.
- colour_jitter: hue rotation, desaturation and brightness change (moves colours towards their neighbours).

Zero-shot tasks: `class_names(task)` and `prompts(task)` for "shape", "colour" and "size".
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
# name -> RGB; chosen to be far apart in hue so that "colour" is a well-posed task.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 10),
    "yellow": (240, 225, 20),
    "green": (30, 170, 50),
    "cyan": (20, 205, 215),
    "blue": (30, 60, 225),
    "purple": (135, 40, 190),
    "pink": (250, 120, 200),
}
# name -> shape radius in pixels (on the 64-pixel canvas)
SIZES: dict[str, int] = {"small": 9, "medium": 15, "large": 23}
TRAIN_TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "checker")
UNSEEN_TEXTURES: tuple[str, ...] = ("gradient", "noise", "waves")
TEXTURES: tuple[str, ...] = TRAIN_TEXTURES + UNSEEN_TEXTURES
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# Caption templates; some mention only some attributes, so captions also teach partial descriptions
# ("a red shape", "a circle") that zero-shot prompts use.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} on {texture}",
    "a {size} {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {colour} {shape} on {texture}",
    "a {colour} {shape}",
    "a {shape}",
    "a photo of a {shape}",
    "a {colour} shape",
    "a {size} {shape}",
    "a {size} shape",
)

TASKS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
}
PROMPTS: dict[str, tuple[str, ...]] = {
    "shape": ("a photo of a {}", "a {}"),
    "colour": ("a {} shape", "a photo of a {} shape"),
    "size": ("a {} shape",),
}


class Domain(str, Enum):
    """Where a sample comes from: the training distribution or one shift of it."""

    CLEAN = "clean"
    """The training distribution."""
    UNSEEN_TEXTURES = "unseen_textures"
    """Backgrounds never seen in training; severity raises their contrast."""
    NOISE = "noise"
    """Additive Gaussian pixel noise; severity raises its standard deviation."""
    BLUR = "blur"
    """Gaussian blur; severity raises its radius."""
    COLOUR_JITTER = "colour_jitter"
    """Hue rotation, desaturation and brightness change; severity raises all three."""


SHIFTED_DOMAINS: tuple[Domain, ...] = tuple(d for d in Domain if d is not Domain.CLEAN)

# Per severity 1..5.
_NOISE_STD = (10.0, 20.0, 35.0, 55.0, 80.0)  # pixel units (0..255)
_BLUR_RADIUS = (0.8, 1.3, 1.9, 2.6, 3.5)
_HUE_SHIFT = (0.03, 0.06, 0.09, 0.12, 0.16)  # fraction of the hue circle
_SATURATION = (0.85, 0.7, 0.55, 0.4, 0.3)
_BRIGHTNESS = (0.1, 0.18, 0.26, 0.34, 0.42)  # max relative brightness change
_UNSEEN_CONTRAST = (0.3, 0.5, 0.7, 0.85, 1.0)


@dataclass(frozen=True)
class Sample:
    """One image with its caption and ground-truth attributes."""

    sample_id: str  # f"syn-{seed}-{domain}-{severity}-{i}", stable across runs and machines
    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    caption: str
    labels: dict[str, str] = field(default_factory=dict)  # shape, colour, size, texture


@dataclass(frozen=True)
class Scene:
    """The content of one image, before rendering."""

    shape: str
    colour: str
    size: str
    texture: str
    cx: float
    cy: float
    angle: float  # radians
    template: int  # index into CAPTION_TEMPLATES

    @property
    def labels(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "texture": self.texture}

    @property
    def caption(self) -> str:
        return CAPTION_TEMPLATES[self.template].format(**self.labels)


def class_names(task: str) -> list[str]:
    """Class names of a zero-shot task ("shape", "colour" or "size"), in label order."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    return list(TASKS[task])


def prompts(task: str) -> list[str]:
    """Prompt templates (with one `{}` for the class name) of a zero-shot task."""
    if task not in PROMPTS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(PROMPTS)}")
    return list(PROMPTS[task])


def vocabulary() -> list[str]:
    """Every word that captions and prompts of this world can contain, sorted."""
    words: set[str] = set(SHAPES) | set(COLOURS) | set(SIZES) | set(TEXTURES)
    for text in CAPTION_TEMPLATES + sum(PROMPTS.values(), ()):
        words |= {w for w in text.replace("{}", " ").split() if not w.startswith("{")}
    return sorted(words)


def caption_attributes(caption: str) -> dict[str, str]:
    """The attributes a caption mentions, e.g. "a red shape" -> {"colour": "red"}."""
    words = set(caption.lower().split())
    found: dict[str, str] = {}
    for attr, names in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("texture", TEXTURES)):
        for name in names:
            if name in words:
                found[attr] = name
    return found


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _domain_code(domain: Domain) -> int:
    return zlib.crc32(domain.value.encode())


class World:
    """The world of one seed: `world.sample(i, domain, severity)` is a pure function of its arguments."""

    def __init__(self, seed: int = 0, image_size: int = IMAGE_SIZE) -> None:
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        self.seed = int(seed)
        self.image_size = int(image_size)

    def scene(self, i: int, domain: Domain | str = Domain.CLEAN) -> Scene:
        """The content of sample `i`; only the background texture depends on the domain."""
        domain = _check_domain(domain, None)
        rng = _rng(self.seed, i, 0)
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        texture_draw = rng.integers(len(TRAIN_TEXTURES) * len(UNSEEN_TEXTURES))
        if domain is Domain.UNSEEN_TEXTURES:
            texture = UNSEEN_TEXTURES[texture_draw % len(UNSEEN_TEXTURES)]
        else:
            texture = TRAIN_TEXTURES[texture_draw % len(TRAIN_TEXTURES)]
        scale = self.image_size / IMAGE_SIZE
        r = SIZES[size] * scale
        margin = r + 2 * scale
        cx = float(rng.uniform(margin, self.image_size - margin))
        cy = float(rng.uniform(margin, self.image_size - margin))
        angle = float(rng.uniform(-0.35, 0.35))
        template = int(rng.integers(len(CAPTION_TEMPLATES)))
        return Scene(shape, colour, size, texture, cx, cy, angle, template)

    def sample(self, i: int, domain: Domain | str = Domain.CLEAN, severity: int = 0) -> Sample:
        """Render sample `i` of this world in `domain` at `severity`."""
        if i < 0:
            raise ValueError(f"sample index must be non-negative, got {i}")
        domain = _check_domain(domain, severity)
        scene = self.scene(i, domain)
        rng = _rng(self.seed, i, 1)  # rendering noise, shared by all domains
        background = _texture(
            scene.texture, self.image_size, rng, contrast=_texture_contrast(domain, severity)
        )
        image = Image.fromarray(background, "RGB")
        fill = np.clip(np.array(COLOURS[scene.colour]) + rng.integers(-12, 13, size=3), 0, 255)
        _draw_shape(ImageDraw.Draw(image), scene, self.image_size, tuple(int(c) for c in fill))
        if domain not in (Domain.CLEAN, Domain.UNSEEN_TEXTURES):
            image = _corrupt(image, domain, severity, _rng(self.seed, i, 2, _domain_code(domain), severity))
        sample_id = f"syn-{self.seed}-{domain.value}-{severity}-{i}"
        return Sample(sample_id=sample_id, image=image, caption=scene.caption, labels=scene.labels)

    def generate(
        self, n: int, domain: Domain | str = Domain.CLEAN, severity: int = 0, start: int = 0
    ) -> Iterator[Sample]:
        """Samples `start .. start + n - 1`, rendered lazily."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        domain = _check_domain(domain, severity)
        for i in range(start, start + n):
            yield self.sample(i, domain, severity)


def generate(
    n: int, seed: int = 0, domain: Domain | str = Domain.CLEAN, severity: int = 0, start: int = 0
) -> Iterator[Sample]:
    """Stream `n` samples of the world of `seed` (see `World.sample`)."""
    return World(seed).generate(n, domain, severity, start)


def _check_domain(domain: Domain | str, severity: int | None) -> Domain:
    try:
        domain = Domain(domain)
    except ValueError:
        raise ValueError(f"unknown domain {domain!r}; known domains: {[d.value for d in Domain]}") from None
    if severity is None:
        return domain
    if domain is Domain.CLEAN and severity != 0:
        raise ValueError(f"the clean domain has severity 0, got {severity}")
    if domain is not Domain.CLEAN and severity not in SEVERITIES:
        raise ValueError(f"severity of domain {domain.value!r} must be in {list(SEVERITIES)}, got {severity}")
    return domain


def _texture_contrast(domain: Domain, severity: int) -> float:
    return _UNSEEN_CONTRAST[severity - 1] if domain is Domain.UNSEEN_TEXTURES else 1.0


def _texture(name: str, size: int, rng: np.random.Generator, contrast: float = 1.0) -> np.ndarray:
    """A grey-toned background [size, size, 3] uint8; `contrast` scales the pattern around its base tone."""
    base = rng.uniform(90, 170)
    amp = rng.uniform(35, 60) * contrast
    tint = rng.uniform(-8, 8, size=3)  # slight colour cast, far weaker than any shape colour
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(6, 14) * size / IMAGE_SIZE
    phase = rng.uniform(0, 2 * math.pi)
    if name == "plain":
        pattern = np.zeros((size, size), np.float32)
    elif name == "stripes":
        theta = rng.uniform(0, math.pi)
        u = xx * math.cos(theta) + yy * math.sin(theta)
        pattern = np.sign(np.sin(2 * math.pi * u / period + phase))
    elif name == "dots":
        cell = period
        dx = (xx + phase) % cell - cell / 2
        dy = (yy + phase) % cell - cell / 2
        pattern = np.where(dx * dx + dy * dy < (cell / 4) ** 2, 1.0, -1.0)
    elif name == "checker":
        pattern = np.where(((xx // (period / 1.5)) + (yy // (period / 1.5))) % 2 == 0, 1.0, -1.0)
    elif name == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        u = (xx - size / 2) * math.cos(theta) + (yy - size / 2) * math.sin(theta)
        pattern = np.clip(u / (size / 2), -1.0, 1.0) * 1.5
    elif name == "noise":
        coarse = rng.uniform(-1, 1, size=(size // 4, size // 4)).astype(np.float32)
        pattern = np.kron(coarse, np.ones((4, 4), np.float32)) * 1.3
    elif name == "waves":
        pattern = np.sin(2 * math.pi * xx / period + 2.5 * np.sin(2 * math.pi * yy / (2 * period)) + phase)
    else:
        raise ValueError(f"unknown texture {name!r}; known textures: {list(TEXTURES)}")
    grey = base + amp * pattern.astype(np.float32)  # [H, W]
    rgb = grey[:, :, None] + tint[None, None, :].astype(np.float32)  # [H, W, 3]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _polygon(scene: Scene, size: int) -> list[tuple[float, float]]:
    r = SIZES[scene.size] * size / IMAGE_SIZE
    if scene.shape == "square":
        pts = [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]
    elif scene.shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x, y + 0.15) for x, y in pts]
    elif scene.shape == "diamond":
        pts = [(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)]
    elif scene.shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = 1.0 if k % 2 == 0 else 0.42
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif scene.shape == "cross":
        w = 0.33
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(f"no polygon for shape {scene.shape!r}")
    c, s = math.cos(scene.angle), math.sin(scene.angle)
    return [(scene.cx + r * (x * c - y * s), scene.cy + r * (x * s + y * c)) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, scene: Scene, size: int, fill: tuple[int, ...]) -> None:
    if scene.shape == "circle":
        r = SIZES[scene.size] * size / IMAGE_SIZE * 0.9
        draw.ellipse((scene.cx - r, scene.cy - r, scene.cx + r, scene.cy + r), fill=fill)
    else:
        draw.polygon(_polygon(scene, size), fill=fill)


def _corrupt(image: Image.Image, domain: Domain, severity: int, rng: np.random.Generator) -> Image.Image:
    k = severity - 1
    if domain is Domain.BLUR:
        return image.filter(ImageFilter.GaussianBlur(_BLUR_RADIUS[k]))
    if domain is Domain.NOISE:
        pixels = np.asarray(image, np.float32)
        pixels = pixels + rng.normal(0.0, _NOISE_STD[k], size=pixels.shape).astype(np.float32)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if domain is Domain.COLOUR_JITTER:
        hsv = np.asarray(image.convert("HSV"), np.float32)  # [H, W, 3], each 0..255
        hue = _HUE_SHIFT[k] * (1.0 if rng.random() < 0.5 else -1.0)
        hsv[..., 0] = (hsv[..., 0] + 255.0 * hue) % 256.0
        hsv[..., 1] *= _SATURATION[k]
        hsv[..., 2] *= 1.0 + _BRIGHTNESS[k] * (1.0 if rng.random() < 0.5 else -1.0)
        out = Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), "HSV")
        return out.convert("RGB")
    raise ValueError(f"domain {domain.value!r} is not a pixel corruption")
