"""Session-scoped S3-compatible server for the object-storage tests: the real `moto` server on loopback.

It is configured exactly as a user points bayescurate at MinIO or Ceph: through the AWS SDKs' environment
variables (`AWS_ENDPOINT_URL=http://127.0.0.1:PORT`, region, credentials), which pyarrow and boto3 both read.
The user's own AWS configuration files and profile are hidden for the session.

moto checks a conditional PUT (`If-None-Match`, `If-Match`) and then stores the object in two steps, with
no lock between them; real S3 decides each request atomically. The server here serialises requests, one at
a time, so that races between lease contenders are decided the way S3 decides them.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "bayescurate-test"
SERVE = """
import sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()


def serialised(environ, start_response):
    with lock:  # one request at a time: a conditional PUT is checked and applied as one step, as on S3
        return list(app(environ, start_response))


run_simple("127.0.0.1", int(sys.argv[1]), serialised, threaded=True, request_handler=MotoRequestHandler)
"""


@dataclass(frozen=True)
class S3Server:
    """The running server: its endpoint and the session's bucket."""

    endpoint: str  # http://127.0.0.1:PORT (what AWS_ENDPOINT_URL is set to)
    bucket: str

    def uri(self, *parts: str) -> str:
        """A fresh `s3://bucket/<unique>/<parts>` prefix: nothing from another test is under it."""
        return "/".join([f"s3://{self.bucket}", uuid.uuid4().hex[:12], *parts])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the moto server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the moto server did not listen on port {port} within {limit_s:g} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the dev extras)")
    root = tmp_path_factory.mktemp("moto")
    port = _free_port()
    log = root / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=root
        )
    try:
        _wait_ready(proc, port, log)
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bayescurate-test",
            "AWS_SECRET_ACCESS_KEY": "bayescurate-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
        }
        with pytest.MonkeyPatch.context() as patch:
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
                patch.delenv(name, raising=False)
            for name, value in env.items():
                patch.setenv(name, value)
            import boto3

            boto3.session.Session().client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield S3Server(endpoint, BUCKET)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
