"""The synthetic world of the benchmarks: streamed into part files, deterministic whatever the chunking, and
read unchanged by select and campaigns."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from jobs.annotate_bot import read_truth
from pipeline.artifacts.posterior import load_posterior, projection_sha256, read_info
from pipeline.classes import read_classes
from pipeline.data.sources import read_images
from pipeline.experiments.synthetic_world import WorldSizes, build_world
from pipeline.io import storage, vectors
from pipeline.models.synthetic import LEGACY_MODEL, MODEL
from pipeline.rounds.data import load_rows, write_cache
from pipeline.selection import read_embeddings
from pipeline.stages.embed import ModelSpec

SIZES = WorldSizes(pool=700, targets=24, classes=4, d=24, dt=16, dim=12, pairs=512, rows_per_file=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_world(tmp_path_factory.mktemp("world"), SIZES)


def _parts(folder: str) -> list[pq.ParquetFile]:
    return [pq.ParquetFile(f) for f in storage.list_files(folder, suffix=".parquet")]


def test_the_pool_is_written_in_part_files_with_the_metadata_embed_writes(world: dict[str, str]) -> None:
    assert set(world) == {"posterior", "pool", "targets", "truth", "classes", "images"}
    pool, truth = _parts(world["pool"]), _parts(world["truth"])
    assert [f.metadata.num_rows for f in pool] == [300, 300, 100]
    assert [f.metadata.num_rows for f in truth] == [300, 300, 100]
    assert [f.metadata.num_rows for f in _parts(world["targets"])] == [24]
    schema = pool[0].schema_arrow
    assert schema.names == ["sample_id", "mean", "var", "acts", "source", "domain"]
    assert [schema.field(c).type.list_size for c in ("mean", "var", "acts")] == [12, 12, 25]
    info = read_info(world["posterior"])
    meta = json.loads(schema.metadata[b"bayescurate"])
    assert meta["posterior_id"] == info["posterior_id"] and meta["posterior_id"] is not None
    assert meta["projection_sha256"] == projection_sha256(info)
    assert meta["model"] == info["model"] and meta["model"]["name"] == MODEL
    table = storage.read_parquet(world["pool"])
    ids = table.column("sample_id").to_pylist()
    assert ids == [f"pool-{i:07d}" for i in range(700)]
    assert set(table.column("domain").to_pylist()) == {"clean", "shifted"}
    labels = storage.read_parquet(world["truth"])
    assert labels.column("sample_id").to_pylist() == ids
    assert set(labels.column("label").to_pylist()) == {f"class-{c}" for c in range(4)}
    assert read_truth(world["truth"], "label") == dict(
        zip(ids, labels.column("label").to_pylist(), strict=True)
    )
    targets = storage.read_parquet(world["targets"])
    assert set(targets.column("domain").to_pylist()) == {"shifted"}
    sources = table.column("source").to_pylist()
    assert len(set(sources)) == 700
    assert all(png.startswith(b"\x89PNG") for png in read_images([sources[0], sources[-1]]).values())
    assert read_classes(world["classes"]).names == [f"class-{c}" for c in range(4)]


def test_the_stored_embeddings_are_the_posteriors_of_the_stored_activations(world: dict[str, str]) -> None:
    info = read_info(world["posterior"])
    head = load_posterior(
        world["posterior"], ModelSpec(info["model"]["name"], info["model"]["pretrained"]).load()
    )
    for what in ("pool", "targets"):
        table = storage.read_parquet(world[what])
        acts = vectors.tensor(table, "acts")  # [N, d+1] float64 of the stored float32
        for column, expected in (
            ("mean", head.image.mean(acts)),
            ("var", head.image.embedding_variance(acts)),
        ):
            stored = vectors.tensor(table, column, torch.float32)
            torch.testing.assert_close(stored, expected.float(), rtol=1e-6, atol=1e-7)


def test_the_rows_do_not_depend_on_the_chunking(world: dict[str, str], tmp_path: Path) -> None:
    other = build_world(tmp_path, dataclasses.replace(SIZES, rows_per_file=512), images=False)
    assert "images" not in other and not (tmp_path / "images.parquet").exists()
    assert [f.metadata.num_rows for f in _parts(other["pool"])] == [512, 188]
    for what in ("pool", "targets", "truth"):
        a, b = storage.read_parquet(world[what]), storage.read_parquet(other[what])
        assert a.drop_columns([c for c in ("source",) if c in a.column_names]).equals(b), what


def test_a_finished_world_is_returned_at_once_and_never_rewritten(world: dict[str, str]) -> None:
    root = Path(world["pool"]).parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert build_world(root, SIZES) == world
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match="pool=700 \\(asked 800\\)"):
        build_world(root, dataclasses.replace(SIZES, pool=800))


def test_select_and_campaigns_read_the_world(world: dict[str, str], tmp_path: Path) -> None:
    rows = read_embeddings(world["pool"])
    assert len(rows) == 700 and rows.acts.shape == (700, 25) and rows.mean.shape == (700, 12)
    start = read_info(world["posterior"])
    cache = write_cache(str(tmp_path), world["posterior"], read_classes(world["classes"]))
    assert cache.identity["name"] == MODEL and cache.posterior_id == start["posterior_id"]
    pool = load_rows(world["pool"], cache, start, "pool")
    targets = load_rows(world["targets"], cache, start, "targets")
    assert (len(pool), len(targets)) == (700, 24)
    assert pool.offsets is None and targets.offsets is None  # the means are P a of the stored activations
    assert pool.columns["domain"] == rows.columns["domain"]


def test_posteriors_that_name_the_model_by_its_old_home_still_load(
    world: dict[str, str], tmp_path: Path
) -> None:
    old = tmp_path / "posterior"
    for f in Path(world["posterior"]).iterdir():
        (old / f.name).parent.mkdir(exist_ok=True)
        (old / f.name).write_bytes(f.read_bytes())
    info = read_info(old)
    info["model"]["name"] = LEGACY_MODEL  # as `bench round` wrote them before the model moved
    storage.write_json(old / "posterior.json", info)
    pretrained = info["model"]["pretrained"]
    head = load_posterior(old, ModelSpec(LEGACY_MODEL, pretrained).load())
    assert head.image.prior_precision == read_info(world["posterior"])["prior_precision"]["image"]
    with pytest.raises(ValueError, match="name="):
        load_posterior(old, ModelSpec(MODEL, pretrained).load())
