"""A real S3 endpoint for tests: moto's standalone server over HTTP on 127.0.0.1.

boto3 and prefect-aws reach it through `endpoint_url` exactly as they would reach MinIO or AWS; nothing
is patched in-process. Fault injection uses moto's own HTTP control API or stopping the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from deployments.sandbox import free_port

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"


@dataclass
class S3Endpoint:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self, **config: Any) -> Any:  # boto3's S3 client (its stubs are not installed)
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}, **config),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def reset(self) -> None:
        """Forget every bucket: moto's documented reset endpoint."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()


def _wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited early: {log.read_text(errors='replace')[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer at {url} within {timeout}s")


@contextmanager
def s3_endpoint() -> Iterator[S3Endpoint]:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="dbops-moto-", suffix=".log")[1])
    env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(url, proc, log)
        yield S3Endpoint(url=url, process=proc, log_path=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.unlink(missing_ok=True)
