"""The one test factory for base backups (the WAL chain, PITR and bench use it): a real
`pg_basebackup -D - -Ft -X none --checkpoint=fast` of a real archiving cluster, zstd-compressed through
flows/core/streams.py into a real store, with a BaseBackupManifest written per flows/core/base_layout.py.

Also the archiving source cluster the PITR tests and the drill share (1 MiB segments, `cp %p DIR/%f`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from flows.core.base_catalog import BaseBackup, BaseCatalog
from flows.core.base_layout import (
    TAR_SUFFIX,
    BaseBackupManifest,
    base_manifest_key,
    base_stem,
    pg_manifest_key,
    tar_key,
)
from flows.core.objectstore import ObjectStore
from flows.core.pgtools import find_tool
from flows.core.postgres import libpq_environment, scalar
from flows.core.streams import hashing, zstd_compress
from flows.core.wal import parse_lsn, walfile_of_lsn
from tests.harness.factories import conn_params
from tests.harness.pg import PgCluster, pg_cluster, wait_until

SMALL_SEGMENTS = ["--wal-segsize=1"]


def server_owned(path: Path) -> Path:
    """Create `path` for the server's OS user to write in (tests run as root, the server as postgres)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres")
    return path


@contextmanager
def archiving_cluster(
    archive_command: str | None = None, **settings: str
) -> Iterator[tuple[PgCluster, Path]]:
    """A cluster archiving with `cp %p ARCHIVE/%f` (or the given command) into a directory beside it."""
    tmp = Path(tempfile.mkdtemp(prefix="dbops-archiving-"))
    os.chmod(tmp, 0o755)
    archive = server_owned(tmp / "wal_archive")
    conf = {
        "wal_level": "replica",
        "archive_mode": "on",
        "archive_command": f"'{archive_command or f'cp %p {archive}/%f'}'",
        **settings,
    }
    try:
        with pg_cluster(conf, base_dir=tmp, initdb_args=SMALL_SEGMENTS) as cluster:
            yield cluster, archive
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def database_block(
    cluster: PgCluster, name: str, user: str | None = None, password: str | None = None
) -> str:
    """A PostgresDatabase block on the cluster's `postgres` database (the superuser unless `user`)."""
    from blocks import PostgresDatabase

    PostgresDatabase(
        host=cluster.host,
        port=cluster.port,
        database="postgres",
        user=user or cluster.superuser,
        password=password or cluster.password,
    ).save(name, overwrite=True)
    return name


def archiver(cluster: PgCluster) -> dict:
    """The cluster's pg_stat_archiver row, by column name."""
    with cluster.connect() as conn:
        cur = conn.execute("SELECT * FROM pg_stat_archiver")
        row = cur.fetchone()
        assert row is not None
        assert cur.description is not None
        return dict(zip([c.name for c in cur.description], row, strict=True))


def switch_wal(cluster: PgCluster) -> str:
    """Write a WAL record, close the segment; returns the closed segment's name."""
    with cluster.connect() as conn:
        conn.execute("SELECT pg_logical_emit_message(false, 'dbops-test', 'x')")
        return str(scalar(conn, "SELECT pg_walfile_name(pg_switch_wal())"))


def switch_and_wait_archived(cluster: PgCluster, count: int = 1) -> list[str]:
    """Close `count` segments one after the other, each archived before the next; returns their names."""
    names = []
    for _ in range(count):
        name = switch_wal(cluster)
        wait_until(
            lambda n=name: (archiver(cluster)["last_archived_wal"] or "") >= n, what=f"{name} archived"
        )
        names.append(name)
    return names


def switch_and_archive(cluster: PgCluster) -> str:
    """Close the current segment and wait until the archiver has copied it; returns its name."""
    with cluster.connect() as conn:
        conn.execute("SELECT pg_logical_emit_message(false, 'dbops-test', 'x')")
        row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
    assert row is not None
    name = row[0]

    def archived() -> bool:
        last = cluster.sql("SELECT last_archived_wal FROM pg_stat_archiver")[0][0]
        return last is not None and last >= name

    wait_until(archived, timeout=60, what=f"{name} archived")
    return str(name)


