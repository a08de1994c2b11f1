"""A test factory for real base backups, filed per the contract in flows/core/base_layout.py.

`pg_basebackup -Ft -D - -X none` against a real archiving cluster, the tar compressed with zstd into a
real store (local directory or the moto S3 server), and a `BaseBackupManifest` written last with the
WAL positions pg_basebackup reported. Stands in for the base_backup flow until it is merged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import zstandard

from flows.core.base_layout import BaseBackupManifest, base_manifest_key, base_stem, tar_key
from flows.core.objectstore import ObjectStore
from flows.core.pgtools import find_tool
from flows.core.wal import parse_lsn, segment_name, segno_of_lsn
from tests.harness.pg import PgCluster, wait_until

_START = re.compile(r"START WAL LOCATION: (\S+) ")


def _setting(cluster: PgCluster, query: str) -> str:
    return str(cluster.sql(query)[0][0])


def take_base_backup(
    cluster: PgCluster,
    store: ObjectStore,
    prefix: str,
    database: str,
    archive_dir: Path | None = None,
    *,
    wal_archived: bool = True,
) -> BaseBackupManifest:
    """Take one real base backup, store it and its manifest; wait until its stop segment is archived."""
    started = datetime.now(UTC)
    label = f"dbops-{database}-{started:%Y%m%dT%H%M%SZ}"
    env = {**os.environ, "PGPASSWORD": cluster.password}
    done = subprocess.run(
        [
            str(find_tool("pg_basebackup", int(_setting(cluster, "SHOW server_version_num"))).path),
            "-h",
            cluster.host,
            "-p",
            str(cluster.port),
            "-U",
            cluster.superuser,
            "-D",
            "-",
            "-Ft",
            "-X",
            "none",
            "--checkpoint=fast",
            "-v",
            f"--label={label}",
        ],
        capture_output=True,
        env=env,
        check=True,
        timeout=120,
    )
    ended = datetime.now(UTC)
    # -X none prints no WAL positions: read them from the tar, as a restore would
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        label_text = tar.extractfile("backup_label").read().decode()  # type: ignore[union-attr]
        pg_manifest = json.loads(tar.extractfile("backup_manifest").read())  # type: ignore[union-attr]
    start_m = _START.search(label_text)
    assert start_m, label_text
    wal_range = pg_manifest["WAL-Ranges"][-1]
    size = int(_setting(cluster, "SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'"))
    tli = int(wal_range["Timeline"])
    start_lsn, stop_lsn = start_m.group(1), wal_range["End-LSN"]
    start_wal = segment_name(tli, segno_of_lsn(parse_lsn(start_lsn), size), size)
    stop_wal = segment_name(tli, segno_of_lsn(parse_lsn(stop_lsn), size), size)
    if archive_dir is not None:
        wait_until(lambda: (archive_dir / stop_wal).exists(), what=f"{stop_wal} archived")
    data = zstandard.ZstdCompressor(level=3).compress(done.stdout)
    # stems are per second: never two base backups in one
    wait_until(lambda: datetime.now(UTC).replace(microsecond=0) > started.replace(microsecond=0), what="tick")
    stem = base_stem(prefix, database, started)
    store.put_bytes(tar_key(stem), data)
    manifest = BaseBackupManifest(
        database=database,
        server=f"{cluster.host}:{cluster.port}",
        system_identifier=_setting(cluster, "SELECT system_identifier FROM pg_control_system()"),
        server_version=_setting(cluster, "SHOW server_version"),
        server_version_num=int(_setting(cluster, "SHOW server_version_num")),
        pg_basebackup_version=_setting(cluster, "SHOW server_version"),
        label=label,
        started_at=started,
        ended_at=ended,
        start_lsn=start_lsn,
        stop_lsn=stop_lsn,
        start_wal=start_wal,
        stop_wal=stop_wal,
        timeline=tli,
        wal_segment_size=size,
        wal_included=False,
        wal_archived=wal_archived,
        tar_key=tar_key(stem),
        bytes=len(data),
        raw_bytes=len(done.stdout),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    store.put_bytes(base_manifest_key(stem), manifest.to_json())
    return manifest
