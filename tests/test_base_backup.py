"""base_backup end to end: a real cluster archiving with `cp %p DIR/%f` (as the seed does), real
pg_basebackup, the moto S3 server over HTTP, a real Prefect API; a base backup restored by hand with plain
PostgreSQL tools. Faults are injected into real things: pg_basebackup SIGKILLed, archive_command set to
`false`, pg_hba.conf without a replication line, a role without REPLICATION, a missing bucket, the db: slot
held, a real tablespace."""

from __future__ import annotations

import io
import os
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard

from flows.base_backup import BaseBackupOptions, base_backup
from flows.core.base_backup import stream_base_backup
from flows.core.base_backup_errors import BaseBackupFailed
from flows.core.base_facts import facts_from
from flows.core.base_layout import BaseBackupManifest, base_manifest_key, base_prefix, pg_manifest_key
from flows.core.errors import DbopsError, is_transient
from flows.core.leases import take_lease
from flows.core.localstore import LocalObjectStore
from flows.core.objectstore import MiB
from flows.core.pgtools import find_tool
from flows.core.postgres import ConnParams
from flows.core.retention import RetentionPolicy
from flows.core.s3store import S3ObjectStore
from flows.core.tar_stream import TarScanner
from flows.core.wal_archive import ArchiveLocation
from tests.conftest import make_local_block, make_s3_block
from tests.harness.basebackup import archiving_cluster, server_owned
from tests.harness.pg import PgCluster, free_port, wait_until
from tests.harness.s3 import S3Endpoint

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[PgCluster, Path]]:
    """One archiving cluster for the whole module (the seed's `cp %p DIR/%f`), with data in imagemanager."""
    with archiving_cluster() as (pg, archive):
        pg.create_database("imagemanager")
        pg.sql(
            "CREATE TABLE images AS SELECT g AS id, md5(g::text) AS sha FROM generate_series(1, 5000) g",
            "imagemanager",
        )
        yield pg, archive


def block(
    pg: PgCluster,
    name: str,
    user: str | None = None,
    password: str | None = None,
    dbname: str = "imagemanager",
) -> str:
    from blocks import PostgresDatabase

    PostgresDatabase(
        host=pg.host,
        port=pg.port,
        database=dbname,
        user=user or pg.superuser,
        password=password or pg.password,
    ).save(name, overwrite=True)
    return name


def server_dir() -> Path:
    """A directory the postgres OS user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="dbops-restored-"))
    os.chmod(path, 0o755)
    return path


def failure_message(state) -> str:
    assert state.is_failed(), f"expected a failed run, got {state.type}"
    try:
        state.result()
    except Exception as exc:
        return str(exc)
    raise AssertionError("a failed state without an exception")


def fast(**kw: object) -> BaseBackupOptions:
    return BaseBackupOptions(**{"wal_timeout_seconds": 20, **kw})


def extract(store, key: str, into: Path) -> list[str]:
    """Unpack the stored .tar.zst with Python's tarfile, the way a person would with `zstd -dc | tar x`."""
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(store.get_bytes(key))
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = tar.getnames()
        tar.extractall(into, filter="tar")
    return names


@contextmanager
def restored(data: PgCluster, source: PgCluster, restore_command: str | None) -> Iterator[PgCluster]:
    """Start an extracted base backup as its own server (postgres-owned, free port); with a restore_command
    it recovers from the archive (recovery.signal), without one from its own pg_wal (a -X fetch backup)."""
    settings = {
        "port": str(data.port),
        "unix_socket_directories": f"'{data.socket_dir}'",
        "archive_mode": "off",
    }
    if restore_command:  # archive recovery; without it, crash recovery from backup_label and pg_wal
        settings["restore_command"] = f"'{restore_command}'"
        (data.data_dir / "recovery.signal").write_text("")
    with (data.data_dir / "postgresql.auto.conf").open("a") as f:
        for key, value in settings.items():
            f.write(f"{key} = {value}\n")
    data.socket_dir.mkdir(exist_ok=True)
    os.chmod(data.data_dir, 0o700)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres", str(data.base_dir)], check=True)
    try:
        data.start()
        yield data
    finally:
        data.stop("immediate")
        shutil.rmtree(data.base_dir.parent, ignore_errors=True)


