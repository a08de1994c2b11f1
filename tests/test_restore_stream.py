"""The streamed restore's promise, at the core level: pg_restore cannot commit bytes whose sha256 has not
been compared yet. Real PostgreSQL, real pg_dump/pg_restore, a local object store; no Prefect."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.core.catalog import Backup
from flows.core.compression import Compression
from flows.core.dump import DumpResult, stream_dump
from flows.core.layout import LEASE_MARK, manifest_key
from flows.core.localstore import LocalObjectStore
from flows.core.manifest import Manifest
from flows.core.objectstore import MiB
from flows.core.pg_restore import ChecksumMismatch
from flows.core.pgtools import find_tool
from flows.core.restore import RestoreRequest, restore_backup
from tests.harness.factories import (
    conn_params,
    content,
    flip_one_byte_of_row_data,
    make_manifest,
    sample_database,
)
from tests.harness.pg import PgCluster


class StoreThatLingersAtTheEnd(LocalObjectStore):
    """After the last byte it gives pg_restore up to 2 s to finish on its own before reporting the end.

    Were the whole archive fed before the sha256 comparison, pg_restore would COMMIT and exit in that
    time; holding back the last chunk is what keeps it waiting for input, so the wait runs out instead.
    """

    proc: subprocess.Popen[bytes] | None = None
    exited_early: bool = False

    def get_stream(self, key: str, chunk_size: int = MiB) -> Iterator[bytes]:
        yield from super().get_stream(key, chunk_size)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
                self.exited_early = True
            except subprocess.TimeoutExpired:
                pass


def manifest_of(dumped: DumpResult, database: str, compression: Compression) -> Manifest:
    """The manifest of a dump stream_dump just wrote."""
    return make_manifest(
        database=database,
        dump_key=dumped.key,
        bytes=dumped.bytes,
        raw_bytes=dumped.raw_bytes,
        sha256=dumped.sha256,
        compression=compression,
        compression_level=0,
    )


@pytest.mark.parametrize("compression", [Compression.none, Compression.zstd])
def test_changed_byte_found_at_end_of_stream_kills_pg_restore_before_it_commits(
    pg: PgCluster, unique: str, tmp_path: Path, compression: Compression
) -> None:
    name = sample_database(pg, f"stream_{unique}_{compression.value}")
    version = int(pg.sql("SHOW server_version_num")[0][0])
    store = StoreThatLingersAtTheEnd(tmp_path)
    key = f"x/{name}/dumps/2026/01/01/{name}-20260101T000000Z.dump" + (
        ".zst" if compression.value == "zstd" else ""
    )
    pg_dump = find_tool("pg_dump", version)
    dumped = stream_dump(conn_params(pg, name), store, key, tool=pg_dump, compression=compression, level=0)
    manifest = manifest_of(dumped, name, compression)
    stem = key.split(".dump", 1)[0]
    store.put_bytes(manifest_key(stem), manifest.to_json())  # a backup has one (the restore leases it)
    if compression is Compression.none:
        (tmp_path / key).write_bytes(flip_one_byte_of_row_data((tmp_path / key).read_bytes()))
    else:  # the same effect for a zstd object: the stored bytes are not the ones the manifest describes
        manifest = manifest.model_copy(update={"sha256": "0" * 64})
    pg.sql("DELETE FROM images WHERE id > 100", name)
    before = content(pg, name)

    def seen(proc: subprocess.Popen[bytes]) -> None:
        store.proc = proc

    request = RestoreRequest(
        store=store,
        backup=Backup(stem, manifest, [key]),
        target=conn_params(pg, name),
        tool=find_tool("pg_restore", version),
        mode="replace",
    )
    with pytest.raises(ChecksumMismatch, match="stopped before it committed anything"):
        restore_backup(request, on_start=seen, log=lambda _: None)
    assert content(pg, name) == before
    assert not store.exited_early  # pg_restore was still waiting for its last bytes


def test_restore_holds_a_read_lease_while_pg_restore_runs_and_removes_it_after(
    pg: PgCluster, unique: str, tmp_path: Path
) -> None:
    """Retention never deletes a backup a restore reads: the lease is there while pg_restore runs."""
    name = sample_database(pg, f"lease_{unique}", rows=500)
    version = int(pg.sql("SHOW server_version_num")[0][0])
    store = LocalObjectStore(tmp_path)
    stem = f"x/{name}/dumps/2026/01/01/{name}-20260101T000000Z"
    dumped = stream_dump(
        conn_params(pg, name),
        store,
        stem + ".dump",
        tool=find_tool("pg_dump", version),
        compression=Compression.none,
        level=0,
    )
    manifest = manifest_of(dumped, name, Compression.none)
    store.put_bytes(manifest_key(stem), manifest.to_json())
    seen: list[list[str]] = []

    def leases_now(_: subprocess.Popen[bytes]) -> None:
        seen.append([o.key for o in store.list(stem) if LEASE_MARK in o.key])

    request = RestoreRequest(
        store=store,
        backup=Backup(stem, manifest, [dumped.key, manifest_key(stem)]),
        target=conn_params(pg, f"{name}_copy"),
        tool=find_tool("pg_restore", version),
        run_id="r1",
    )
    restore_backup(request, on_start=leases_now, log=lambda _: None)
    assert len(seen) == 1
    assert len(seen[0]) == 1
    assert seen[0][0].startswith(stem + ".reading-r1-")
    assert [o.key for o in store.list(stem) if LEASE_MARK in o.key] == []
    assert pg.sql("SELECT count(*) FROM images", f"{name}_copy")[0][0] == 500
