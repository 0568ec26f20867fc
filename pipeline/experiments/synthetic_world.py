"""A synthetic curation world at a real model's sizes, streamed to disk so that a pool of millions fits.

`build_world(work, sizes)` writes, under `work`:

    posterior/              the starting posterior of `pipeline.models.synthetic.MODEL`: KFAC factors of
                            synthetic contrastive pairs, λ by marginal likelihood (MATH §2-4)
    pool/part-00000.parquet ...     the pool, `rows_per_file` rows a file, as `bayescurate embed
    targets/part-00000.parquet ...  --activations` writes it: sample_id, mean, var, acts, source, domain
    truth/part-00000.parquet ...    the pool's labels (sample_id, label), aligned with the pool's parts
    images.parquet          one tiny PNG repeated, one row per pool row (the rows `source` points at)
    classes.json            class names, prompt, and the truth's label column
    data.json               completion marker (the sizes and the paths): a second call returns at once

The rows are a class-clustered mixture in activation space: `a = c_y + 0.8 ε + s δ` with class centres
`c_y`, `ε ~ N(0, I)` and the shift `δ` added where `s = 1`, the "shifted" domain (a `shift_share` of the
pool, all the targets: EPIG's target set sits in the shifted region). The stored embeddings are the
posterior's mean and variance of the float32 activations as stored, so a reader recovers zero offsets.

Memory stays bounded whatever the pool size: rows are drawn, embedded and appended to the open part file a
block of `DRAW_ROWS` at a time, and every part file is written row group by row group.

Determinism across chunkings: block `b` of the pool (rows `[b·DRAW_ROWS, (b+1)·DRAW_ROWS)`) is drawn from
its own generator, seeded by `(seed, stream, b)`, always in full (the last block is drawn whole and cut),
and embedded whole; part files are cut from that stream of blocks afterwards. So row `i` is a pure function
of `(seed, i)` and the sizes that define the mixture (classes, d, shift_share, the posterior): the same
whatever `rows_per_file`, and a larger pool starts with the rows of a smaller one.
"""

from __future__ import annotations

import io
import json
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.artifacts.posterior import projection_sha256, write_posterior
from pipeline.bayes.contrastive import contrastive_factors
from pipeline.bayes.kron import KronPosterior
from pipeline.io import storage, vectors
from pipeline.models.synthetic import SyntheticAdapter

FORMAT = "bayescurate.synthetic-world/1"
MARKER = "data.json"
DRAW_ROWS = 512  # rows drawn from one generator: part of the world's definition (changing it changes rows)
SPREAD = 0.8  # within-class standard deviation around a class centre (centres and shift are N(0, I))
PAIRS_BLOCK = 1024  # contrastive block of the synthetic pairs behind the posterior
_LAYOUT, _PAIRS, _POOL, _TARGETS = 0, 1, 2, 3  # generator streams: centres and shift, pairs, pool, targets


@dataclass(frozen=True)
class WorldSizes:
    """Sizes of a synthetic world (the defaults: ViT-B/32 with a 100k pool, as `bench round` reports)."""

    pool: int = 100_000  # pool rows
    targets: int = 256  # unlabelled target rows, all in the shifted region
    classes: int = 10  # classes (label "class-<k>")
    d: int = 768  # image activation width (a bias column is appended)
    dt: int = 512  # text activation width
    dim: int = 512  # embedding dimension D
    pairs: int = 8192  # synthetic pairs behind the starting posterior's factors
    seed: int = 0  # model weights and data
    rows_per_file: int = 50_000  # rows per part file (layout only: the rows are the same for any value)
    shift_share: float = 0.5  # share of the pool in the shifted region

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("seed", "shift_share") and value < 1:
                raise ValueError(f"{f.name} must be at least 1, got {value}")
        if self.pairs < 2:
            raise ValueError(f"pairs must be at least 2 (one contrastive block), got {self.pairs}")
        if not 0.0 <= self.shift_share <= 1.0:
            raise ValueError(f"shift_share must lie in [0, 1], got {self.shift_share}")


