"""Images of cloud corpora reach the REAL Label Studio by reference, through an S3 storage of the project,
from the REAL moto server of the test session.

Label Studio runs in its own process with its own environment: the storage carries the endpoint and the
credentials. It hands a task's `s3://` image out as `/tasks/<id>/resolve/?fileuri=<base64 URI>`, which
redirects (303) to a URL presigned on moto's endpoint. Reaching moto on loopback works because the local
services run with `SSRF_PROTECTION_ENABLED=false` (with it on, Label Studio refuses a loopback endpoint).
"""

from __future__ import annotations

import base64
import io
import logging
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pytest
import requests
from PIL import Image

from connectors import labelstudio_server, services
from connectors.label_studio import LabelStudioClient, LabelStudioError
from connectors.services import LabelStudioService
from pipeline.annotation import ImageStore, TaskRow, push_tasks, task_images
from pipeline.io import storage
from tests.fixtures_s3 import S3Server
from tests.fixtures_services import TEMPLATE

pytestmark = [pytest.mark.services, pytest.mark.slow]

CLASSES = ["cat", "dog"]
SECRET = "bayescurate-test-secret"  # what tests/fixtures_s3.py sets AWS_SECRET_ACCESS_KEY to


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(out, format="PNG")
    return out.getvalue()


def _row(sample_id: str, rank: int) -> TaskRow:
    return TaskRow(sample_id, round=0, rank=rank, predicted="cat", confidence=0.75, scores={"epig": 0.5})


def _presigned(server: LabelStudioService, task_id: int, image: str) -> str:
    """What an annotator's browser does: the task's image URL (for the task's `s3://` image), then the
    redirect Label Studio answers it with; returns the presigned URL."""
    token = {"Authorization": f"Token {server.token()}"}
    answer = requests.get(f"{server.url}/api/tasks/{task_id}/", headers=token, timeout=30)
    assert answer.status_code == 200, answer.text
    url = answer.json()["data"]["image"]
    parts = urlsplit(url)
    assert parts.path == f"/tasks/{task_id}/resolve/", url
    assert base64.urlsafe_b64decode(parse_qs(parts.query)["fileuri"][0]).decode() == image
    redirect = requests.get(
        f"{server.url}{parts.path}?{parts.query}", headers=token, timeout=30, allow_redirects=False
    )
    assert redirect.status_code == 303, redirect.text
    return str(redirect.headers["Location"])


