"""Point-in-time recovery against real clusters: a real archiving source (1 MiB segments), a real
pg_basebackup stored zstd-compressed, and a real scratch server per recovery on a free port, stopped in a
finalizer. Faults are real: a segment removed from a copy of the archive, a byte flipped in the object."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flows.core.base_catalog import read_base_catalog
from flows.core.base_layout import BaseBackupManifest
from flows.core.localstore import LocalObjectStore
from flows.core.objectstore import ObjectStore
from flows.core.pitr.errors import ExtractionFailed, RecoveryFailed, RecoveryRefused
from flows.core.pitr.extract import extract_base_backup, server_user
from flows.core.pitr.recovery import PitrReport, RecoveryProgress, recover_cluster
from flows.core.pitr.selection import choose_base_backup
from flows.core.pitr.server import PgServer
from flows.core.pitr.targets import RecoveryTarget, parse_target
from flows.core.s3store import S3ObjectStore
from flows.core.wal_archive import ArchiveLocation, WalArchive
from tests.harness.basebackup import archiving_cluster, catalog_of, switch_and_archive, take_base_backup
from tests.harness.pg import PgCluster, free_port
from tests.harness.s3 import S3Endpoint

APP_PASSWORD = "app-Secret-7f3e9c1d"
REPLICATION_PASSWORD = "repl-Secret-a9b8c7d6"


@dataclass
class Source:
    cluster: PgCluster
    archive_dir: Path
    store: LocalObjectStore
    manifest: BaseBackupManifest
    between_time: datetime  # after "a" committed, before "b"
    between_lsn: str  # after "e" committed, before "f"
    last_segment: str


def _commit(cluster: PgCluster, name: str) -> None:
    cluster.sql("INSERT INTO events (name) VALUES (%s)", dbname="app", params=(name,))


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    with archiving_cluster() as (cluster, archive_dir):
        cluster.create_role("app_owner", APP_PASSWORD)
        cluster.create_database("app", owner="app_owner")
        # a standby's connection string with a password, copied into every base backup of this cluster
        cluster.set(primary_conninfo=f"host=10.0.0.9 user=replicator password={REPLICATION_PASSWORD}")
        cluster.sql(
            "CREATE TABLE events (name text PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())", "app"
        )
        cluster.sql("ALTER TABLE events OWNER TO app_owner", "app")
        _commit(cluster, "before-backup")
        (cluster.base_dir.parent / "store").mkdir()
        store = LocalObjectStore(cluster.base_dir.parent / "store")
        manifest = take_base_backup(cluster, store, "prod", "app")
        _commit(cluster, "a")
        between_time = cluster.sql("SELECT clock_timestamp()")[0][0]
        _commit(cluster, "b")
        switch_and_archive(cluster)  # spread the story over several segments
        _commit(cluster, "c")
        cluster.sql("SELECT pg_create_restore_point('dbops-test-rp')")
        _commit(cluster, "d")
        switch_and_archive(cluster)
        _commit(cluster, "e")
        between_lsn = str(cluster.sql("SELECT pg_current_wal_insert_lsn()")[0][0])
        _commit(cluster, "f")
        switch_and_archive(cluster)
        _commit(cluster, "g")
        last = switch_and_archive(cluster)
        yield Source(cluster, archive_dir, store, manifest, between_time, between_lsn, last)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the server's OS user can reach (pytest's tmp_path is 0700 root)."""
    tmp = Path(tempfile.mkdtemp(prefix="dbops-pitr-"))
    os.chmod(tmp, 0o755)
    yield tmp
    if not os.environ.get("DBOPS_KEEP_SCRATCH"):
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def servers() -> Iterator[list[PgServer]]:
    started: list[PgServer] = []
    yield started
    for server in started:
        server.stop("immediate")


def _recover(
    source: Source,
    target: RecoveryTarget,
    scratch: Path,
    servers: list[PgServer],
    archive: WalArchive | None = None,
    store: ObjectStore | None = None,
    manifests: list[BaseBackupManifest] | None = None,
    progress: list[RecoveryProgress] | None = None,
) -> tuple[PitrReport, PgServer]:
    archive = archive or WalArchive(LocalObjectStore(source.archive_dir))
    store = store or source.store
    choice = choose_base_backup(catalog_of(*(manifests or [source.manifest])), target, archive)
    report, server = recover_cluster(
        database="app",
        store=store,
        archive=archive,
        choice=choice,
        target=target,
        data_directory=scratch / "data",
        port=free_port(),
        login_user="app_owner",
        login_database="app",
        user=server_user(),
        keep_running=True,
        timeout=120,
        on_progress=progress.append if progress is not None else None,
        progress_every=0 if progress is not None else 10,
    )
    servers.append(server)
    return report, server


