"""pipeline.io.storage against a real S3-compatible server (moto): the same calls as on a local path,
writes that appear whole or not at all, and the conditional writes a lease is built on."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch

from pipeline.io import storage, tensors
from tests.fixtures_s3 import S3Server


def test_roundtrips_listing_and_removal(s3_server: S3Server) -> None:
    root = s3_server.uri("data")
    table = pa.table({"sample_id": ["a", "b"], "score": [0.5, 0.25]})
    storage.write_parquet(table, storage.join(root, "deep", "rows.parquet"))
    storage.write_json(storage.join(root, "info.json"), {"round": 1})
    storage.write_text(storage.join(root, "notes", "note.txt"), "hello")
    digest = tensors.save(storage.join(root, "w.safetensors"), {"w": torch.eye(2)}, {"kind": "test"})

    assert storage.read_parquet(storage.join(root, "deep", "rows.parquet")).equals(table)
    assert storage.read_parquet(storage.join(root, "deep")).num_rows == 2  # a folder of Parquet files
    assert storage.read_json(storage.join(root, "info.json")) == {"round": 1}
    found, header = tensors.load(storage.join(root, "w.safetensors"), sha256=digest)
    assert torch.equal(found["w"], torch.eye(2)) and header == {"kind": "test"}
    assert storage.sha256(storage.join(root, "w.safetensors")) == digest
    assert storage.list_files(root, suffix=".txt") == [storage.join(root, "notes", "note.txt")]
    assert storage.is_file(storage.join(root, "info.json")) and not storage.is_local(root)
    assert storage.exists(storage.join(root, "deep")) and not storage.exists(storage.join(root, "nope"))
    storage.remove(storage.join(root, "deep"))
    assert not storage.exists(storage.join(root, "deep", "rows.parquet"))
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_bytes(storage.join(root, "nope"))


def test_paths_resolve_as_pyarrow_resolves_them(s3_server: S3Server) -> None:
    for uri in (s3_server.uri("a", "b.txt"), s3_server.uri("dir") + "/", f"s3://{s3_server.bucket}"):
        fs, path = storage.resolve(uri)
        _, their_path = pafs.FileSystem.from_uri(uri)
        assert isinstance(fs, pafs.S3FileSystem) and path == their_path, uri
    assert storage.resolve(s3_server.uri("x"))[0] is storage.resolve(s3_server.uri("y"))[0]  # one per bucket


def test_a_failed_write_leaves_the_previous_object(s3_server: S3Server) -> None:
    target = s3_server.uri("state.json")
    storage.write_json(target, {"round": 1})
    with pytest.raises(TypeError), storage.atomic_output(target) as out:
        out.write(b"half a fi")
        raise TypeError("killed mid-write")
    assert storage.read_json(target) == {"round": 1}
    fresh = s3_server.uri("never.json")
    with pytest.raises(TypeError), storage.atomic_output(fresh) as out:
        out.write(b"{")
        raise TypeError("killed mid-write")
    assert not storage.exists(fresh)


def test_create_exclusive_has_exactly_one_winner_among_racing_writers(s3_server: S3Server) -> None:
    target = s3_server.uri("lease")
    contenders = 6
    barrier = threading.Barrier(contenders)
    wins: list[bool] = [False] * contenders

    def race(i: int) -> None:
        barrier.wait()
        wins[i] = storage.create_exclusive(target, f"writer {i}".encode())

    threads = [threading.Thread(target=race, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(wins) == 1
    assert storage.read_text(target) == f"writer {wins.index(True)}"
    assert not storage.create_exclusive(target, b"late")


def test_conditional_replace_and_delete_compare_the_etag(s3_server: S3Server) -> None:
    target = s3_server.uri("obj")
    assert storage.read_versioned(target) is None
    first = storage.conditional_put(target, b"one")
    assert first is not None and storage.conditional_put(target, b"again") is None  # exists already
    current = storage.read_versioned(target)
    assert current is not None and current.data == b"one" and current.etag == first and current.age_s >= 0
    second = storage.conditional_put(target, b"two", if_match=first)
    assert second is not None and second != first
    assert storage.conditional_put(target, b"stale", if_match=first) is None  # someone replaced it since
    assert not storage.conditional_delete(target, first)
    assert storage.read_bytes(target) == b"two"
    assert storage.conditional_delete(target, second) and not storage.exists(target)
    assert not storage.conditional_delete(target, second)  # already gone
    assert storage.conditional_put(target, b"x", if_match=second) is None


def test_conditional_writes_name_what_they_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="s3://"):
        storage.conditional_put(str(tmp_path), b"x")


def test_mlflow_artifacts_upload_from_the_object_store(s3_server: S3Server, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from connectors.tracking import Tracker

    root = s3_server.uri("round")
    storage.write_bytes(storage.join(root, "posterior", "image.safetensors"), b"\x00" * 8)
    storage.write_json(storage.join(root, "posterior", "posterior.json"), {"id": 1})
    storage.write_json(storage.join(root, "metrics.json"), {"ece": 0.1})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Tracker(uri, "s3-artifacts").run("round-0") as run:
        run.log_artifact(storage.join(root, "posterior"), "posterior")
        run.log_artifact(storage.join(root, "metrics.json"))
        with pytest.raises(FileNotFoundError, match="missing"):
            run.log_artifact(storage.join(root, "missing"))
    client = MlflowClient(tracking_uri=uri)
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"posterior", "metrics.json"}
    assert {a.path for a in client.list_artifacts(run.run_id, "posterior")} == {
        "posterior/image.safetensors",
        "posterior/posterior.json",
    }