# -- the backup itself ---------------------------------------------------------------------------------------


def test_base_backup_lands_with_its_manifest_after_its_wal_is_archived_and_restores_by_hand(
    cluster: tuple[PgCluster, Path], tmp_path: Path, unique: str
) -> None:
    pg, archive = cluster
    pg.sql("CREATE TABLE before_backup AS SELECT 'kept' AS v FROM generate_series(1, 42)", "imagemanager")
    storage = make_local_block(f"base-{unique}", tmp_path / "store")
    report = base_backup(
        database=block(pg, f"base-{unique}"),
        storage=storage,
        prefix="prod",
        archive=ArchiveLocation(directory=str(archive)),
        verify="full",
        options=fast(),
    )
    store = LocalObjectStore(tmp_path / "store")
    stem = report.key.removesuffix(".tar.zst")
    assert report.key.startswith("prod/imagemanager/base/")
    assert report.manifest_key == base_manifest_key(stem)
    manifest = BaseBackupManifest.from_json(store.get_bytes(report.manifest_key))
    assert manifest.wal_archived
    assert not manifest.wal_included
    assert manifest.verified
    assert manifest.verification.method == "full"
    assert "sha256 re-checked" in manifest.verification.detail
    assert manifest.label.startswith("dbops-imagemanager-")
    assert manifest.wal_segment_size == MiB
    assert manifest.sha256 == report.sha256
    stored = store.head(report.key)
    assert stored is not None
    assert stored.size == manifest.bytes
    system = pg.sql("SELECT system_identifier::text FROM pg_control_system()")[0][0]
    assert manifest.system_identifier == system
    assert manifest.server_version_num >= 150000
    # every segment from start to stop is in the archive directory (and was, before the manifest)
    first, last = int(manifest.start_wal[8:], 16), int(manifest.stop_wal[8:], 16)
    assert first <= last
    for segno in range(first, last + 1):
        assert (archive / f"{manifest.start_wal[:8]}{segno:016X}").is_file()
    assert manifest.pg_manifest_key == pg_manifest_key(stem)
    assert b'"WAL-Ranges"' in store.get_bytes(pg_manifest_key(stem))
    # and it really restores: extract, recovery.signal, restore_command from the archive
    pg.sql("INSERT INTO before_backup VALUES ('after')", "imagemanager")  # after the backup: replayed too
    target = PgCluster(base_dir=server_dir() / "restored", port=free_port(), password=pg.password)
    names = extract(store, report.key, target.data_dir)
    assert {"backup_label", "global/pg_control", "backup_manifest"} <= set(names)
    with restored(target, pg, f"cp {archive}/%f %p") as server:
        wait_until(lambda: not server.sql("SELECT pg_is_in_recovery()")[0][0], timeout=60, what="promotion")
        assert server.sql("SELECT count(*) FROM before_backup WHERE v = 'kept'", "imagemanager") == [(42,)]
        assert server.sql("SELECT count(*) FROM images", "imagemanager") == [(5000,)]
        log = server.log_file.read_text(errors="replace")
        assert "consistent recovery state reached" in log


def test_include_wal_to_s3_is_self_contained_and_reaches_consistency_without_the_archive(
    cluster: tuple[PgCluster, Path], s3: S3Endpoint, bucket: str, tmp_path: Path, unique: str
) -> None:
    pg, _archive = cluster
    storage = make_s3_block(s3, f"base-s3-{unique}", bucket)
    report = base_backup(
        database=block(pg, f"base-s3-{unique}"), storage=storage, include_wal=True, options=fast()
    )
    store = S3ObjectStore(s3.client(), bucket)
    manifest = BaseBackupManifest.from_json(store.get_bytes(report.manifest_key))
    assert manifest.wal_included
    assert manifest.verified
    assert "WAL file(s) in pg_wal" in manifest.verification.detail
    assert store.list_incomplete_uploads() == []
    target = PgCluster(base_dir=server_dir() / "restored", port=free_port(), password=pg.password)
    names = extract(store, report.key, target.data_dir)
    assert f"pg_wal/{manifest.stop_wal}" in names
    with restored(target, pg, restore_command=None) as server:  # no archive at all
        wait_until(lambda: not server.sql("SELECT pg_is_in_recovery()")[0][0], timeout=60, what="promotion")
        assert server.sql("SELECT count(*) FROM images", "imagemanager") == [(5000,)]