def _events(server: PgServer) -> set[str]:
    with server.connect("postgres", "app") as conn:
        return {row[0] for row in conn.execute("SELECT name FROM events").fetchall()}


def test_recovery_to_a_time_between_two_commits_has_the_first_and_not_the_second(
    source: Source, scratch: Path, servers: list[PgServer]
) -> None:
    target = parse_target(time=source.between_time.isoformat())
    report, server = _recover(source, target, scratch, servers)
    assert _events(server) == {"before-backup", "a"}
    assert report.reached_timestamp is not None
    assert report.reached_timestamp <= source.between_time
    assert report.stopped_by
    assert "before commit" in report.stopped_by
    assert report.segments_replayed >= 1
    assert report.bytes_downloaded > source.manifest.bytes
    assert "pg_verifybackup" in report.verified
    st = (scratch / "data").stat()
    assert st.st_mode & 0o777 == 0o700
    if os.geteuid() == 0:
        import pwd

        assert pwd.getpwuid(st.st_uid).pw_name == "postgres"


def test_recovery_to_a_restore_point_has_what_came_before_it(
    source: Source, scratch: Path, servers: list[PgServer]
) -> None:
    report, server = _recover(source, parse_target(restore_point="dbops-test-rp"), scratch, servers)
    assert _events(server) == {"before-backup", "a", "b", "c"}
    assert report.stopped_by
    assert "dbops-test-rp" in report.stopped_by


def test_recovery_to_an_lsn_has_what_came_before_it(
    source: Source, scratch: Path, servers: list[PgServer]
) -> None:
    progress: list[RecoveryProgress] = []
    report, server = _recover(
        source, parse_target(lsn=source.between_lsn), scratch, servers, progress=progress
    )
    assert _events(server) == {"before-backup", "a", "b", "c", "d", "e"}
    assert report.reached_lsn is not None
    # progress reports (every 10 s in a flow; every poll here) carry segments, LSN, bytes and an ETA
    assert progress
    assert progress[-1].bytes_downloaded >= source.manifest.bytes
    # how many samples fall inside the replay depends on the machine's speed: the rule is checked on those
    # that do, and the final report says what was replayed
    assert report.segments_replayed >= 1
    assert all(p.eta_seconds is not None for p in progress if p.segments_replayed >= 1)


def test_latest_reaches_the_last_archived_transaction_from_s3(
    source: Source, scratch: Path, servers: list[PgServer], s3: S3Endpoint, unique: str
) -> None:
    """WAL gzip-compressed in S3 (barman-cloud's per-log layout), the base backup in S3 too."""
    bucket = s3.create_bucket(f"pitr-{unique}")
    client = s3.client()
    for path in sorted(source.archive_dir.iterdir()):
        body = gzip.compress(path.read_bytes())
        key = (
            f"pg/wals/{path.name[:16]}/{path.name}.gz" if len(path.name) == 24 else f"pg/wals/{path.name}.gz"
        )
        client.put_object(Bucket=bucket, Key=key, Body=body)
    store = S3ObjectStore(client, bucket, "backups")
    for key in (source.manifest.tar_key,):
        store.put_bytes(key, source.store.get_bytes(key))
    archive = WalArchive(S3ObjectStore(client, bucket, ""), "pg/wals")
    _report, server = _recover(
        source, parse_target(latest=True), scratch, servers, archive=archive, store=store
    )
    assert _events(server) == {"before-backup", "a", "b", "c", "d", "e", "f", "g"}
    with server.connect("postgres", "app") as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        assert conn.execute("SHOW archive_mode").fetchone() == ("off",)


def test_immediate_stops_at_consistency(source: Source, scratch: Path, servers: list[PgServer]) -> None:
    report, server = _recover(source, parse_target(immediate=True), scratch, servers)
    assert _events(server) == {"before-backup"}
    assert report.reached_lsn is not None


def test_a_target_beyond_the_archive_is_refused_before_anything_is_downloaded(
    source: Source, scratch: Path
) -> None:
    archive = WalArchive(LocalObjectStore(source.archive_dir))
    target = parse_target(time=datetime.now(UTC) - timedelta(milliseconds=1))
    with pytest.raises(RecoveryRefused) as err:
        choose_base_backup(catalog_of(source.manifest), target, archive)
    message = str(err.value)
    assert "recoverable from" in message
    assert "after the last archived segment" in message
    assert source.last_segment in message
    assert not (scratch / "data").exists()


