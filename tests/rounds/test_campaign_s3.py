"""Everything a cluster shares, on a real S3-compatible server (moto).

The jobs write a corpus, the posterior, embeddings, zero-shot reports and a selection there; a whole oracle
campaign runs in an s3:// directory; and the campaign lease works on the object store (one winner, a dead
owner's lease taken over, a live one never, a stalled holder told it lost it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import campaign as campaign_cli
from jobs import embed, fit_posterior, make_world, select, zeroshot
from pipeline.artifacts.posterior import read_info
from pipeline.flows.zeroshot import embedding_files
from pipeline.io import storage
from pipeline.rounds import layout, lease
from pipeline.rounds.state import read_state
from tests.fixtures_s3 import S3Server
from tests.fixtures_world import World

MODEL = "factory:tests.stages.standin:load"


def _ids(uri: str) -> list[str]:
    out: list[str] = []
    for path in embedding_files(uri):
        fs, p = storage.resolve(path)
        out += pq.read_table(p, filesystem=fs, columns=["sample_id"]).column("sample_id").to_pylist()
    return out


def test_make_world_fit_embed_zeroshot_with_every_output_on_s3(
    s3_server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = s3_server.uri("pipeline")
    world, post, emb, zs = (storage.join(root, name) for name in ("world", "post", "emb", "zs"))
    assert make_world.main(["--out", world, "--n", "160", "--corrupt", "0.05", "--per-file", "60"]) == 0
    common = ["--executor", "local"]
    fit = ["--pairs", world, "--model", MODEL, "--out", post, "--block-size", "32", "--no-tracking", *common]
    assert fit_posterior.main(fit) == 0
    info = read_info(post)
    assert info["data"]["rows"] == 160 and storage.is_file(storage.join(post, "image.safetensors"))

    args = ["--images", world, "--posterior", post, "--out", emb, "--rows-per-shard", "40", "--activations"]
    args += [*common, "--no-tracking"]
    assert embed.main(args) == 0
    ids = _ids(emb)
    assert len(ids) == len(set(ids)) and 0 < len(ids) < 160
    capsys.readouterr()
    assert embed.main(args) == 0  # the rerun finds every shard's marker on the object store
    assert "0 processed, 5 already complete" in capsys.readouterr().out

    classes = storage.join(world, "classes", "shape.json")
    tracking = f"sqlite:///{tmp_path}/mlflow.db"  # MLflow's own store; its run gets the report
    args = ["--embeddings", emb, "--classes", classes, "--posterior", post, "--out", zs, "--labels", "shape"]
    assert zeroshot.main([*args, "--tracking-uri", tracking]) == 0
    report = storage.read_json(storage.join(zs, "metrics.json"))
    assert report["n_labelled"] == len(ids) and set(report["metrics"]) == {"MAP", "Bayes"}
    assert len(storage.read_bytes(storage.join(zs, "reliability.png"))) > 1000
    assert sorted(_ids(zs)) == sorted(ids)

    sel = storage.join(root, "sel")
    args = ["--pool", emb, "--posterior", post, "--classes", classes, "--out", sel, "--budget", "5"]
    assert select.main([*args, "--draws", "8", "--no-tracking"]) == 0
    picks = storage.read_parquet(storage.join(sel, "selection.parquet"))["sample_id"].to_pylist()
    assert len(picks) == 5 and set(picks) <= set(ids)
    assert storage.read_json(storage.join(sel, "selection.json"))["selected"] == 5


@pytest.mark.slow
def test_an_oracle_campaign_runs_two_rounds_in_an_s3_directory(
    campaign_world: World, s3_server: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = s3_server.uri("campaigns", "blur-shapes")
    config = s3_server.uri("configs", "campaign.yaml")  # the config may live on the object store too
    storage.write_text(config, yaml.safe_dump(campaign_world.config(max_rounds=2).model_dump(mode="json")))
    assert campaign_cli.main(["init", directory, "--config", config]) == 0
    assert layout.campaign_name(directory) == "blur-shapes"
    assert campaign_cli.main(["run", directory, "--rounds", "2"]) == 0
    assert "2 of 2 rounds done" in capsys.readouterr().out

    assert campaign_cli.main(["status", directory, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rounds_completed"] == 2 and report["lease"] is None  # released: nobody steps it now
    assert [r["state"] for r in report["rounds"]] == ["updated", "updated"]
    assert [r["labels_used"] for r in report["rounds"]] == [6, 12]
    state = read_state(directory)
    assert state.completed == 2
    for name in ("campaign.yaml", "state.json", "cache/model.safetensors", "rounds/001/picks.parquet"):
        assert storage.is_file(storage.join(directory, name)), name
    assert storage.list_files(storage.join(directory, "labels"), suffix=".parquet")
    info = read_info(storage.join(directory, "rounds", "001", "posterior"))
    assert info["lineage"]["labels"] == 12 and info["data"]["campaign"] == "blur-shapes"
    assert (
        info["lineage"]["parent"]
        == read_info(storage.join(directory, "rounds", "000", "posterior"))["posterior_id"]
    )
    assert not storage.exists(storage.join(directory, lease.LEASE_FILE))

    # Done: another step changes nothing.
    before = storage.read_bytes(storage.join(directory, "state.json"))
    assert campaign_cli.main(["step", directory]) == 0
    assert "nothing to do: 2 rounds done" in capsys.readouterr().out
    assert storage.read_bytes(storage.join(directory, "state.json")) == before


# ------------------------------------------------------------------------------------------- the lease

HOLD = """
import sys, time
from pipeline.rounds import lease
held = lease.acquire(sys.argv[1], "test holder", ttl_s=float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def _holder(directory: str, ttl_s: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, directory, str(ttl_s)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _race(directory: str, contenders: int) -> tuple[list[lease.Lease], list[lease.LeaseHeld]]:
    barrier = threading.Barrier(contenders)
    won: list[lease.Lease] = []
    refused: list[lease.LeaseHeld] = []

    def contend(i: int) -> None:
        barrier.wait()
        try:
            won.append(lease.acquire(directory, f"contender {i}"))
        except lease.LeaseHeld as held:
            refused.append(held)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_of_two_contenders_exactly_one_takes_the_lease(s3_server: S3Server) -> None:
    directory = s3_server.uri("camp")
    won, refused = _race(directory, 2)
    assert len(won) == 1 and len(refused) == 1
    assert refused[0].owner["token"] == won[0].owner["token"]  # the loser names the winner
    assert "without changing anything" in str(refused[0])
    held = lease.holder(directory)
    assert held is not None and held["token"] == won[0].owner["token"] and held["ttl_s"] == 60
    won[0].release()
    assert lease.holder(directory) is None and not storage.exists(storage.join(directory, lease.LEASE_FILE))
    with lease.acquire(directory, "again"):
        pass


def test_a_live_lease_is_renewed_and_never_taken_over(
    s3_server: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = s3_server.uri("camp")
    proc = _holder(directory, ttl_s=30.0)
    try:
        assert campaign_cli.main(["step", directory]) == campaign_cli.LEASE_HELD
        err = capsys.readouterr().err
        assert f"pid {proc.pid}" in err and "test holder" in err and "without changing anything" in err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # In-process, with a short TTL: the heartbeat replaces the lease object (a new ETag) while it is held.
    path = storage.join(directory + "-beat", lease.LEASE_FILE)
    with lease.acquire(directory + "-beat", "beating", ttl_s=1.5):
        first = storage.read_versioned(path)
        assert first is not None
        deadline = time.monotonic() + 60
        while (now := storage.read_versioned(path)) is not None and now.etag == first.etag:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.1)
        assert now is not None and json.loads(now.data)["pid"] == os.getpid()


def test_a_dead_owners_lease_is_taken_over_once_it_expires(s3_server: S3Server) -> None:
    directory = s3_server.uri("camp")
    proc = _holder(directory, ttl_s=1.0)
    proc.send_signal(signal.SIGKILL)  # dies holding it: nothing is released, nothing renews it
    proc.wait()
    deadline = time.monotonic() + 60
    while True:
        try:
            taken = lease.acquire(directory, "successor")
            break
        except lease.LeaseHeld as held:
            assert held.owner["pid"] == proc.pid  # refused only while the dead owner's TTL runs
            assert time.monotonic() < deadline, "the expired lease was never taken over"
            time.sleep(0.2)
    with taken:
        assert lease.holder(directory)["token"] == taken.owner["token"]  # type: ignore[index]


def test_of_several_contenders_for_an_expired_lease_exactly_one_wins(s3_server: S3Server) -> None:
    directory = s3_server.uri("camp")
    dead = {"host": "elsewhere", "pid": 1, "since": "2000-01-01T00:00:00Z", "command": "crashed", "ttl_s": 0}
    assert storage.create_exclusive(storage.join(directory, lease.LEASE_FILE), json.dumps(dead).encode())
    assert lease.holder(directory) is None  # expired: nobody holds it
    won, refused = _race(directory, 4)
    assert len(won) == 1 and len(refused) == 3
    assert {r.owner["token"] for r in refused} == {won[0].owner["token"]}
    won[0].release()


def test_a_holder_whose_lease_was_taken_over_deletes_nothing_and_says_so(s3_server: S3Server) -> None:
    directory = s3_server.uri("camp")
    path = storage.join(directory, lease.LEASE_FILE)
    held = lease.acquire(directory, "stalled", ttl_s=1.5)
    successor = json.dumps({"pid": 2, "host": "elsewhere", "ttl_s": 60}).encode()
    for _ in range(50):  # as a successor would after the holder stalled past its TTL (the heartbeat races)
        current = storage.read_versioned(path)
        assert current is not None
        if storage.conditional_put(path, successor, if_match=current.etag) is not None:
            break
    with pytest.raises(lease.LeaseLost, match="taken over by another step"):
        held.release()
    assert storage.read_bytes(path) == successor  # the successor's lease is left alone
