"""`curate` on the session's small world: its scores against the in-process `choose`, its batches against
independent answers, its outputs, resumption, and the errors a user can make."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.artifacts.posterior import load_posterior, read_info
from pipeline.bayes.batches import batch_keys
from pipeline.bayes.head import Activations
from pipeline.classes import class_text_features, read_classes
from pipeline.flows.curate import CurateConfig, curate
from pipeline.io import storage
from pipeline.selection import SelectionSettings, choose, read_embeddings
from pipeline.stages.embed import ModelSpec
from tests.fixtures_s3 import S3Server
from tests.fixtures_world import World

pytestmark = pytest.mark.slow


def _config(world: World, out: Path, **selection: object) -> CurateConfig:
    fields: dict[str, object] = {
        "pool": str(world.pool),
        "targets": str(world.targets),
        "posterior": str(world.posterior),
        "classes": str(world.classes),
        "out": str(out),
        "executor": "local",
        "tracking": False,
        "rows_per_shard": 50,
        "draws": 16,
    }
    return CurateConfig.model_validate(fields | selection)


def _choose(world: World, **selection: object):  # type: ignore[no-untyped-def]
    info = read_info(world.posterior)
    adapter = ModelSpec(info["model"]["name"], info["model"].get("pretrained")).load()
    head = load_posterior(world.posterior, adapter)
    spec = read_classes(str(world.classes))
    text = Activations(*class_text_features(adapter, spec))
    pool = read_embeddings(str(world.pool)).with_offsets(head)
    targets = read_embeddings(str(world.targets)).with_offsets(head)
    settings = SelectionSettings.model_validate({"draws": 16} | selection)
    return choose(head, text, spec.names, pool, settings, targets=targets), pool


def _scores(out: Path) -> dict[str, float]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted((out / "scores").glob("part-*.parquet")))
    return dict(zip(table["sample_id"].to_pylist(), table["score"].to_pylist(), strict=True))


@pytest.mark.parametrize("method", ["epig", "bald", "entropy"])
def test_scores_are_the_in_process_choices(campaign_world: World, tmp_path: Path, method: str) -> None:
    """Whole pool, exact norm, float64: every row's score equals `choose`'s to 1e-6 relative, and the
    top-k batch is the same list of picks."""
    exact = {"method": method, "batch": "top-k", "norm": "exact", "precision": "float64", "budget": 12}
    result = curate(_config(campaign_world, tmp_path / "c", whole_pool=True, **exact))
    choice, pool = _choose(campaign_world, whole_pool=True, **exact)
    scores = _scores(tmp_path / "c")
    assert result.candidates == len(pool) == len(scores)
    picked = pq.read_table(tmp_path / "c" / "curated.parquet")
    assert picked["sample_id"].to_pylist() == [p.sample_id for p in choice.picks]
    np.testing.assert_allclose(picked["score"].to_numpy(), [p.score for p in choice.picks], rtol=1e-6)
    np.testing.assert_allclose(
        picked["confidence"].to_numpy(), [p.confidence for p in choice.picks], rtol=1e-9
    )
    assert picked["predicted"].to_pylist() == [p.predicted for p in choice.picks]
    assert picked["rank"].to_pylist() == list(range(12))


def test_stochastic_batch_is_the_top_keys_of_the_exact_scores(campaign_world: World, tmp_path: Path) -> None:
    """The batch is the n largest β·log s + Gumbel(seed, sample id), computed here from the scores alone;
    another shard size gives the same batch, another seed another one."""
    settings = {"batch": "stochastic", "beta": 2.0, "budget": 15, "seed": 5, "whole_pool": True}
    curate(_config(campaign_world, tmp_path / "a", **settings))
    scores = _scores(tmp_path / "a")
    ids = sorted(scores)
    keys, _ = batch_keys(np.array([scores[i] for i in ids]), ids, "stochastic", beta=2.0, seed=5)
    expected = [ids[i] for i in np.lexsort((np.array(ids), -keys))[:15]]
    picked = pq.read_table(tmp_path / "a" / "curated.parquet")["sample_id"].to_pylist()
    assert picked == expected
    again = curate(_config(campaign_world, tmp_path / "b", rows_per_shard=17, **settings))
    assert pq.read_table(tmp_path / "b" / "curated.parquet")["sample_id"].to_pylist() == picked
    assert again.batch == "stochastic" and again.norm == "expected" and again.precision == "float32"
    other = curate(_config(campaign_world, tmp_path / "o", **(settings | {"seed": 6})))
    assert other.picks == 15
    assert pq.read_table(tmp_path / "o" / "curated.parquet")["sample_id"].to_pylist() != picked


def test_targeted_candidates_are_each_targets_nearest(campaign_world: World, tmp_path: Path) -> None:
    """The merged per-shard kNN equals faiss flat search over the whole pool (same float32 vectors)."""
    import faiss

    from pipeline.bayes.neighbours import embed_for_search

    result = curate(_config(campaign_world, tmp_path / "k", neighbours=5, metric="cosine", batch="top-k"))
    pool, targets = read_embeddings(str(campaign_world.pool)), read_embeddings(str(campaign_world.targets))
    index = faiss.IndexFlatIP(pool.mean.shape[1])
    index.add(embed_for_search(pool.mean.float(), pool.var.float(), "cosine").numpy())
    _, found = index.search(embed_for_search(targets.mean.float(), targets.var.float(), "cosine").numpy(), 5)
    expected = {pool.sample_ids[i] for i in np.unique(found)}
    assert set(_scores(tmp_path / "k")) == expected and result.candidates == len(expected)


def test_near_duplicates_are_dropped_and_refilled(campaign_world: World, tmp_path: Path) -> None:
    """With the threshold just under the closest pair of the plain batch, that pair loses its worse member,
    the batch is refilled to the budget and no kept pair is above the threshold."""
    from pipeline.bayes.neighbours import embed_for_search

    pool = read_embeddings(str(campaign_world.pool))
    at = {s: i for i, s in enumerate(pool.sample_ids)}
    vectors = embed_for_search(pool.mean.float(), pool.var.float(), "cosine").double()

    def closest(path: Path) -> float:
        chosen = pq.read_table(path / "curated.parquet")["sample_id"].to_pylist()
        v = vectors[[at[s] for s in chosen]]
        return float((v @ v.T - 3 * torch.eye(len(chosen), dtype=v.dtype)).max())

    settings = {"batch": "top-k", "budget": 20, "whole_pool": True}
    plain = curate(_config(campaign_world, tmp_path / "p", **settings))
    threshold = closest(tmp_path / "p") - 1e-4
    deduped = curate(_config(campaign_world, tmp_path / "d", dedupe_cosine=threshold, **settings))
    assert plain.removed_duplicates == 0 and deduped.removed_duplicates >= 1 and deduped.picks == 20
    assert closest(tmp_path / "d") <= threshold + 1e-6  # float32 search vectors


def test_outputs_and_a_rerun_that_redoes_nothing(campaign_world: World, tmp_path: Path) -> None:
    out = tmp_path / "o"
    first = curate(_config(campaign_world, out, budget=8, batch="stochastic", materialize="webdataset"))
    report = json.loads((out / "curate.json").read_text())
    assert report["picks"] == 8 and report["processed_shards"] == report["shards"] > 0
    assert {"knn", "score", "select", "write", "materialize"} <= set(report["stages"])
    table = pq.read_table(out / "curated.parquet")
    assert table.column_names[:7] == [
        "sample_id",
        "source",
        "score",
        "rank",
        "predicted",
        "confidence",
        "entropy",
    ]
    assert "domain" in table.column_names and sum(report["domains"].values()) == 8
    assert report["materialized"]["rows"] + len(report["materialized"]["missing"]) == 8
    assert list((out / "images").glob("shard-*.tar"))
    again = curate(_config(campaign_world, out, budget=8, batch="stochastic"))
    assert again.processed_shards == 0 and again.picks == first.picks
    assert pq.read_table(out / "curated.parquet")["sample_id"].to_pylist() == table["sample_id"].to_pylist()


def test_greedy_batch_conditions_over_the_best_rows(campaign_world: World, tmp_path: Path) -> None:
    """Greedy: `choose`'s greedy batch over the candidates (all of them at this size) with the same seed."""
    result = curate(_config(campaign_world, tmp_path / "g", budget=5, batch="greedy", neighbours=10))
    assert result.batch == "greedy" and result.picks == 5
    choice, _ = _choose(campaign_world, budget=5, batch="greedy", neighbours=10)
    got = pq.read_table(tmp_path / "g" / "curated.parquet")
    assert set(got["sample_id"].to_pylist()) <= set(_scores(tmp_path / "g"))
    assert len(choice.picks) == 5 and choice.batch.value == "greedy"


