"""How the dump pipeline fails: always a named error, never a stored object or an open upload behind it.

Faults are injected into real components: pg_dump is SIGKILLed, its backend terminated, the S3 server
process killed, a privilege revoked, a port left empty. Nothing in boto3, psycopg or subprocess is patched.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from flows.core.compression import Compression
from flows.core.dump import DumpResult, stream_dump, verify_stored_dump
from flows.core.errors import (
    AuthenticationFailed,
    DatabaseMissing,
    DatabaseUnreachable,
    DumpFailed,
    DumpInterrupted,
    PermissionDenied,
    StorageError,
    StorageUnavailable,
    VerificationFailed,
    VersionMismatch,
    is_transient,
)
from flows.core.objectstore import MiB, ObjectStore
from flows.core.pgtools import PgTool, check_tool_version, find_tool
from flows.core.postgres import ConnParams, ExportedSnapshot, connect, server_version_num
from flows.core.s3store import S3ObjectStore
from tests.harness.factories import conn_params
from tests.harness.pg import PgCluster, free_port
from tests.harness.s3 import S3Endpoint, s3_endpoint

KEY = "prod/app/dumps/app.dump"


def dump(
    params: ConnParams,
    store: ObjectStore,
    pg_dump: PgTool,
    compression: Compression = Compression.none,
    level: int = 0,
    **kw: Any,
) -> DumpResult:
    """stream_dump of `params` into KEY of `store`, uncompressed unless asked."""
    return stream_dump(params, store, KEY, tool=pg_dump, compression=compression, level=level, **kw)


@pytest.fixture(scope="module")
def version(pg: PgCluster) -> int:
    with pg.connect() as conn:
        return server_version_num(conn)


@pytest.fixture(scope="module")
def pg_dump(version: int) -> PgTool:
    return find_tool("pg_dump", version)


@pytest.fixture(scope="module")
def big_db(pg: PgCluster) -> Iterator[str]:
    """~75 MB of rows: pg_dump blocks on its 1 MiB pipe, so it still runs when the first bytes arrive."""
    name = f"failures_big_{secrets.token_hex(4)}"
    pg.create_database(name)
    pg.sql(
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || repeat('x', 200) AS payload "
        "FROM generate_series(1, 250000) g",
        name,
    )
    yield name
    pg.sql(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def small_db(pg: PgCluster) -> Iterator[str]:
    name = f"failures_small_{secrets.token_hex(4)}"
    pg.create_database(name)
    pg.sql("CREATE TABLE public.t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 1000) g", name)
    pg.sql("CREATE TABLE public.audit AS SELECT g AS id FROM generate_series(1, 10) g", name)
    yield name
    pg.sql(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def store(s3: S3Endpoint, bucket: str) -> S3ObjectStore:
    return S3ObjectStore(s3.client(), bucket)


def assert_nothing_stored(store: S3ObjectStore) -> None:
    assert store.head(KEY) is None
    assert list(store.list("")) == []
    assert store.list_incomplete_uploads() == []


class Started:
    """The on_start callback: keeps the real pg_dump Popen so a test can signal it and check it is gone."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def __call__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc


# -- pg_dump dies or loses its connection ------------------------------------------------------------------


@pytest.mark.parametrize("compression", [Compression.none, Compression.zstd])
def test_killed_pg_dump_leaves_no_object_and_no_open_multipart_upload(
    pg: PgCluster, big_db: str, pg_dump: PgTool, store: S3ObjectStore, compression: Compression
):
    started = Started()
    killed: list[int] = []

    def progress(raw: int, _stored: int) -> None:
        if raw > 0 and not killed:
            assert started.proc is not None, "pg_dump finished too soon"
            assert started.proc.poll() is None, "pg_dump finished too soon"
            started.proc.send_signal(signal.SIGKILL)
            killed.append(raw)

    with pytest.raises(DumpInterrupted) as info:
        dump(
            conn_params(pg, big_db),
            store,
            pg_dump,
            compression=compression,
            level=1,
            part_size=5 * MiB,
            progress=progress,
            on_start=started,
        )

    assert killed, "the progress callback never saw pg_dump's bytes"
    assert "SIGKILL" in str(info.value)
    assert is_transient(info.value)
    assert started.proc is not None
    assert started.proc.returncode == -signal.SIGKILL
    assert_nothing_stored(store)