def test_wal_that_never_reaches_the_archive_fails_naming_the_segment_and_leaves_no_backup(
    cluster: tuple[PgCluster, Path], tmp_path: Path, unique: str
) -> None:
    pg, archive = cluster
    storage = make_local_block(f"base-nowal-{unique}", tmp_path / "store")
    pg.set(archive_command="false")
    try:
        state = base_backup(
            database=block(pg, f"base-nowal-{unique}"),
            storage=storage,
            archive=ArchiveLocation(directory=str(archive)),
            options=fast(wal_timeout_seconds=2),
            return_state=True,
        )
        message = failure_message(state)
        assert "did not reach" in message
        assert "archive_command" in message
        missing = message.split("WAL segment ", 1)[1].split(" ", 1)[0]
        # looked at before archive_command works again: then the archiver catches up within moments
        assert len(missing) == 24
        assert not (archive / missing).exists()
    finally:
        pg.set(archive_command=f"cp %p {archive}/%f")
    store = LocalObjectStore(tmp_path / "store")
    assert [i.key for i in store.list("")] == []  # no tar, no manifest


def test_archive_location_that_never_gets_the_wal_fails_after_the_timeout_and_removes_the_tar(
    cluster: tuple[PgCluster, Path], tmp_path: Path, unique: str
) -> None:
    """The server archives fine, but not where `archive` points: dbops' own confirmation catches it."""
    pg, _archive = cluster
    elsewhere = tmp_path / "empty-archive"
    elsewhere.mkdir()
    storage = make_local_block(f"base-else-{unique}", tmp_path / "store")
    state = base_backup(
        database=block(pg, f"base-else-{unique}"),
        storage=storage,
        archive=ArchiveLocation(directory=str(elsewhere)),
        options=fast(wal_timeout_seconds=1),
        return_state=True,
    )
    message = failure_message(state)
    assert f"did not reach file://{elsewhere}" in message
    assert "no manifest written" in message
    segment = message.split("WAL segment ", 1)[1].split(" ", 1)[0]
    assert len(segment) == 24
    assert [i.key for i in LocalObjectStore(tmp_path / "store").list("")] == []


def _stream_in_small_pieces(
    pg: PgCluster,
    store: S3ObjectStore,
    label: str,
    progress: Callable[[int, int], None],
    on_start: Callable[[subprocess.Popen[bytes]], None],
) -> None:
    """Stream a base backup of the module cluster in 1 MiB segments and 5 MiB parts, so that a fault
    injected from `progress` lands mid-stream, with pg_basebackup still running and the upload open."""
    version = int(pg.sql("SHOW server_version_num")[0][0])
    stream_base_backup(
        ConnParams(pg.host, pg.port, "imagemanager", pg.superuser, pg.password),
        store,
        "prod/imagemanager/base/x.tar.zst",
        tool=find_tool("pg_basebackup", version),
        label=label,
        include_wal=False,
        segment_size=MiB,
        part_size=5 * MiB,
        progress=progress,
        on_start=on_start,
    )


