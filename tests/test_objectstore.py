"""The object stores against real backends: the moto S3 server over HTTP and a real directory."""

from __future__ import annotations

import hashlib
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from flows.core.errors import StorageError, StorageUnavailable, is_transient
from flows.core.localstore import LocalObjectStore
from flows.core.objectstore import (
    DEFAULT_PART_SIZE,
    S3_MAX_PART,
    S3_MAX_PARTS,
    S3_MIN_PART,
    MiB,
    part_size_at,
    part_size_for,
)
from flows.core.s3store import S3ObjectStore
from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Endpoint, s3_endpoint

TiB = 1024**4


def count_requests(client, operation: str) -> list[str]:
    """Record every `operation` request the real client sends (botocore's own event hooks, no patching)."""
    calls: list[str] = []
    client.meta.events.register(f"before-call.s3.{operation}", lambda **_: calls.append(operation))
    return calls


def chunked(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# -- S3 (moto server) --------------------------------------------------------------------------------------


def test_multipart_put_stream_round_trips_bytes_exactly_in_five_mib_parts(s3: S3Endpoint, bucket: str):
    client = s3.client()
    store = S3ObjectStore(client, bucket, "prod/db")
    data = os.urandom(12 * MiB + 12345)
    seen: list[int] = []
    uploads = count_requests(client, "UploadPart")

    # 1 MiB asked for, but S3 refuses non-final parts under 5 MiB: the store must round up, not fail.
    result = store.put_stream(
        "dumps/a.dump", chunked(data, 777 * 1024), part_size=1 * MiB, progress=seen.append
    )

    assert result.bytes == len(data)
    assert result.parts == 3
    assert len(uploads) == 3
    assert seen[-1] == len(data)
    assert seen == sorted(seen)
    assert store.get_bytes("dumps/a.dump") == data
    raw = client.get_object(Bucket=bucket, Key="prod/db/dumps/a.dump")["Body"].read()
    assert hashlib.sha256(raw).digest() == hashlib.sha256(data).digest()
    head = store.head("dumps/a.dump")
    assert head is not None
    assert head.size == len(data)
    assert store.list_incomplete_uploads() == []


def test_empty_stream_is_stored_as_an_empty_object(s3: S3Endpoint, bucket: str):
    store = S3ObjectStore(s3.client(), bucket)
    result = store.put_stream("empty", iter(()))
    assert (result.bytes, result.parts) == (0, 1)
    assert store.get_bytes("empty") == b""


def test_failing_writer_aborts_the_multipart_upload_and_leaves_no_object(s3: S3Endpoint, bucket: str):
    store = S3ObjectStore(s3.client(), bucket, "root")

    def writer():
        yield os.urandom(6 * MiB)  # one full part is uploaded before the writer fails
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        store.put_stream("dumps/broken.dump", writer(), part_size=5 * MiB)
    assert store.head("dumps/broken.dump") is None
    assert store.list_incomplete_uploads() == []


def test_list_paginates_and_returns_every_key_with_the_root_stripped(s3: S3Endpoint, bucket: str):
    client = s3.client()
    root_store = S3ObjectStore(client, bucket)
    keys = [f"prod/db/dumps/2026/{i:04d}.dump" for i in range(350)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: root_store.put_bytes(k, b"x"), keys))
    root_store.put_bytes("prod/other/not-listed", b"y")

    store = S3ObjectStore(client, bucket, "prod/db", page_size=100)
    pages = count_requests(client, "ListObjectsV2")
    listed = [o.key for o in store.list("dumps/")]

    assert sorted(listed) == sorted(k.removeprefix("prod/db/") for k in keys)
    assert len(pages) == 4  # 350 keys, 100 per page
    assert all(o.size == 1 for o in store.list("dumps/2026/000"))
    assert [o.key for o in store.list("dumps/2026/000")] == [f"dumps/2026/{i:04d}.dump" for i in range(10)]