def test_dropped_database_connection_is_transient_and_leaves_no_object(
    pg: PgCluster, big_db: str, pg_dump: PgTool, store: S3ObjectStore, unique: str
):
    app = f"dbops-test-drop-{unique}"
    started = Started()
    terminated: list[bool] = []

    with pg.connect() as admin:

        def progress(raw: int, _stored: int) -> None:
            if raw > 0 and not terminated:
                rows = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                    [app],
                ).fetchall()
                terminated.extend(r[0] for r in rows)

        with pytest.raises(DumpInterrupted) as info:
            dump(
                conn_params(pg, big_db, application_name=app),
                store,
                pg_dump,
                part_size=5 * MiB,
                progress=progress,
                on_start=started,
            )

    assert terminated == [True], "pg_dump's backend was not found by its application_name"
    assert is_transient(info.value)
    assert "terminating connection" in str(info.value)
    assert "retried" in str(info.value)
    assert started.proc is not None
    assert started.proc.returncode not in (None, 0)
    assert_nothing_stored(store)


@pytest.fixture
def limited_role(pg: PgCluster, small_db: str, unique: str) -> Iterator[tuple[str, str]]:
    """A login role that may read public.t but not public.audit in small_db."""
    role, password = f"dumper_{unique}", "pw-" + secrets.token_hex(8)
    pg.create_role(role, password)
    ident = sql.Identifier(role)
    with pg.connect(small_db) as conn:
        conn.execute(sql.SQL("GRANT SELECT ON public.t TO {}").format(ident))
        conn.execute(sql.SQL("REVOKE ALL ON public.audit FROM PUBLIC, {}").format(ident))
    yield role, password
    with pg.connect(small_db) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
    with pg.connect() as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(ident))


def test_missing_select_privilege_is_permission_denied_with_the_grant_fix(
    pg: PgCluster, small_db: str, pg_dump: PgTool, store: S3ObjectStore, limited_role: tuple[str, str]
):
    role, password = limited_role
    started = Started()

    with pytest.raises(PermissionDenied) as info:
        dump(
            conn_params(pg, small_db, user=role, password=password),
            store,
            pg_dump,
            compression=Compression.zstd,
            level=3,
            on_start=started,
        )

    message = str(info.value)
    assert not is_transient(info.value)
    assert "grant" in message.lower()
    assert "SELECT" in message
    assert "permission denied for table audit" in message, message  # the failure, not pg_dump's query
    assert password not in message
    assert started.proc is not None
    assert started.proc.returncode == 1
    assert_nothing_stored(store)


# -- the object store dies -----------------------------------------------------------------------------------


def test_s3_endpoint_dying_mid_upload_is_a_named_error_and_stops_pg_dump(
    pg: PgCluster, big_db: str, pg_dump: PgTool, unique: str
):
    started = Started()
    with s3_endpoint() as doomed:
        bucket = doomed.create_bucket(f"doomed-{unique}")
        store = S3ObjectStore(doomed.client(), bucket)
        killed: list[int] = []

        def progress(_raw: int, stored: int) -> None:
            if stored > 6 * MiB and not killed:  # the first part is on its way or done
                doomed.process.kill()
                doomed.process.wait()
                killed.append(stored)

        with pytest.raises((StorageUnavailable, StorageError)) as info:
            dump(
                conn_params(pg, big_db),
                store,
                pg_dump,
                part_size=5 * MiB,
                progress=progress,
                on_start=started,
            )

    assert killed
    assert isinstance(info.value, StorageUnavailable), repr(info.value)
    assert is_transient(info.value), repr(info.value)
    # the server is gone, not answering 5xx: the sentence says the endpoint cannot be reached, and when
    assert "cannot reach the S3 endpoint during" in str(info.value), str(info.value)
    assert started.proc is not None, "pg_dump was left running"
    assert started.proc.poll() is not None, "pg_dump was left running"


# -- credentials -------------------------------------------------------------------------------------------