def test_killed_pg_basebackup_aborts_the_multipart_upload_stores_nothing_and_never_saw_the_password(
    cluster: tuple[PgCluster, Path], s3: S3Endpoint, bucket: str
) -> None:
    pg, _archive = cluster
    store = S3ObjectStore(s3.client(), bucket)
    started: list[subprocess.Popen[bytes]] = []
    killed: list[int] = []

    environ: list[bytes] = []

    def progress(raw: int, _stored: int) -> None:
        if raw > 0 and not killed:
            assert started[0].poll() is None, "pg_basebackup finished too soon"
            environ.append(Path(f"/proc/{started[0].pid}/environ").read_bytes())
            started[0].send_signal(signal.SIGKILL)
            killed.append(raw)

    with pytest.raises(DbopsError) as info:
        _stream_in_small_pieces(pg, store, "dbops-test-kill", progress, started.append)
    assert killed
    assert started[0].returncode == -signal.SIGKILL
    # the password reached pg_basebackup through a passfile, never argv or the environment
    assert pg.password not in str(started[0].args)
    assert pg.password.encode() not in environ[0]
    assert b"PGPASSFILE=" in environ[0]
    assert b"PGPASSWORD=" not in environ[0]
    assert "SIGKILL" in str(info.value)
    assert "upload was aborted (nothing stored)" in str(info.value)
    assert is_transient(info.value)
    assert list(store.list("")) == []
    assert store.list_incomplete_uploads() == []


def test_s3_endpoint_dying_mid_stream_is_transient_and_stops_pg_basebackup_and_its_walsender(
    cluster: tuple[PgCluster, Path], unique: str
) -> None:
    from flows.core.errors import StorageUnavailable
    from tests.harness.s3 import s3_endpoint

    pg, _archive = cluster
    started: list[subprocess.Popen[bytes]] = []
    with s3_endpoint() as doomed:
        store = S3ObjectStore(doomed.client(), doomed.create_bucket(f"doomed-{unique}"))
        killed: list[int] = []

        def progress(raw: int, _stored: int) -> None:
            if raw > 0 and not killed:
                doomed.process.kill()
                doomed.process.wait()
                killed.append(raw)

        with pytest.raises(DbopsError) as info:
            _stream_in_small_pieces(pg, store, "dbops-test-s3-dies", progress, started.append)
    assert killed
    assert isinstance(info.value, StorageUnavailable), repr(info.value)
    assert is_transient(info.value), repr(info.value)
    assert started[0].poll() is not None, "pg_basebackup was left running"
    wait_until(
        lambda: pg.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'") == [(0,)],
        what="the server to end the walsender of the abandoned base backup",
    )


# -- preflight: who may take a base backup, of what -----------------------------------------------


def test_role_without_replication_is_refused_with_the_alter_role_fix(
    cluster: tuple[PgCluster, Path], tmp_path: Path, unique: str
) -> None:
    pg, archive = cluster
    role, password = f"norepl_{unique}", secrets.token_hex(8)
    pg.create_role(role, password)
    state = base_backup(
        database=block(pg, f"base-norepl-{unique}", role, password),
        storage=make_local_block(f"base-norepl-{unique}", tmp_path / "store"),
        archive=ArchiveLocation(directory=str(archive)),
        return_state=True,
    )
    message = failure_message(state)
    assert f"role {role} lacks REPLICATION" in message
    assert f"ALTER ROLE {role} REPLICATION" in message
    assert password not in message


def test_pg_hba_without_a_replication_line_names_the_line_to_add(
    cluster: tuple[PgCluster, Path], tmp_path: Path, unique: str
) -> None:
    pg, archive = cluster
    role, password = f"repl_{unique}", secrets.token_hex(8)
    pg.create_role(role, password, "REPLICATION")
    hba = pg.data_dir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("".join(line for line in original.splitlines(True) if "replication" not in line))
    pg.sql("SELECT pg_reload_conf()")
    try:
        state = base_backup(
            database=block(pg, f"base-hba-{unique}", role, password),
            storage=make_local_block(f"base-hba-{unique}", tmp_path / "store"),
            archive=ArchiveLocation(directory=str(archive)),
            return_state=True,
        )
        message = failure_message(state)
    finally:
        hba.write_text(original)
        pg.sql("SELECT pg_reload_conf()")
    assert f"has no replication line for user {role} from 127.0.0.1" in message
    assert f"host replication {role} 127.0.0.1/32 scram-sha-256" in message