def build_world(work: Path | str, sizes: WorldSizes, *, images: bool = True) -> dict[str, str]:
    """Write the world under `work` (see the module docstring) and return its paths: posterior, pool,
    targets, truth, classes, and images when `images` (else no image file and no `source` column).

    Idempotent: a finished world (its `data.json`) is returned as it is; one of other sizes raises
    ValueError. An unfinished one (a killed build) is written again from the start.
    """
    root = _root(work)
    marker = storage.join(root, MARKER)
    if storage.is_file(marker):
        return _finished(root, marker, sizes, images)
    paths = {
        name: storage.join(root, name) for name in ("posterior", "pool", "targets", "truth", "classes.json")
    }
    paths["classes"] = paths.pop("classes.json")
    if images:
        paths["images"] = storage.join(root, "images.parquet")
    for name in ("pool", "targets", "truth"):  # parts of a killed build with another rows_per_file
        storage.remove(paths[name])
    adapter = SyntheticAdapter(sizes.d, sizes.dt, sizes.dim, sizes.seed)
    image, info = _posterior(paths["posterior"], adapter, sizes)
    if images:
        _write_images(paths["images"], max(sizes.pool, sizes.targets), sizes.rows_per_file)
    meta = {  # as `bayescurate embed` records it: select, campaigns and curation check the projection
        "posterior_id": info["posterior_id"],
        "posterior_dir": paths["posterior"],
        "projection_sha256": projection_sha256(info),
        "model": adapter.identity(),
        "variance": True,
    }
    rows, per_file = _Rows(sizes, image, paths.get("images"), meta), sizes.rows_per_file
    with _Parts(paths["pool"], per_file) as pool, _Parts(paths["truth"], per_file) as truth:
        for block in range(-(-sizes.pool // DRAW_ROWS)):
            table, labels = rows.block("pool", _POOL, sizes.shift_share, block, sizes.pool)
            pool.write(table)
            truth.write(pa.table({"sample_id": table.column("sample_id"), "label": labels}))
    with _Parts(paths["targets"], per_file) as targets:
        for block in range(-(-sizes.targets // DRAW_ROWS)):
            targets.write(rows.block("targets", _TARGETS, 1.0, block, sizes.targets)[0])
    classes = {"classes": [f"class-{c}" for c in range(sizes.classes)], "prompts": ["a photo of a {}"]}
    classes["label_column"] = "label"  # the truth's column: the oracle label source's default
    storage.write_json(paths["classes"], classes)
    storage.write_json(marker, {"format": FORMAT, "sizes": asdict(sizes), "images": images, "paths": paths})
    return paths


def _root(work: Path | str) -> str:
    """Local paths made absolute (the `source` strings must resolve from any working directory)."""
    return storage.resolve(work)[1] if storage.is_local(work) else str(work).rstrip("/")


def _finished(root: str, marker: str, sizes: WorldSizes, images: bool) -> dict[str, str]:
    found = storage.read_json(marker)
    if "format" not in found:  # written by `bench round` before the world moved here: its paths, flat
        return dict(found)
    wanted = {**asdict(sizes), "images": images}
    have = {**found["sizes"], "images": found["images"]}
    differ = [f"{k}={have.get(k)!r} (asked {v!r})" for k, v in wanted.items() if have.get(k) != v]
    if differ:
        raise ValueError(
            f"{root!r} holds another synthetic world ({', '.join(differ)}): use another directory"
        )
    return dict(found["paths"])


def _posterior(
    out: str, adapter: SyntheticAdapter, sizes: WorldSizes
) -> tuple[KronPosterior, dict[str, Any]]:
    """The starting posterior: factors from synthetic pairs, λ by marginal likelihood (MATH §2-4)."""
    rng = np.random.default_rng([sizes.seed, _PAIRS])
    ones = torch.ones(sizes.pairs, 1, dtype=torch.float64)
    img_acts = torch.from_numpy(rng.standard_normal((sizes.pairs, sizes.d)))  # [P, d]
    txt_acts = torch.from_numpy(rng.standard_normal((sizes.pairs, sizes.dt)))  # [P, dt]
    img_acts, txt_acts = (
        torch.cat([img_acts, ones], 1),
        torch.cat([txt_acts, ones], 1),
    )  # with the bias column
    image_f, text_f = contrastive_factors(
        img_acts, img_acts @ adapter.image_weight().T, txt_acts, txt_acts @ adapter.text_weight().T,
        adapter.likelihood, adapter.scale, adapter.bias, block_size=min(PAIRS_BLOCK, sizes.pairs),
    )  # fmt: skip
    image = KronPosterior.fit(image_f, adapter.image_weight())
    text = KronPosterior.fit(text_f, adapter.text_weight())
    info = write_posterior(
        out, image, text, likelihood=adapter.likelihood, scale=adapter.scale, bias=adapter.bias,
        model=adapter.identity(), provenance={"synthetic_pairs": sizes.pairs, "seed": sizes.seed},
    )  # fmt: skip
    return image, info


class _Rows:
    """Blocks of pool or target rows: drawn, embedded by the posterior, as the columns `embed` writes."""

    def __init__(
        self, sizes: WorldSizes, image: KronPosterior, images: str | None, meta: dict[str, Any]
    ) -> None:
        self.sizes, self.image, self.images = sizes, image, images
        self.metadata = {b"bayescurate": json.dumps(meta).encode()}
        layout = np.random.default_rng([sizes.seed, _LAYOUT])
        self.centres = layout.standard_normal((sizes.classes, sizes.d))  # [C, d]
        self.shift = layout.standard_normal(sizes.d)  # [d]

    def block(self, name: str, stream: int, share: float, block: int, n: int) -> tuple[pa.Table, pa.Array]:
        """Rows `[block·DRAW_ROWS, min((block+1)·DRAW_ROWS, n))` of `name` and their labels."""
        s = self.sizes
        rng = np.random.default_rng([s.seed, stream, block])
        labels = rng.integers(s.classes, size=DRAW_ROWS)  # [B]
        shifted = rng.random(DRAW_ROWS) < share  # [B]
        acts = self.centres[labels] + SPREAD * rng.standard_normal((DRAW_ROWS, s.d))  # [B, d]
        acts += shifted[:, None] * self.shift
        acts = np.concatenate([acts, np.ones((DRAW_ROWS, 1))], 1).astype(np.float32)  # [B, d+1], as stored
        with torch.inference_mode():  # embeddings of the stored activations, the whole block at once
            a = torch.from_numpy(acts).double()
            mean, var = self.image.mean(a), self.image.embedding_variance(a)  # [B, D] each
        lo = block * DRAW_ROWS
        k = min(DRAW_ROWS, n - lo)
        columns: dict[str, Any] = {
            "sample_id": pa.array([f"{name}-{i:07d}" for i in range(lo, lo + k)]),
            "mean": vectors.vector_column(mean[:k]),
            "var": vectors.vector_column(var[:k]),
            "acts": vectors.vector_column(acts[:k]),
        }
        if self.images is not None:
            columns["source"] = pa.array([f"{self.images}#{i}" for i in range(lo, lo + k)])
        columns["domain"] = pa.array(np.where(shifted[:k], "shifted", "clean").tolist())
        table = pa.table(columns).replace_schema_metadata(self.metadata)
        return table, pa.array([f"class-{c}" for c in labels[:k].tolist()])


class _Parts:
    """`part-00000.parquet`, `part-00001.parquet`, ... of `rows_per_file` rows each, filled by appending
    tables (one row group per append); each file appears whole, atomically, once full or at exit, and none
    when the block raised."""

    def __init__(self, folder: str, rows_per_file: int) -> None:
        self.folder, self.rows_per_file = folder, rows_per_file
        self.files = 0
        self._rows = 0
        self._open: tuple[ExitStack, pq.ParquetWriter] | None = None

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._open is None:
                stack = ExitStack()
                path = storage.join(self.folder, f"part-{self.files:05d}.parquet")
                out = stack.enter_context(storage.atomic_output(path))
                self._open = stack, pq.ParquetWriter(out, table.schema, **_encodings(table.schema))
                self.files += 1
            room = self.rows_per_file - self._rows
            self._open[1].write_table(table.slice(0, room))
            self._rows += min(room, table.num_rows)
            table = table.slice(room)
            if self._rows == self.rows_per_file:
                self._finish(None, None, None)

    def _finish(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._open is not None:
            stack, writer = self._open
            self._open, self._rows = None, 0
            writer.close()
            stack.__exit__(kind, exc, tb)  # an exception drops the temporary: no partial file appears

    def __enter__(self) -> _Parts:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._finish(kind, exc, tb)


def _encodings(schema: pa.Schema) -> dict[str, Any]:
    """Vector columns plain and uncompressed: their float32s are incompressible, and Parquet's default
    dictionary attempt on them (abandoned once the dictionary outgrows its page) made the writes 4x slower
    and the files 1.5x larger. Scalar columns keep the defaults (dictionary, snappy)."""
    vector = {f.name for f in schema if pa.types.is_fixed_size_list(f.type)}
    return {
        "use_dictionary": [f.name for f in schema if f.name not in vector],
        "compression": {f.name: "none" if f.name in vector else "snappy" for f in schema},
    }


def _write_images(path: str, n: int, group: int) -> None:
    """`n` rows of one 16x16 PNG, `group` rows a row group: `read_images` reads one group per lookup, and
    no more than a group is ever in memory."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (180, 40, 40)).save(buffer, format="PNG")
    png = buffer.getvalue()
    schema = pa.schema([("image", pa.binary())])
    with storage.atomic_output(path) as out, pq.ParquetWriter(out, schema) as writer:
        for lo in range(0, n, group):
            writer.write_table(pa.table({"image": pa.array([png] * min(group, n - lo), pa.binary())}))
