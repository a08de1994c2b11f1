"""Stored backups for the copy tests, filed exactly as the flows file them (a dump with its roles file,
drill record and a reader's lease; a base backup with PostgreSQL's backup_manifest and a PITR drill
record), each main object with its real sha256 in a verified manifest."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from flows.core.base_layout import (
    BaseBackupManifest,
    BaseVerification,
    base_manifest_key,
    base_stem,
    pg_manifest_key,
    pitr_drill_key,
    tar_key,
)
from flows.core.layout import DRILL_SUFFIX, backup_stem, dump_key, globals_key, lease_key, manifest_key
from flows.core.objectstore import MiB, ObjectStore
from tests.harness.factories import DB, PREFIX, manifest_for

WHEN = datetime(2026, 11, 20, 1, 30, tzinfo=UTC)


def dump_backup(
    store: ObjectStore,
    body: bytes = b"dump bytes " * 1000,
    *,
    verified: bool = True,
    when: datetime = WHEN,
) -> str:
    """A dump as nightly_dump files it (dump, roles file, drill record, a reader's lease, manifest last),
    with the real sha256; returns the manifest key."""
    stem = backup_stem(PREFIX, DB, when)
    store.put_bytes(dump_key(stem, ".zst"), body)
    store.put_bytes(globals_key(stem), b"CREATE ROLE app;\n")
    store.put_bytes(stem + DRILL_SUFFIX, b'{"drill": "passed"}\n')
    store.put_bytes(lease_key(stem, "run-1"), b"{}\n")
    manifest = manifest_for(stem, when).model_copy(
        update={
            "sha256": hashlib.sha256(body).hexdigest(),
            "bytes": len(body),
            "globals_key": globals_key(stem),
            "verified": verified,
        }
    )
    store.put_bytes(manifest_key(stem), manifest.to_json())
    return manifest_key(stem)


def base_backup(store: ObjectStore, body: bytes = b"tar bytes " * 1000, *, when: datetime = WHEN) -> str:
    """A base backup as the base_backup flow files it (tar, PostgreSQL's backup_manifest, PITR drill
    record, a lease, dbops manifest last); returns the manifest key."""
    stem = base_stem(PREFIX, DB, when)
    store.put_bytes(tar_key(stem), body)
    store.put_bytes(pg_manifest_key(stem), b'{"PostgreSQL-Backup-Manifest-Version": 1}\n')
    store.put_bytes(pitr_drill_key(stem), b"{}\n")
    store.put_bytes(f"{stem}.reading-run-2.json", b"{}\n")
    manifest = BaseBackupManifest(
        database=DB,
        server="db:5432",
        system_identifier="7300000000000000001",
        server_version="15.18",
        server_version_num=150018,
        pg_basebackup_version="15.18",
        label=f"dbops-{DB}-{when:%Y%m%dT%H%M%SZ}",
        started_at=when,
        ended_at=when,
        start_lsn="0/2000028",
        stop_lsn="0/2000138",
        start_wal="000000010000000000000002",
        stop_wal="000000010000000000000002",
        timeline=1,
        wal_segment_size=16 * MiB,
        wal_included=False,
        wal_archived=True,
        tar_key=tar_key(stem),
        bytes=len(body),
        raw_bytes=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        pg_manifest_key=pg_manifest_key(stem),
        verified=True,
        verification=BaseVerification(method="list"),
    )
    store.put_bytes(base_manifest_key(stem), manifest.to_json())
    return base_manifest_key(stem)