def test_extra_tablespace_is_refused_with_a_sentence(
    cluster: tuple[PgCluster, Path], tmp_path: Path, unique: str
) -> None:
    pg, archive = cluster
    location = server_owned(pg.base_dir.parent / f"ts_{unique}")
    pg.sql(f"CREATE TABLESPACE ts_{unique} LOCATION '{location}'")
    try:
        state = base_backup(
            database=block(pg, f"base-ts-{unique}"),
            storage=make_local_block(f"base-ts-{unique}", tmp_path / "store"),
            archive=ArchiveLocation(directory=str(archive)),
            return_state=True,
        )
        message = failure_message(state)
    finally:
        pg.sql(f"DROP TABLESPACE ts_{unique}")
    assert f"extra tablespace(s) (ts_{unique})" in message
    assert "cannot carry" in message
    assert list(LocalObjectStore(tmp_path / "store").list("prod")) == []


def test_archiving_off_without_include_wal_is_refused(pg: PgCluster, tmp_path: Path, unique: str) -> None:
    """The session cluster does not archive: a backup relying on the archive could never be consistent."""
    pg.create_database(f"noarch_{unique}")
    state = base_backup(
        database=block(pg, f"base-noarch-{unique}", dbname=f"noarch_{unique}"),
        storage=make_local_block(f"base-noarch-{unique}", tmp_path / "store"),
        archive=ArchiveLocation(directory=str(tmp_path)),
        return_state=True,
    )
    message = failure_message(state)
    assert "archive_mode is off" in message
    assert "include_wal=true" in message


def test_archive_defaults_to_the_prefect_variable_of_the_wal_check(
    cluster: tuple[PgCluster, Path], tmp_path: Path, unique: str
) -> None:
    """Like the wal-archive-check deployment: no `archive` given, the Variable dbops_wal_archive says it."""
    from prefect.variables import Variable

    pg, _archive = cluster
    nowhere = f"/nonexistent/wal-{unique}"
    previous = Variable.get("dbops_wal_archive", default=None)
    Variable.set("dbops_wal_archive", {"directory": nowhere}, overwrite=True)
    try:
        state = base_backup(
            database=block(pg, f"base-var-{unique}"),
            storage=make_local_block(f"base-var-{unique}", tmp_path / "store"),
            return_state=True,
        )
    finally:
        if previous is None:
            Variable.unset("dbops_wal_archive")
        else:
            Variable.set("dbops_wal_archive", previous, overwrite=True)
    assert f"archive directory {nowhere} does not exist" in failure_message(state)


def test_missing_bucket_fails_before_pg_basebackup_runs(
    cluster: tuple[PgCluster, Path], s3: S3Endpoint, unique: str
) -> None:
    pg, archive = cluster
    storage = make_s3_block(s3, f"base-nobucket-{unique}", f"no-such-bucket-{unique}")
    state = base_backup(
        database=block(pg, f"base-nobucket-{unique}"),
        storage=storage,
        archive=ArchiveLocation(directory=str(archive)),
        return_state=True,
    )
    message = failure_message(state)
    assert f"no-such-bucket-{unique}" in message


def test_second_base_backup_fails_on_the_slot_held_by_another_job(
    cluster: tuple[PgCluster, Path], tmp_path: Path, unique: str
) -> None:
    from prefect.concurrency.sync import concurrency

    from flows.core.identity import limit_name, resolve
    from flows.tasks.common import ensure_concurrency_limit

    pg, archive = cluster
    name = block(pg, f"base-slot-{unique}")
    limit = limit_name(resolve(ConnParams(pg.host, pg.port, "imagemanager", pg.superuser, pg.password)))
    ensure_concurrency_limit(limit)
    with concurrency(limit, occupy=1, strict=True):  # a dump (or the first base backup) holds it
        state = base_backup(
            database=name,
            storage=make_local_block(f"base-slot-{unique}", tmp_path / "store"),
            archive=ArchiveLocation(directory=str(archive)),
            options=fast(lock_wait_hours=1 / 3600),
            return_state=True,
        )
    message = failure_message(state)
    assert f"another dbops job held {limit}" in message
    assert list(LocalObjectStore(tmp_path / "store").list("")) == []


# -- retention -----------------------------------------------------------------------------------------------


