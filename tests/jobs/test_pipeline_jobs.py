"""make-world -> fit-posterior -> embed -> zeroshot in-process (local executor), with quarantine and resume.

Uses the stand-in model (`tests/stages/standin.py`) so the pipeline is tested independently of training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import embed, fit_posterior, make_world, zeroshot
from pipeline.artifacts.posterior import load_posterior, read_info
from pipeline.flows.embed import EmbedConfig
from pipeline.flows.embed import embed as run_embed
from pipeline.io import storage
from tests.stages.standin import StandInAdapter

MODEL = "factory:tests.stages.standin:load"
N = 400


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    assert make_world.main(["--out", str(out), "--n", str(N), "--corrupt", "0.05", "--per-file", "150"]) == 0
    return out


def expected_good(world: Path, pairs: bool) -> set[str]:
    table = pa.concat_tables(
        pq.read_table(f, columns=["sample_id", "corruption"]) for f in sorted(world.glob("*.parquet"))
    )
    bad = {"truncated", "empty", "huge_dims", "wrong_mode"} | ({"missing_caption"} if pairs else set())
    return {
        s
        for s, c in zip(table["sample_id"].to_pylist(), table["corruption"].to_pylist(), strict=True)
        if c not in bad
    }


def read_ids(directory: Path) -> list[str]:
    return [
        i for f in sorted(directory.glob("part-*.parquet")) for i in pq.read_table(f)["sample_id"].to_pylist()
    ]


def test_fit_embed_zeroshot(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    post, emb, zs = tmp_path / "post", tmp_path / "emb", tmp_path / "zs"
    args = [
        "--pairs",
        str(world),
        "--model",
        MODEL,
        "--out",
        str(post),
        "--block-size",
        "32",
        "--executor",
        "local",
        "--no-tracking",
    ]
    assert fit_posterior.main(args) == 0
    info = read_info(post)
    assert info["data"]["pairs_used"] == len(expected_good(world, pairs=True))
    assert info["data"]["rows"] == N and sum(info["data"]["quarantined"].values()) == N - info["n"]["image"]
    assert info["prior_precision"]["image"] > 0 and info["model"]["name"] == MODEL
    assert "quarantined:" in capsys.readouterr().out

    args = [
        "--images",
        str(world),
        "--posterior",
        str(post),
        "--out",
        str(emb),
        "--executor",
        "local",
        "--rows-per-shard",
        "64",
        "--activations",
        "--no-tracking",
    ]
    assert embed.main(args) == 0
    capsys.readouterr()
    ids = read_ids(emb)
    assert sorted(ids) == sorted(expected_good(world, pairs=False))  # every good sample exactly once
    table = pq.read_table(sorted(emb.glob("part-*.parquet"))[0])
    assert table.schema.field("mean").type.list_size == 8 and "var" in table.column_names
    meta = json.loads(table.schema.metadata[b"bayescurate"])
    assert meta["posterior_id"] == info["posterior_id"]
    quarantined = pq.read_table(emb / "quarantine")
    assert set(quarantined["reason"].to_pylist()) == {"undecodable", "empty", "absurd_size", "wrong_mode"}
    assert len(ids) + quarantined.num_rows == N

    # Rerun: nothing to do. Interrupted run: drop two shards' outputs, the rerun redoes exactly those.
    assert embed.main(args) == 0
    assert "0 processed, 8 already complete" in capsys.readouterr().out
    for shard in ("00000-000000064", "00002-000000000"):
        (emb / "_done" / f"{shard}.json").unlink()
        (emb / f"part-{shard}.parquet").unlink()
    assert embed.main(args) == 0
    assert "2 processed, 6 already complete" in capsys.readouterr().out
    assert sorted(read_ids(emb)) == sorted(expected_good(world, pairs=False))

    args = [
        "--embeddings",
        str(emb),
        "--classes",
        str(world / "classes" / "shape.json"),
        "--posterior",
        str(post),
        "--out",
        str(zs),
        "--labels",
        "shape",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    ]
    assert zeroshot.main(args) == 0
    report = storage.read_json(zs / "metrics.json")
    assert set(report["metrics"]) == {"MAP", "Bayes"} and report["n_labelled"] == len(ids)
    assert (zs / "reliability.png").stat().st_size > 1000
    assert sorted(read_ids(zs)) == sorted(ids)


def test_rerun_with_other_params_is_refused(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "emb"
    base = [
        "--images",
        str(world),
        "--model",
        MODEL,
        "--no-variance",
        "--out",
        str(out),
        "--executor",
        "local",
        "--no-tracking",
    ]
    assert embed.main(base) == 0
    assert embed.main([*base, "--rows-per-shard", "10"]) == 2
    assert "different shard list" in capsys.readouterr().err


def test_posterior_for_another_model_is_refused(world: Path, tmp_path: Path) -> None:
    post = tmp_path / "post"
    args = [
        "--pairs",
        str(world),
        "--model",
        MODEL,
        "--out",
        str(post),
        "--block-size",
        "50",
        "--executor",
        "local",
        "--no-tracking",
    ]
    assert fit_posterior.main(args) == 0
    other = StandInAdapter()
    other.identity = lambda: {"name": MODEL, "weights_sha256": "other", "embed_dim": 8}  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="weights_sha256"):
        load_posterior(post, other)


def test_embed_trace_reports_actor_times_and_keeps_them_out_of_the_output(
    world: Path, tmp_path: Path
) -> None:
    """The benchmark's timings (setup, forward, head) reach the trace and never the output files."""
    from pipeline.stages.base import trace

    cfg = EmbedConfig(
        images=str(world), out=str(tmp_path / "emb"), model=MODEL,
        variance=False, executor="local", rows_per_shard=100, batch_size=64, tracking=False,
    )  # fmt: skip
    with trace() as tr:
        summary = run_embed(cfg)
    assert summary.embedded == len(expected_good(world, pairs=False))
    assert tr.stage_s["embed_setup"] > 0 and tr.stage_s["embed_forward"] > 0 and "embed_head" in tr.stage_s
    assert sum(rows for _, rows in tr.arrivals) == N
    for part in (tmp_path / "emb").glob("part-*.parquet"):
        assert not [c for c in pq.read_schema(part).names if c.startswith("_")], part


def test_embed_stage_reports_its_setup_with_the_first_batch_only() -> None:
    import numpy as np

    from pipeline.stages.base import TIMING_PREFIX
    from pipeline.stages.embed import EmbedStage, ModelSpec
    from tests.stages.standin import SIDE

    stage = EmbedStage(ModelSpec(MODEL), None, variance=False)
    batch = {"pixels": np.zeros((5, SIDE, SIDE, 3), dtype=np.uint8), "ok": np.ones(5, dtype=bool)}
    first, second = stage(dict(batch)), stage(dict(batch))
    setup = TIMING_PREFIX + "embed_setup"
    assert first[setup].sum() > 0 and np.allclose(first[setup], first[setup][0])
    assert second[setup].sum() == 0 and second[TIMING_PREFIX + "embed_forward"].sum() > 0
