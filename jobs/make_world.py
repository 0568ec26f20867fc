"""`bayescurate make-world`: write a synthetic image–caption corpus, optionally with bad inputs mixed in.

Also writes `classes/<task>.json` (class names, prompt templates, label column) for `bayescurate zeroshot`.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Annotated

import numpy as np
import typer
from PIL import Image

from jobs._app import ConfigOption, run_command
from pipeline.config import Config, load_config
from pipeline.data import synthetic
from pipeline.data.writers import CorpusFormat, CorpusRecord, write_corpus
from pipeline.io import storage

CORRUPTIONS: tuple[str, ...] = ("truncated", "empty", "huge_dims", "missing_caption", "wrong_mode")


class MakeWorldConfig(Config):
    n: int = 1000  # number of samples
    seed: int = 0  # world seed
    domain: str = "clean"  # synthetic.Domain value
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
        labels = dict(s.labels)
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


def command(
    out: Annotated[str, typer.Option(help="Output directory or URI.")],
    n: Annotated[int | None, typer.Option(help="Number of samples.")] = None,
    seed: Annotated[int | None, typer.Option(help="World seed.")] = None,
    domain: Annotated[str | None, typer.Option(help="clean|unseen_textures|noise|blur|colour_jitter")] = None,
    severity: Annotated[int | None, typer.Option(help="0 for clean, 1..5 for shifted domains.")] = None,
    format: Annotated[CorpusFormat | None, typer.Option(help="parquet|folder|webdataset")] = None,
    corrupt: Annotated[float | None, typer.Option(help="Fraction of bad inputs to inject.")] = None,
    per_file: Annotated[int | None, typer.Option(help="Rows per Parquet file / samples per tar.")] = None,
    start: Annotated[int | None, typer.Option(help="Index of the first sample.")] = None,
    config: ConfigOption = None,
) -> int:
    """Write a synthetic image-caption corpus (Parquet, folder or WebDataset)."""
    cfg = load_config(
        MakeWorldConfig,
        config,
        out=out,
        n=n,
        seed=seed,
        domain=domain,
        severity=severity,
        format=format,
        corrupt=corrupt,
        per_file=per_file,
        start=start,
    )
    if not 0.0 <= cfg.corrupt <= 1.0:
        raise ValueError(f"--corrupt must be a fraction in [0, 1], got {cfg.corrupt}")
    if cfg.n < 1:
        raise ValueError(f"--n must be >= 1, got {cfg.n}")
    written = write_corpus(records(cfg), cfg.out, cfg.format, cfg.per_file)
    write_classes(cfg.out)
    print(f"wrote {written} samples ({cfg.format.value}) to {cfg.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(command, argv, "bayescurate make-world")


if __name__ == "__main__":
    raise SystemExit(main())