def test_retention_expires_old_base_backups_manifest_first_but_keeps_a_leased_one(
    cluster: tuple[PgCluster, Path], tmp_path: Path, unique: str
) -> None:
    pg, archive = cluster
    db = block(pg, f"base-ret-{unique}")
    storage = make_local_block(f"base-ret-{unique}", tmp_path / "store")
    location = ArchiveLocation(directory=str(archive))
    store = LocalObjectStore(tmp_path / "store")
    first = base_backup(database=db, storage=storage, archive=location, options=fast())
    second = base_backup(database=db, storage=storage, archive=location, options=fast())
    stem1, stem2 = (r.key.removesuffix(".tar.zst") for r in (first, second))
    take_lease(store, stem1, "pitr-run", "point-in-time recovery", ttl=timedelta(hours=1))
    policy = RetentionPolicy(keep_last=1)

    def segments() -> list[str]:
        return sorted(p.name for p in archive.iterdir() if len(p.name) == 24 and p.name.isalnum())

    older = [name for name in segments() if name[8:] < first.start_wal[8:]]
    assert older, "the cluster archived WAL before the first base backup"
    dry = base_backup(
        database=db,
        storage=storage,
        archive=location,
        retention=policy,
        wal_keep_days=0,
        dry_run=True,
        options=fast(),
    )
    assert dry.retention.startswith("dry run")
    assert store.head(second.key) is not None
    assert dry.wal_expiry.startswith(f"planned: would remove {len(older)} segment(s)"), dry.wal_expiry
    assert set(older) <= set(segments())  # a dry run removes nothing
    third = base_backup(
        database=db, storage=storage, archive=location, retention=policy, wal_keep_days=0, options=fast()
    )
    keys = {i.key for i in store.list(base_prefix("", "imagemanager"))}
    assert third.key in keys
    assert third.manifest_key in keys
    assert not any(k.startswith(stem2) for k in keys)  # expired: tar, backup_manifest, manifest all gone
    assert first.key in keys
    assert first.manifest_key in keys
    assert stem1 in third.in_use
    assert stem2 in third.deleted
    # WAL expiry: exactly what is older than the oldest kept base backup (the leased first) is gone
    left = segments()
    assert third.wal_expiry.startswith("deleted: removed"), third.wal_expiry
    assert not set(older) & set(left)
    assert all(name[8:] >= first.start_wal[8:] for name in left)
    assert first.start_wal in left
    assert third.stop_wal in left


# -- the tar reader ------------------------------------------------------------------------------------------


def _tar(members: dict[str, bytes], fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(datetime.now(UTC).timestamp())
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


LABEL = (
    b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\n"
    b"BACKUP METHOD: streamed\nLABEL: dbops-x\nSTART TIMELINE: 1\n"
)
PG_MANIFEST = b'{"WAL-Ranges": [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/3000000"}]}'


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("chunk", [1, 511, 4096])
def test_tar_scanner_reads_members_in_any_chunking_and_name_format(fmt: int, chunk: int) -> None:
    long_dir = "base/" + "d" * 120
    stream = _tar(
        {
            "backup_label": LABEL,
            f"{long_dir}/16384": os.urandom(3000),
            "global/pg_control": b"\0" * 8192,
            "pg_wal/000000010000000000000002": b"w" * 1024,
            "backup_manifest": PG_MANIFEST,
        },
        fmt,
    )
    scanner = TarScanner()
    for i in range(0, len(stream), chunk):
        scanner.feed(stream[i : i + chunk])
    facts = facts_from(scanner)
    assert scanner.ended
    assert scanner.has_pg_control
    assert scanner.members == 5
    assert scanner.wal_files == ["000000010000000000000002"]
    # End-LSN exactly on a segment boundary: the stop segment is the one before it
    assert facts.start_wal == facts.stop_wal == "000000010000000000000002"
    assert facts.needed_segments() == ["000000010000000000000002"]


def test_tar_without_backup_manifest_is_not_a_base_backup() -> None:
    scanner = TarScanner()
    scanner.feed(_tar({"backup_label": LABEL, "global/pg_control": b"x"}, tarfile.USTAR_FORMAT))
    with pytest.raises(BaseBackupFailed, match="no backup_manifest"):
        facts_from(scanner)