def test_a_target_in_the_future_and_a_naive_time_are_refused() -> None:
    with pytest.raises(RecoveryRefused, match="in the future"):
        parse_target(time=(datetime.now(UTC) + timedelta(minutes=5)).isoformat())
    with pytest.raises(RecoveryRefused, match="no time zone"):
        parse_target(time="2026-11-29T09:00:00")
    with pytest.raises(RecoveryRefused, match="exactly one"):
        parse_target(latest=True, lsn="0/1")


def test_no_base_backup_is_refused(source: Source) -> None:
    catalog = read_base_catalog(source.store, "prod", "other")
    assert catalog.backups == []
    assert catalog.unreadable == []
    with pytest.raises(RecoveryRefused, match="no base backup"):
        choose_base_backup(
            catalog, parse_target(latest=True), WalArchive(LocalObjectStore(source.archive_dir))
        )


def _archive_without(source: Source, scratch: Path, index: int) -> tuple[WalArchive, str]:
    """A copy of the archive with one segment after the base backup removed (a real missing file)."""
    copy = scratch / "archive-copy"
    shutil.copytree(source.archive_dir, copy)
    segments = sorted(
        p.name for p in copy.iterdir() if len(p.name) == 24 and p.name > source.manifest.stop_wal
    )
    victim = segments[index]
    (copy / victim).unlink()
    return WalArchive(LocalObjectStore(copy)), victim


def test_a_missing_segment_is_named_as_the_reason_recovery_stopped(
    source: Source, scratch: Path, servers: list[PgServer]
) -> None:
    archive, victim = _archive_without(source, scratch, 1)
    with pytest.raises(RecoveryFailed) as err:
        _recover(source, parse_target(restore_point="dbops-test-rp"), scratch, servers, archive=archive)
    assert err.value.missing_segment == victim
    assert "recovery ended before the target" in str(err.value)
    assert victim in str(err.value)
    assert "last replayed LSN" in str(err.value)


def test_a_missing_segment_before_a_time_target_is_refused_up_front(source: Source, scratch: Path) -> None:
    archive, victim = _archive_without(source, scratch, 0)
    target = parse_target(time=datetime.now(UTC) - timedelta(seconds=0.001))
    with pytest.raises(RecoveryRefused) as err:
        choose_base_backup(catalog_of(source.manifest), target, archive)
    assert victim in str(err.value)


def test_no_credential_in_the_recovered_directory_or_in_ps_during_recovery(
    source: Source, scratch: Path, servers: list[PgServer]
) -> None:
    seen: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _report, _server = _recover(source, parse_target(latest=True), scratch, servers)
    finally:
        stop.set()
        sampler.join()
    # the samples span the recovery: the recovering server's processes carry the new cluster_name
    assert any("dbops-pitr-app" in s for s in seen)
    secrets_ = [APP_PASSWORD, REPLICATION_PASSWORD, source.cluster.password]
    for text in seen:
        for secret in secrets_:
            assert secret not in text
    leaked = []
    for root in (scratch / "data", scratch / "data.dbops-pitr"):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                leaked += [f"{path}" for s in secrets_ if s.encode() in data]
    assert leaked == []
    auto = (scratch / "data" / "postgresql.auto.conf").read_text()
    assert "primary_conninfo = ''" in auto
    assert "archive_mode = off" in auto


def test_a_damaged_base_backup_stops_extraction_and_leaves_nothing(source: Source, scratch: Path) -> None:
    (scratch / "store").mkdir()
    store = LocalObjectStore(scratch / "store")
    data = bytearray(source.store.get_bytes(source.manifest.tar_key))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(source.manifest.tar_key, bytes(data))
    with pytest.raises(ExtractionFailed):
        extract_base_backup(store, source.manifest, scratch / "data", server_user())
    assert not (scratch / "data").exists()
    # a readable object that is not the one the manifest describes: unpacked whole, then removed
    wrong = source.manifest.model_copy(update={"sha256": "0" * 64})
    (scratch / "data").mkdir()  # an empty directory is kept, emptied
    with pytest.raises(ExtractionFailed, match="does not match its manifest"):
        extract_base_backup(source.store, wrong, scratch / "data", server_user())
    assert list((scratch / "data").iterdir()) == []