def test_password_never_in_pg_dump_argv_or_environment_and_passfile_is_private_and_removed(
    pg: PgCluster, small_db: str, pg_dump: PgTool, store: S3ObjectStore
):
    seen: dict[str, Any] = {}

    def on_start(proc: subprocess.Popen[bytes]) -> None:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        env = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
        passfile = Path(env[b"PGPASSFILE"].decode())
        seen.update(
            argv=cmdline.split(b"\0")[0],
            password_in_argv=pg.password.encode() in cmdline,
            password_in_environ=pg.password.encode() in environ,
            pgpassword_set=b"PGPASSWORD" in env,
            passfile=passfile,
            passfile_mode=stat.S_IMODE(passfile.stat().st_mode),
            passfile_dir_mode=stat.S_IMODE(passfile.parent.stat().st_mode),
            passfile_has_password=pg.password in passfile.read_text(),
        )

    result = dump(
        conn_params(pg, small_db),
        store,
        pg_dump,
        compression=Compression.zstd,
        level=3,
        on_start=on_start,
    )

    assert seen["argv"] == str(pg_dump.path).encode()  # we looked at the real pg_dump
    assert seen["password_in_argv"] is False
    assert seen["password_in_environ"] is False
    assert seen["pgpassword_set"] is False
    assert seen["passfile_has_password"] is True  # so this is how it authenticated
    assert seen["passfile_mode"] == 0o600
    assert seen["passfile_dir_mode"] == 0o700
    assert not seen["passfile"].exists()
    assert not seen["passfile"].parent.exists()
    assert pg.password not in " ".join(result.argv) + result.stderr
    assert store.head(KEY) is not None


def test_pg_dump_gets_an_allowlisted_environment_without_the_workers_cloud_and_prefect_secrets(
    pg: PgCluster, small_db: str, pg_dump: PgTool, store: S3ObjectStore, monkeypatch: pytest.MonkeyPatch
):
    # The worker's real environment, as a Prefect worker with S3 credentials and an API key has it.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-d3adb33f")
    monkeypatch.setenv("PREFECT_API_KEY", "pnu_prefect-key-c0ffee")
    monkeypatch.setenv("DBOPS_SOMETHING_TOKEN", "dbops-token-f00d")
    monkeypatch.setenv("PGSSLROOTCERT", "/etc/dbops/root.crt")
    monkeypatch.setenv("PGPASSWORD", "worker-pgpassword")
    monkeypatch.setenv("PGHOST", "somewhere-else.invalid")
    seen: dict[str, str] = {}

    def on_start(proc: subprocess.Popen[bytes]) -> None:
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        seen.update(
            {k.decode(): v.decode() for k, v in (i.split(b"=", 1) for i in environ.split(b"\0") if b"=" in i)}
        )

    dump(
        conn_params(pg, small_db),
        store,
        pg_dump,
        on_start=on_start,
    )
    assert "AWS_SECRET_ACCESS_KEY" not in seen
    assert "PREFECT_API_KEY" not in seen
    assert "DBOPS_SOMETHING_TOKEN" not in seen
    assert "PGPASSWORD" not in seen
    assert seen["PGSSLROOTCERT"] == "/etc/dbops/root.crt"  # verify-full keeps working for pg_dump
    assert seen["PGHOST"] == pg.host
    assert seen["PATH"] == os.environ["PATH"]


# -- not a plausible dump ------------------------------------------------------------------------------


def test_implausibly_small_dump_is_refused_and_its_object_removed(
    pg: PgCluster, small_db: str, pg_dump: PgTool, store: S3ObjectStore
):
    with pytest.raises(DumpFailed) as info:
        dump(
            conn_params(pg, small_db),
            store,
            pg_dump,
            min_bytes=10**9,
        )
    assert "not a plausible dump" in str(info.value)
    assert "removed" in str(info.value)
    assert not is_transient(info.value)
    assert_nothing_stored(store)