def test_mistakes_are_named(campaign_world: World, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--method epig needs --targets"):
        curate(_config(campaign_world, tmp_path / "e", targets=None))
    big = curate(_config(campaign_world, tmp_path / "b", budget=10_000, batch="top-k", neighbours=3))
    assert big.picks == big.candidates and "above the" in (big.message or "")
    stale = tmp_path / "stale"
    stale.mkdir()
    table = pq.read_table(next(Path(campaign_world.pool).glob("part-*.parquet")))
    meta = json.loads(table.schema.metadata[b"bayescurate"]) | {"projection_sha256": "0" * 64}
    pq.write_table(
        table.replace_schema_metadata({b"bayescurate": json.dumps(meta).encode()}), stale / "p.parquet"
    )
    with pytest.raises(ValueError, match="stale, re-embed it"):
        curate(_config(campaign_world, tmp_path / "s", pool=str(stale)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "part-0.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match="not readable Parquet"):
        curate(_config(campaign_world, tmp_path / "x", pool=str(broken)))


# ---------------------------------------------------------------------------------------------- on S3


def _upload(folder: Path, uri: str) -> str:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(uri, *path.relative_to(folder).parts), path.read_bytes())
    return uri


def test_curates_from_and_to_s3_as_it_does_on_disk(
    campaign_world: World, s3_server: S3Server, tmp_path: Path
) -> None:
    """Pool, targets and outputs on the real (moto) S3 server: the same picks and scores as on local disk."""
    root = s3_server.uri("curate")
    pool = _upload(Path(campaign_world.pool), storage.join(root, "pool"))
    targets = _upload(Path(campaign_world.targets), storage.join(root, "targets"))
    out = storage.join(root, "out")
    settings = {"budget": 8, "batch": "stochastic", "materialize": "parquet"}
    local = curate(_config(campaign_world, tmp_path / "local", **settings))
    remote = curate(_config(campaign_world, tmp_path / "unused", **settings).model_copy(
        update={"pool": pool, "targets": targets, "out": out}
    ))  # fmt: skip
    assert remote.picks == local.picks == 8
    ours = storage.read_parquet(storage.join(out, "curated.parquet"))
    theirs = pq.read_table(tmp_path / "local" / "curated.parquet")
    for column in ("sample_id", "score", "rank", "predicted"):
        assert ours[column].to_pylist() == theirs[column].to_pylist(), column
    report = storage.read_json(storage.join(out, "curate.json"))
    written = report["materialized"]
    assert report["picks"] == 8 and written["rows"] + len(written["missing"]) == 8
    assert storage.list_files(storage.join(out, "images"), suffix=".parquet")
    again = curate(_config(campaign_world, tmp_path / "unused", **settings).model_copy(
        update={"pool": pool, "targets": targets, "out": out}
    ))  # fmt: skip
    assert again.processed_shards == 0  # resumed from the score markers on S3