def test_delete_of_2500_keys_is_done_in_batches_of_at_most_1000(s3: S3Endpoint, bucket: str):
    client = s3.client()
    store = S3ObjectStore(client, bucket, "r")
    keys = [f"old/{i:05d}" for i in range(2500)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put_bytes(k, b"."), keys))
    store.put_bytes("keep/me", b"k")
    batches = count_requests(client, "DeleteObjects")

    deleted = store.delete(iter(keys))

    assert deleted == 2500
    assert len(batches) == 3
    assert list(store.list("old/")) == []
    assert [o.key for o in store.list("")] == ["keep/me"]


def test_missing_bucket_is_a_permanent_storage_error_in_one_sentence(s3: S3Endpoint, unique: str):
    name = f"no-such-bucket-{unique}"
    store = S3ObjectStore(s3.client(), name, "prod")
    attempts = {
        "put_bytes": lambda: store.put_bytes("k", b"x"),
        "put_stream": lambda: store.put_stream("k", [b"x"]),
        "list": lambda: list(store.list("")),
        "check_writable": lambda: store.check_writable("prod"),
        "get": lambda: store.get_bytes("k"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(StorageError) as info:
            attempt()
        message = str(info.value)
        assert name in message, (what, message)
        assert "does not exist" in message, (what, message)
        assert "\n" not in message, (what, message)
        assert not is_transient(info.value), (what, message)


def test_check_writable_succeeds_and_leaves_nothing_behind(s3: S3Endpoint, bucket: str):
    store = S3ObjectStore(s3.client(), bucket, "prod")
    store.check_writable("db/dumps")
    assert list(store.list("")) == []


def test_s3_endpoint_dying_while_an_object_is_read_back_is_storage_unavailable(unique: str):
    with s3_endpoint() as doomed:
        store = S3ObjectStore(doomed.client(), doomed.create_bucket(f"doomed-{unique}"))
        store.put_bytes("big.dump", os.urandom(48 * MiB))  # far more than the socket buffers hold
        chunks = store.get_stream("big.dump")
        assert len(next(chunks)) == MiB
        doomed.process.kill()
        doomed.process.wait()
        with pytest.raises(StorageUnavailable) as info:
            for _ in chunks:
                pass
    assert is_transient(info.value)
    assert "during get" in str(info.value)


def test_s3_endpoint_not_accepting_connections_is_storage_unavailable():
    # A real listener whose accept queue is full: the kernel drops new SYNs, so connecting times out.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        queued = []
        for _ in range(3):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            queued.append(client)
        try:
            s3_client = boto3.client(
                "s3",
                endpoint_url=f"http://127.0.0.1:{port}",
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name=REGION,
                config=Config(connect_timeout=0.5, read_timeout=1, retries={"max_attempts": 1}),
            )
            with pytest.raises(StorageUnavailable) as info:
                S3ObjectStore(s3_client, "backups").put_bytes("k", b"x")
        finally:
            for client in queued:
                client.close()
    assert is_transient(info.value)
    assert "cannot reach the S3 endpoint" in str(info.value)


# -- part sizes (pure arithmetic) ----------------------------------------------------------------------------


def parts_needed(total: int, base: int) -> int:
    """How many parts put_stream uses for `total` bytes with this base part size."""
    number, covered = 0, 0
    while covered < total:
        number += 1
        covered += part_size_at(number, base)
    return max(number, 1)


@pytest.mark.parametrize("expected", [1, 5 * MiB, 10 * 1024 * MiB, 100 * 1024**3, TiB, 5 * TiB])
def test_part_size_keeps_a_stream_of_the_estimated_size_well_under_10000_parts(expected: int):
    base = part_size_for(expected)
    assert S3_MIN_PART <= base <= S3_MAX_PART
    assert base % MiB == 0
    assert parts_needed(expected, base) <= 5_000


@pytest.mark.parametrize("estimate", [512 * 1024**3, TiB, 5 * TiB])
def test_a_5_tib_stream_fits_under_10000_parts_even_when_the_estimate_was_10x_too_small(estimate: int):
    base = part_size_for(estimate)
    assert parts_needed(5 * TiB, base) < S3_MAX_PARTS


def test_without_an_estimate_the_default_part_size_still_carries_a_1_tib_stream():
    assert parts_needed(TiB, part_size_for(None)) < S3_MAX_PARTS


def test_part_sizes_never_go_under_the_s3_minimum_or_over_the_maximum():
    assert part_size_for(None) == DEFAULT_PART_SIZE
    assert part_size_for(0) == DEFAULT_PART_SIZE
    assert part_size_for(1) >= S3_MIN_PART
    assert part_size_for(10**18) == S3_MAX_PART
    for number in (1, 5_000, 5_001, 6_000, 6_001, 9_999, 10_000):
        assert part_size_at(number, S3_MIN_PART) >= S3_MIN_PART
        assert part_size_at(number, S3_MAX_PART) == S3_MAX_PART
    assert part_size_at(5_000, 8 * MiB) == 8 * MiB
    assert part_size_at(5_001, 8 * MiB) == 16 * MiB
    assert part_size_at(10_000, 8 * MiB) == 8 * MiB * 32


# -- local directory ---------------------------------------------------------------------------------------


def test_local_put_stream_failure_leaves_no_file_and_keeps_the_previous_object(tmp_path: Path):
    store = LocalObjectStore(tmp_path)
    store.put_bytes("dumps/db.dump", b"previous good backup")

    def writer():
        yield b"half a dump" * 1000
        raise OSError("pg_dump died")

    with pytest.raises(OSError, match="pg_dump died"):
        store.put_stream("dumps/db.dump", writer())
    with pytest.raises(OSError, match="pg_dump died"):
        store.put_stream("dumps/new.dump", writer())

    assert all_files(tmp_path) == [tmp_path / "dumps" / "db.dump"]
    assert store.get_bytes("dumps/db.dump") == b"previous good backup"
    assert store.head("dumps/new.dump") is None


def test_local_list_filters_by_prefix_like_s3(tmp_path: Path, s3: S3Endpoint, bucket: str):
    local = LocalObjectStore(tmp_path)
    remote = S3ObjectStore(s3.client(), bucket)
    keys = ["a/b/1", "a/b/2", "a/bc/3", "a/c/4", "ab/5", "z"]
    for key in keys:
        local.put_bytes(key, key.encode())
        remote.put_bytes(key, key.encode())
    (tmp_path / "a" / "b" / ".3.partial-abcd").write_bytes(b"in progress")

    for prefix in ["", "a/", "a/b", "a/b/", "ab", "a/c/4", "nothing/"]:
        got = sorted(o.key for o in local.list(prefix))
        assert got == sorted(o.key for o in remote.list(prefix)), prefix
        assert got == sorted(k for k in keys if k.startswith(prefix)), prefix
    assert {o.key: o.size for o in local.list("a/b/")} == {"a/b/1": 5, "a/b/2": 5}


def test_local_delete_removes_emptied_directories_but_not_the_root(tmp_path: Path):
    root = tmp_path / "store"
    root.mkdir()
    store = LocalObjectStore(root)
    store.put_bytes("x/y/z/1", b"1")
    store.put_bytes("x/keep", b"2")

    assert store.delete(["x/y/z/1", "x/y/z/missing"]) == 1
    assert not (root / "x" / "y").exists()
    assert (root / "x" / "keep").is_file()
    assert store.delete(["x/keep"]) == 1
    assert root.is_dir()
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("key", ["../escape", "a/../../escape", "/../escape"])
def test_local_key_that_escapes_the_directory_is_refused(tmp_path: Path, key: str):
    root = tmp_path / "store"
    root.mkdir()
    store = LocalObjectStore(root)
    for attempt in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.head(key),
        lambda: store.delete([key]),
    ):
        with pytest.raises(StorageError, match="escapes"):
            attempt()
    assert all_files(tmp_path) == []


def test_local_missing_directory_is_a_storage_error_naming_it(tmp_path: Path):
    store = LocalObjectStore(tmp_path / "not-there")
    with pytest.raises(StorageError, match="does not exist"):
        store.put_bytes("k", b"x")
    with pytest.raises(StorageError, match="not-there"):
        list(store.list(""))


def test_local_check_writable_leaves_nothing_behind(tmp_path: Path):
    store = LocalObjectStore(tmp_path)
    store.check_writable("prod/db")
    assert list(tmp_path.iterdir()) == []