def test_verification_rejects_a_truncated_or_altered_object(
    pg: PgCluster, small_db: str, pg_dump: PgTool, version: int, store: S3ObjectStore
):
    pg_restore = find_tool("pg_restore", version)
    result = dump(conn_params(pg, small_db), store, pg_dump, compression=Compression.zstd, level=3)
    good = store.get_bytes(KEY)
    assert verify_stored_dump(
        store, KEY, Compression.zstd, pg_restore, full=True, expected_sha256=result.sha256
    )

    store.put_bytes("truncated.dump", good[: len(good) // 3])
    with pytest.raises(VerificationFailed, match=r"truncated\.dump"):
        verify_stored_dump(store, "truncated.dump", Compression.zstd, pg_restore, full=True)

    with pytest.raises(VerificationFailed, match="sha256"):
        verify_stored_dump(store, KEY, Compression.zstd, pg_restore, full=True, expected_sha256="0" * 64)


def test_verification_names_a_table_whose_data_is_missing_from_the_dump(
    pg: PgCluster, small_db: str, pg_dump: PgTool, version: int, store: S3ObjectStore
):
    pg_restore = find_tool("pg_restore", version)
    dump(
        conn_params(pg, small_db),
        store,
        pg_dump,
        compression=Compression.gzip,
        level=6,
        extra_args=["--exclude-table-data=public.audit"],
    )
    with pytest.raises(VerificationFailed, match=r"public\.audit") as info:
        verify_stored_dump(
            store, KEY, Compression.gzip, pg_restore, expected_tables=["public.t", "public.audit"]
        )
    assert "no data for 1 table" in str(info.value)


def test_archive_of_a_database_without_tables_is_a_backup_only_when_the_catalog_says_so(
    pg: PgCluster, pg_dump: PgTool, version: int, store: S3ObjectStore, unique: str
):
    """A brand-new database (before its first migration): pg_dump writes an archive with no entries."""
    name = f"empty_{unique}"
    pg.create_database(name)
    with ExportedSnapshot(conn_params(pg, name)) as snapshot:
        assert snapshot.facts.tables == []
        dump(
            conn_params(pg, name),
            store,
            pg_dump,
            compression=Compression.zstd,
            level=3,
            extra_args=[f"--snapshot={snapshot.facts.snapshot}"],
        )
    pg_restore = find_tool("pg_restore", version)
    checked = verify_stored_dump(store, KEY, Compression.zstd, pg_restore, empty_database=True)
    assert checked.entries == 0
    assert checked.empty_database
    assert "no tables" in checked.detail()
    with pytest.raises(VerificationFailed, match="the backup is empty"):
        verify_stored_dump(store, KEY, Compression.zstd, pg_restore)


# -- versions ----------------------------------------------------------------------------------------------


def test_older_pg_dump_than_server_is_version_mismatch_naming_both_versions():
    with pytest.raises(VersionMismatch) as info:
        check_tool_version(PgTool(Path("/x/pg_dump"), "12.3"), 150004)
    message = str(info.value)
    assert "12.3" in message
    assert re.search(r"PostgreSQL 15\b", message)
    assert "/x/pg_dump" in message
    assert not is_transient(info.value)
    check_tool_version(PgTool(Path("/x/pg_dump"), "16.1"), 150004)  # newer than the server is fine
    check_tool_version(PgTool(Path("/x/pg_dump"), "15.0"), 150004)


@pytest.mark.parametrize("name", ["pg_dump", "pg_restore", "pg_dumpall"])
def test_find_tool_picks_the_client_of_the_server_major_version(version: int, name: str):
    tool = find_tool(name, version)
    assert tool.path.name == name
    assert os.access(tool.path, os.X_OK)
    assert tool.major == version // 10000
    out = subprocess.run([str(tool.path), "--version"], capture_output=True, text=True, check=True).stdout
    assert tool.version in out


def test_find_tool_in_a_directory_without_it_is_version_mismatch(tmp_path: Path, version: int):
    with pytest.raises(VersionMismatch, match=f"install the PostgreSQL {version // 10000} client tools"):
        find_tool("pg_dump", version, bindir=str(tmp_path))


# -- connecting ----------------------------------------------------------------------------------------------


def test_wrong_password_is_authentication_failed_without_the_password(pg: PgCluster):
    wrong = "wrong-" + secrets.token_hex(8)
    with pytest.raises(AuthenticationFailed) as info:
        connect(conn_params(pg, "postgres", password=wrong))
    message = str(info.value)
    assert wrong not in message
    assert pg.password not in message
    assert "fix the password" in message
    assert not is_transient(info.value)


def test_missing_database_is_database_missing(pg: PgCluster, unique: str):
    with pytest.raises(DatabaseMissing) as info:
        connect(conn_params(pg, f"no_such_db_{unique}"))
    assert f"no_such_db_{unique}" in str(info.value)
    assert not is_transient(info.value)


def test_nothing_listening_is_database_unreachable_and_transient(pg: PgCluster):
    port = free_port()
    with pytest.raises(DatabaseUnreachable) as info:
        connect(conn_params(pg, "postgres", port=port, connect_timeout=3))
    assert f"{pg.host}:{port}" in str(info.value)
    assert is_transient(info.value)
    assert pg.password not in str(info.value)
