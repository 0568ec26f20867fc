"""Write a synthetic image–caption corpus of the procedural world, optionally with bad inputs mixed in.

Also writes `classes/<task>.json` (class names, prompt templates, label column) for `zeroshot`, `select`
and campaigns. The bad inputs (truncated, empty, absurdly large, caption-less, 16-bit) exercise the
quarantine; which samples are bad is a deterministic function of the seed and the index.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.config import Config
from pipeline.data import synthetic
from pipeline.data.formats import CorpusFormat
from pipeline.data.writers import CorpusRecord, write_corpus
from pipeline.io import storage

CORRUPTIONS: tuple[str, ...] = ("truncated", "empty", "huge_dims", "missing_caption", "wrong_mode")


class MakeWorldConfig(Config):
    """Which samples of the synthetic world to write, where and how."""

    n: int = 1000  # number of samples
    seed: int = 0  # world seed
    domain: synthetic.Domain = synthetic.Domain.CLEAN  # the training distribution or one shift of it
    severity: int = 0  # 0 for clean, 1..5 for shifted domains
    format: CorpusFormat = CorpusFormat.PARQUET  # output layout
    out: str  # output directory or URI
    corrupt: float = 0.0  # fraction of samples replaced by bad inputs (cycling through CORRUPTIONS)
    per_file: int = 5000  # rows per Parquet file / samples per tar
    start: int = 0  # index of the first sample (disjoint splits of the same world)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming `width x height` pixels with no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def corruption_of(seed: int, i: int, fraction: float) -> str | None:
    """The corruption applied to sample `i` (deterministic in seed and index), or None."""
    if fraction <= 0:
        return None
    h = int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") / 2**64
    if h >= fraction:
        return None
    return CORRUPTIONS[int(h / fraction * len(CORRUPTIONS)) % len(CORRUPTIONS)]


def records(cfg: MakeWorldConfig) -> Iterator[CorpusRecord]:
    samples = synthetic.generate(cfg.n, cfg.seed, cfg.domain, cfg.severity, start=cfg.start)
    for i, s in enumerate(samples, start=cfg.start):
        data, caption = _png(s.image), s.caption
        kind = corruption_of(cfg.seed, i, cfg.corrupt)
        labels = {**s.labels, "domain": synthetic.Domain(cfg.domain).value}
        if kind is not None:
            labels["corruption"] = kind
        if kind == "truncated":
            data = data[: len(data) // 2]
        elif kind == "empty":
            data = b""
        elif kind == "huge_dims":
            data = huge_png()
        elif kind == "missing_caption":
            caption = None
        elif kind == "wrong_mode":
            grey = np.asarray(s.image.convert("L"), dtype=np.uint16) * 257
            data = _png(Image.fromarray(grey))
        yield CorpusRecord(s.sample_id, data, caption, labels)


def write_classes(out: str) -> None:
    for task in synthetic.TASKS:
        entry = {
            "task": task,
            "classes": synthetic.class_names(task),
            "prompts": synthetic.prompts(task),
            "label_column": task,
        }
        storage.write_json(f"{out}/classes/{task}.json", entry)


@dataclass(frozen=True)
class WorldResult:
    out: str
    written: int
    format: str


def make_world(cfg: MakeWorldConfig) -> WorldResult:
    """Write the corpus and its class files."""
    if not 0.0 <= cfg.corrupt <= 1.0:
        raise ValueError(f"--corrupt must be a fraction in [0, 1], got {cfg.corrupt}")
    if cfg.n < 1:
        raise ValueError(f"--n must be >= 1, got {cfg.n}")
    written = write_corpus(records(cfg), cfg.out, cfg.format, cfg.per_file)
    write_classes(cfg.out)
    return WorldResult(cfg.out, written, cfg.format.value)