def test_a_tar_member_outside_the_data_directory_is_refused(source: Source, scratch: Path) -> None:
    import hashlib
    import io
    import tarfile

    from flows.core.streams import zstd_compress

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("PG_VERSION", "../escaped"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"15\n"))
    stored = b"".join(zstd_compress([buf.getvalue()]))
    (scratch / "store").mkdir()
    store = LocalObjectStore(scratch / "store")
    store.put_bytes(source.manifest.tar_key, stored)
    manifest = source.manifest.model_copy(
        update={"sha256": hashlib.sha256(stored).hexdigest(), "bytes": len(stored)}
    )
    with pytest.raises(ExtractionFailed, match="unsafe member"):
        extract_base_backup(store, manifest, scratch / "data", server_user())
    assert not (scratch / "data").exists()
    assert not (scratch / "escaped").exists()


def test_the_server_log_says_why_recovery_ended() -> None:
    from flows.core.pitr.server import parse_log

    facts = parse_log(
        "2026-11-29 12:26:49.822 UTC [1] LOG:  redo done at 0/C00160 system usage: CPU: user: 0.00 s\n"
        "2026-11-29 12:26:49.822 UTC [1] LOG:  last completed transaction was at log time "
        "2026-11-29 12:26:45.166168+00\n"
        "2026-11-29 12:26:49.823 UTC [1] FATAL:  "
        "recovery ended before configured recovery target was reached\n"
    )
    assert facts.redo_done_lsn == "0/C00160"
    assert facts.last_transaction == "2026-11-29 12:26:45.166168+00"
    assert facts.fatal == "recovery ended before configured recovery target was reached"


def test_recovery_settings_drop_production_connection_and_archiving(scratch: Path) -> None:
    from flows.core.pitr.config import write_recovery_config

    data = scratch / "data"
    (data / "pg_replslot" / "standby1").mkdir(parents=True)
    (data / "postgresql.auto.conf").write_text(
        "primary_conninfo = 'host=p password=x'\n"
        "archive_command = 'aws s3 cp %p s3://w/%f'\nwork_mem = '8MB'\n"
    )
    (data / "postgresql.conf").write_text("archive_mode = on\nshared_buffers = 128MB\n")
    (data / "standby.signal").write_text("")
    write_recovery_config(data, {"archive_mode": "off", "restore_command": "/x/restore_wal.sh %f %p"})
    auto = (data / "postgresql.auto.conf").read_text()
    assert "password=x" not in auto
    assert "aws s3" not in auto
    assert "work_mem = '8MB'" in auto
    assert "restore_command = '/x/restore_wal.sh %f %p'" in auto
    assert "archive_mode = off" in auto
    conf = (data / "postgresql.conf").read_text()
    assert "archive_mode = on" not in conf
    assert "shared_buffers = 128MB" in conf
    assert (data / "recovery.signal").exists()
    assert not (data / "standby.signal").exists()
    assert list((data / "pg_replslot").iterdir()) == []


# -- the pitr-restore flow (a real Prefect API) ---------------------------------------------------------


def _flow_blocks(source: Source, unique: str) -> tuple[str, str]:
    from blocks import PostgresDatabase
    from tests.conftest import make_local_block
    from tests.harness.pg import PgCluster as _Pg  # noqa: F401 - the block points at the source cluster

    PostgresDatabase(
        host=source.cluster.host,
        port=source.cluster.port,
        database="app",
        user="app_owner",
        password=APP_PASSWORD,
    ).save(f"pitr-src-{unique}", overwrite=True)
    storage = make_local_block(f"pitr-store-{unique}", source.store.root)
    return f"pitr-src-{unique}", storage


def _message(state) -> str:
    try:
        state.result()
    except Exception as exc:
        return str(exc)
    raise AssertionError(f"expected a failed run, got {state.type}")