def tar_to_stdout_argv(pg_basebackup: Path, *extra: str) -> list[str]:
    """pg_basebackup writing one tar to stdout (PostgreSQL puts backup_manifest in it), no WAL in it (the
    archive has it), after a fast checkpoint: how the tests, the bench floor and the flow take one."""
    return [str(pg_basebackup), "-D", "-", "-Ft", "-X", "none", "--checkpoint=fast", *extra]


def take_base_backup(
    cluster: PgCluster,
    store: ObjectStore,
    prefix: str,
    database: str,
    archive_dir: Path | None = None,
    *,
    label: str | None = None,
    wal_archived: bool = True,
) -> BaseBackupManifest:
    """pg_basebackup -Ft to stdout (PostgreSQL injects backup_manifest), zstd, stored with its manifests.

    With `archive_dir`, waits until the stop segment is there; `wal_archived=False` files a manifest that
    does not promise its WAL (what the chain must not trust)."""
    started = datetime.now(UTC)
    label = label or f"dbops-{database}-{started:%Y%m%dT%H%M%SZ}"
    version_num = int(cluster.sql("SHOW server_version_num")[0][0])
    pg_basebackup = find_tool("pg_basebackup", version_num).path
    with libpq_environment(conn_params(cluster, "postgres")) as env:
        run = subprocess.run(
            tar_to_stdout_argv(pg_basebackup, "-l", label),
            capture_output=True,
            env=env,
            timeout=300,
            check=True,
        )
    raw = run.stdout
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        label_file, manifest_file = tar.extractfile("backup_label"), tar.extractfile("backup_manifest")
        assert label_file is not None
        assert manifest_file is not None
        backup_label = label_file.read().decode()
        pg_manifest = manifest_file.read()
    m = re.search(r"START WAL LOCATION: (\S+) \(file (\w+)\)", backup_label)
    assert m, backup_label
    start_lsn, start_wal = m.group(1), m.group(2)
    ranges = json.loads(pg_manifest)["WAL-Ranges"][0]
    stop_lsn, timeline = ranges["End-LSN"], int(ranges["Timeline"])
    with cluster.connect() as conn:
        facts = conn.execute(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
            " (SELECT system_identifier::text FROM pg_control_system()),"
            " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')"
        ).fetchone()
    assert facts is not None
    version, version_num, sysid, segsize = facts
    ended = datetime.now(UTC)
    stop_wal = walfile_of_lsn(timeline, parse_lsn(stop_lsn), segsize)
    if archive_dir is not None:
        wait_until(lambda: (archive_dir / stop_wal).exists(), what=f"{stop_wal} archived")
    # stems are per second: never two base backups in one
    wait_until(lambda: datetime.now(UTC).replace(microsecond=0) > started.replace(microsecond=0), what="tick")
    stem = base_stem(prefix, database, started)
    digest = hashlib.sha256()
    count = [0]
    store.put_stream(tar_key(stem), hashing(zstd_compress([raw]), digest, count), if_absent=True)
    store.put_bytes(pg_manifest_key(stem), pg_manifest)
    manifest = BaseBackupManifest(
        database=database,
        server=f"{cluster.host}:{cluster.port}",
        system_identifier=sysid,
        server_version=version,
        server_version_num=version_num,
        pg_basebackup_version=version,
        label=label,
        started_at=started,
        ended_at=ended,
        start_lsn=start_lsn,
        stop_lsn=stop_lsn,
        start_wal=start_wal,
        stop_wal=stop_wal,
        timeline=timeline,
        wal_segment_size=segsize,
        wal_included=False,
        wal_archived=wal_archived,  # BASE_BACKUP waits for the WAL to be archived (its default WAIT)
        tar_key=tar_key(stem),
        bytes=count[0],
        raw_bytes=len(raw),
        sha256=digest.hexdigest(),
        pg_manifest_key=pg_manifest_key(stem),
    )
    store.put_bytes(base_manifest_key(stem), manifest.to_json())
    return manifest


def catalog_of(*manifests: BaseBackupManifest) -> BaseCatalog:
    """The catalog read_base_catalog would build from these manifests (newest first), without a store."""
    backups = [BaseBackup(m.tar_key.removesuffix(TAR_SUFFIX), m, [m.tar_key]) for m in manifests]
    return BaseCatalog(sorted(backups, key=lambda b: b.manifest.ended_at, reverse=True), [])