def test_cloud_images_are_referenced_and_served_to_annotators(
    label_studio_server: LabelStudioService,  # before s3_server: one started here has no AWS variables
    label_studio_client: LabelStudioClient,
    s3_server: S3Server,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    base = s3_server.uri()  # s3://bucket/<unique>
    photo, in_row, on_disk = _png((200, 30, 30)), _png((20, 180, 40)), _png((10, 20, 220))
    # An image-folder corpus on the bucket, a Parquet corpus with the bytes in its rows, a local file.
    storage.write_bytes(f"{base}/corpus/cat/0001.png", photo)
    shard = f"{base}/shards/part-0.parquet"
    storage.write_parquet(pa.table({"sample_id": ["p0", "p1"], "image": [_png((1, 1, 1)), in_row]}), shard)
    (tmp_path / "local.png").write_bytes(on_disk)
    sources = {
        "photo": f"{base}/corpus/cat/0001.png",
        "row": f"{shard}#1",
        "local": str(tmp_path / "local.png"),
        "later": f"{shard}#0",  # picked in a second round
    }
    # A Label Studio that cannot read this disk: no local-files root, only the object store.
    store = ImageStore(None, inline_max_bytes=0, objects=f"{base}/labelstudio/")
    title = f"cloud {uuid.uuid4().hex[:8]}"
    rows = [_row(sid, i) for i, sid in enumerate(sources)]

    first = push_tasks(label_studio_client, title, CLASSES, rows[:3], sources, store, model_version="p-1")
    again = push_tasks(label_studio_client, title, CLASSES, rows, sources, store, model_version="p-1")
    assert (first["created"], again["created"], again["skipped"]) == (3, 1, 3)

    project = label_studio_client.find_project(title)
    assert project is not None
    sdk = label_studio_client.sdk
    stored = {t.data["sample_id"]: t for t in sdk.tasks.list(project=project.id, resolve_uri=False)}
    images = {sid: task.data["image"] for sid, task in stored.items()}
    assert images["photo"] == sources["photo"]  # referenced where it is, never copied
    staged = {sid: images[sid] for sid in ("row", "local", "later")}
    for sid, uri in staged.items():
        assert uri.startswith(f"{base}/labelstudio/") and uri.endswith(f"/{sid}.png"), uri
    assert storage.read_bytes(staged["row"]) == in_row and storage.read_bytes(staged["local"]) == on_disk
    assert all(not v.startswith("data:") for v in images.values())  # nothing inlined into the database
    # Staging again (a push that died before its import) names the same objects, and only those exist.
    assert task_images(store, title, sources).urls == images
    assert storage.list_files(f"{base}/labelstudio/") == sorted(staged.values())

    # One storage, created once, over the folder holding the objects of the first push; never synchronised.
    storages = sdk.import_storage.s3.list(project=project.id)
    assert len(storages) == 1, storages
    s3 = storages[0]
    assert (s3.bucket, s3.prefix, s3.s3endpoint) == (
        s3_server.bucket,
        base.split("/", 3)[3] + "/",
        s3_server.endpoint,
    )
    assert s3.presign and not s3.synchronizable and s3.aws_secret_access_key is None  # never sent back
    # Label Studio resolves s3:// URIs through the first storage of their bucket: one per bucket, any prefix.
    for prefix in (base.split("/", 3)[3], "elsewhere/entirely"):
        assert label_studio_client.ensure_s3_storage(project, s3_server.bucket, prefix) == s3.id
    assert len(sdk.import_storage.s3.list(project=project.id)) == 1

    # Each image reaches an annotator: the task's URL redirects to one presigned on moto's endpoint.
    expected = {"photo": photo, "row": in_row, "local": on_disk, "later": _png((1, 1, 1))}
    for sid, data in expected.items():
        presigned = _presigned(label_studio_server, stored[sid].id, images[sid])
        assert presigned.startswith(s3_server.endpoint + "/") and "X-Amz-Signature=" in presigned, presigned
        assert parse_qs(urlsplit(presigned).query)["X-Amz-Expires"] == ["900"]  # 15 minutes
        image = requests.get(presigned, timeout=30)  # no Label Studio token: the signature is the permission
        assert image.status_code == 200 and image.content == data
        assert image.headers["Content-Type"] == "image/png"

    # Temporary credentials expire: with a session token the storage is renewed in place, like any setting.
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-0123456789")
    assert label_studio_client.ensure_s3_storage(project, s3_server.bucket, presign_ttl_minutes=5) == s3.id
    (renewed,) = sdk.import_storage.s3.list(project=project.id)
    assert renewed.presign_ttl == 5 and renewed.aws_session_token is None
    query = parse_qs(urlsplit(_presigned(label_studio_server, stored["photo"].id, images["photo"])).query)
    assert query["X-Amz-Expires"] == ["300"] and query["X-Amz-Security-Token"] == ["session-token-0123456789"]
    assert SECRET not in caplog.text and "session-token-0123456789" not in caplog.text


def test_no_place_for_an_image_is_a_clear_error(s3_server: S3Server) -> None:
    shard = s3_server.uri("part-0.parquet")
    storage.write_parquet(pa.table({"sample_id": ["a"], "image": [_png((5, 5, 5))]}), shard)
    with pytest.raises(
        ValueError, match=r"'a' \(\d+ bytes, from .*in Label Studio project 'shapes'.*image_store"
    ):
        task_images(ImageStore(None), "shapes", {"a": f"{shard}#0"})
    with pytest.raises(ValueError, match="image_store 'gs://b/x' is not an s3://bucket/prefix URI"):
        ImageStore(None, objects="gs://b/x")
    # Small enough to inline: no store needed (thumbnails only).
    inlined = task_images(ImageStore(None, inline_max_bytes=1 << 20), "shapes", {"a": f"{shard}#0"})
    assert inlined.urls["a"].startswith("data:image/png;base64,") and inlined.buckets == {}


def test_a_storage_error_names_the_bucket_and_project_but_never_the_credentials(
    label_studio_server: LabelStudioService, label_studio_client: LabelStudioClient, s3_server: S3Server
) -> None:
    project = label_studio_client.ensure_project(f"cloud {uuid.uuid4().hex[:8]}", CLASSES)
    with pytest.raises(LabelStudioError) as caught:
        label_studio_client.ensure_s3_storage(project, "no-such-bucket-here", "x")
    message = str(caught.value)
    assert "could not use 's3://no-such-bucket-here/x/'" in message and project.title in message, message
    assert SECRET not in message
    assert label_studio_client.sdk.import_storage.s3.list(project=project.id) == []


def test_with_ssrf_protection_on_a_loopback_endpoint_is_refused_by_name(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why `bayescurate services up` runs Label Studio with SSRF_PROTECTION_ENABLED=false: with it on, an S3
    endpoint on loopback or a private network is refused (HTTP 403, which is not the token's fault)."""
    env = labelstudio_server._labelstudio_env  # the one place the services set Label Studio's environment
    monkeypatch.setattr(
        labelstudio_server, "_labelstudio_env", lambda *a: env(*a) | {"SSRF_PROTECTION_ENABLED": "true"}
    )
    state = services.ensure_services(tmp_path, labelstudio=True, mlflow=False, template_dir=TEMPLATE)
    try:
        assert state.label_studio is not None
        client = LabelStudioClient(state.label_studio.url, state.label_studio.token())
        project = client.ensure_project(f"ssrf {uuid.uuid4().hex[:8]}", CLASSES)
        base = s3_server.uri()
        storage.write_bytes(f"{base}/a.png", _png((9, 9, 9)))
        with pytest.raises(LabelStudioError, match="SSRF_PROTECTION_ENABLED=false") as caught:
            client.ensure_s3_storage(project, s3_server.bucket, base.split("/", 3)[3])
        assert s3_server.endpoint in str(caught.value) and project.title in str(caught.value)
        assert client.sdk.import_storage.s3.list(project=project.id) == []
    finally:
        services.stop_services(tmp_path, labelstudio=True, mlflow=False)