@pytest.mark.usefixtures("prefect_api")
def test_pitr_restore_flow_pauses_at_a_time_and_leaves_the_server_running(
    source: Source, scratch: Path, servers: list[PgServer], unique: str
) -> None:
    import psycopg
    from prefect.artifacts import Artifact

    from flows.pitr_restore import pitr_restore

    block, storage = _flow_blocks(source, unique)
    port = free_port()
    report = pitr_restore(
        database=block,
        storage=storage,
        prefix="prod",
        archive=ArchiveLocation(directory=str(source.archive_dir)),
        data_directory=str(scratch / "data"),
        time=source.between_time.isoformat(),
        action="pause",
        port=port,
        start=True,
    )
    from flows.core.pgtools import find_tool

    work = scratch / "data.dbops-pitr"
    pg_ctl = find_tool("pg_ctl", source.manifest.server_version_num).path
    server = PgServer(scratch / "data", pg_ctl, work / "server.log", work / "sock", port, server_user())
    servers.append(server)
    assert report.running
    assert "pg_ctl" in report.stop
    conninfo = f"host=localhost port={port} dbname=app user=app_owner password={APP_PASSWORD}"
    with psycopg.connect(conninfo, autocommit=True) as conn:  # production's own role and password
        assert {r[0] for r in conn.execute("SELECT name FROM events")} == {"before-backup", "a"}
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    subprocess.run(report.stop.split(), check=True, capture_output=True)  # the command the report gives
    assert not server.running()
    artifact = Artifact.get("pitr-app")
    assert artifact is not None
    assert "RTO" in str(getattr(artifact, "data", ""))


@pytest.mark.usefixtures("prefect_api")
def test_pitr_restore_flow_refuses_before_downloading_anything(
    source: Source, scratch: Path, unique: str
) -> None:
    import socket

    from flows.pitr_restore import pitr_restore

    block, storage = _flow_blocks(source, unique)
    archive = ArchiveLocation(directory=str(source.archive_dir))
    data = scratch / "data"

    def run(**kw: object):
        args: dict[str, Any] = {
            "database": block,
            "storage": storage,
            "prefix": "prod",
            "archive": archive,
            "data_directory": str(data),
            "latest": True,
            "port": free_port(),
        }
        args.update(kw)
        state = pitr_restore(**args, return_state=True)
        assert state.is_failed()
        return _message(state)

    if os.geteuid() == 0:
        (scratch / "private").mkdir(mode=0o700)
        assert "cannot reach" in run(data_directory=str(scratch / "private" / "data"))
    (scratch / "busy").mkdir()
    (scratch / "busy" / "PG_VERSION").write_text("15\n")
    assert "is not empty" in run(data_directory=str(scratch / "busy"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        assert "is in use" in run(port=held.getsockname()[1])
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert "in the future" in run(latest=False, time=future)
    assert "no base backup" in run(prefix="elsewhere")
    assert "after the last archived segment" in run(latest=False, time=datetime.now(UTC).isoformat())
    assert not data.exists()


def test_the_spool_keeps_a_bounded_window_and_the_script_never_leaves_a_partial_file(
    source: Source, scratch: Path
) -> None:
    """The fetcher driven as the server drives it (`.want`), the restore script run for real."""
    from flows.core.chain import recoverable_window
    from flows.core.pitr.spool import WalSpool
    from flows.core.wal import parse_lsn, segno_of_lsn

    m = source.manifest
    archive = WalArchive(LocalObjectStore(source.archive_dir))
    first = segno_of_lsn(parse_lsn(m.start_lsn), m.wal_segment_size)
    scan = recoverable_window("app", catalog_of(m), archive).view()
    assert scan is not None
    spool = WalSpool(archive, scan, scratch / "work" / "spool", first, ahead=2)
    spool.prepare()
    wanted = scan.name(first + 3)
    (spool.dir / ".want").write_text(wanted + "\n")
    spool.step()
    held = sorted(p.name for p in spool.dir.iterdir() if len(p.name) == 24)
    assert held == [scan.name(s) for s in range(first + 3, first + 6) if s in scan.segments]  # bounded
    dest = scratch / "RECOVERYXLOG"
    ok = subprocess.run(
        ["sh", str(spool.script), str(spool.dir), wanted, str(dest), "5"], capture_output=True
    )
    assert ok.returncode == 0
    assert dest.read_bytes() == (source.archive_dir / wanted).read_bytes()
    (spool.dir / ".want").write_text(scan.name(first + 5) + "\n")
    spool.step()  # the server moved on: what it consumed is removed (the one before the wanted one stays)
    held = sorted(p.name for p in spool.dir.iterdir() if len(p.name) == 24)
    assert held
    assert min(held) >= scan.name(first + 4)
    beyond = scan.name((scan.last or first) + 1)
    (spool.dir / ".want").write_text(beyond + "\n")
    spool.step()  # the fetcher answers: not in the archive
    assert (spool.dir / f"{beyond}.absent").exists()
    assert spool.missing is None
    missing = subprocess.run(
        ["sh", str(spool.script), str(spool.dir), beyond, str(scratch / "OTHER"), "5"], capture_output=True
    )
    assert missing.returncode == 1
    assert not (scratch / "OTHER").exists()
    assert not list(scratch.glob("*.dbops-partial"))
