"""The restore flow end to end: real PostgreSQL, the moto S3 server over HTTP, a real Prefect API."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from flows.core.compression import Compression
from flows.core.manifest import Manifest
from flows.nightly_dump import nightly_dump
from flows.restore import RestoreOptions, restore
from tests.conftest import make_database_block
from tests.harness.factories import content, databases, flip_one_byte_of_row_data, rewrite
from tests.harness.pg import PgCluster, free_port
from tests.harness.runs import artifact_table, failure_message
from tests.harness.s3 import S3Endpoint

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_create_mode_restores_every_row_into_a_new_database_and_reports_the_rto(
    pg: PgCluster, source: tuple[str, str], storage: str, unique: str
) -> None:

    block, name = source
    dumped = nightly_dump(database=block, storage=storage, prefix="prod", globals=True)
    target = make_database_block(pg, f"new-{unique}", f"restored_{unique}")
    report = restore(
        storage=storage,
        source_database=name,
        target=target,
        prefix="prod",
        mode="create",
        globals=True,
        confirm=f"restored_{unique}",
    )
    assert report.key == dumped.key
    assert report.sha256 == dumped.sha256
    assert report.method == "stream"
    assert content(pg, f"restored_{unique}") == content(pg, name)
    assert report.globals.startswith("roles file: created 0 role(s); ")
    assert "already present" in report.globals
    assert databases(pg, "%_restoring_%") == []
    table = artifact_table(f"restore-restored-{unique}")
    values = {row["item"]: row["value"] for row in table}
    assert values["duration (RTO)"].endswith(" s")
    assert values["backup"] == dumped.key
    assert pg.password not in json.dumps(table)

    # create never overwrites: the database now exists, a second create is refused and changes nothing
    pg.sql("INSERT INTO images (name) VALUES ('added after the restore')", f"restored_{unique}")
    after = content(pg, f"restored_{unique}")
    state = restore(storage=storage, source_database=name, target=target, prefix="prod", return_state=True)
    assert "already exists" in failure_message(state)
    assert "mode=replace" in failure_message(state)
    assert content(pg, f"restored_{unique}") == after
    # replace overwrites what is there now (a person's work in the restored copy): only with confirm
    state = restore(
        storage=storage, source_database=name, target=target, prefix="prod", mode="replace", return_state=True
    )
    message = failure_message(state)
    assert "mode=replace overwrites everything now in database" in message
    assert f"confirm='restored_{unique}'" in message
    assert "nothing was touched" in message
    assert content(pg, f"restored_{unique}") == after
    restore(
        storage=storage,
        source_database=name,
        target=target,
        prefix="prod",
        mode="replace",
        confirm=f"restored_{unique}",
    )
    assert content(pg, f"restored_{unique}") == content(pg, name)


def test_jobs_2_downloads_the_archive_first_then_restores_in_parallel(
    pg: PgCluster, source: tuple[str, str], storage: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    block, name = source
    nightly_dump(database=block, storage=storage)
    target = make_database_block(pg, f"par-{unique}", f"parallel_{unique}")
    state = restore(
        storage=storage,
        source_database=name,
        target=target,
        jobs=2,
        options=RestoreOptions(no_owner=True),
        return_state=True,
    )
    report = state.result()
    assert report.method == "file"
    assert report.jobs == 2
    assert content(pg, f"parallel_{unique}") == content(pg, name)
    assert "jobs=2 needs a seekable archive: downloading" in caplog.text  # the run's log says so
    # replace is one transaction; pg_restore cannot combine that with --jobs, so it is refused
    state = restore(
        storage=storage,
        source_database=name,
        target=block,
        mode="replace",
        jobs=2,
        confirm=name,
        return_state=True,
    )
    assert "--single-transaction with --jobs" in failure_message(state)


def test_replace_mode_puts_back_the_backed_up_rows_into_a_protected_database_only_with_confirm(
    pg: PgCluster, source: tuple[str, str], storage: str, unique: str
) -> None:
    _, name = source
    protected = make_database_block(pg, f"prot-{unique}", name, protected=True)
    nightly_dump(database=protected, storage=storage)
    backed_up = content(pg, name)
    pg.sql("DELETE FROM images WHERE id % 2 = 0", name)
    pg.sql("UPDATE alembic_version SET version_num = 'something_else'", name)
    changed = content(pg, name)
    assert changed != backed_up
    state = restore(
        storage=storage, source_database=name, target=protected, mode="replace", return_state=True
    )
    assert "is protected" in failure_message(state)
    assert content(pg, name) == changed
    report = restore(storage=storage, source_database=name, target=protected, mode="replace", confirm=name)
    assert report.mode == "replace"
    assert content(pg, name) == backed_up


@pytest.mark.parametrize("mode", ["replace", "create"])
def test_object_with_one_flipped_byte_is_refused_and_the_target_is_untouched(
    pg: PgCluster, source: tuple[str, str], storage: str, s3: S3Endpoint, bucket: str, unique: str, mode: str
) -> None:
    block, name = source
    # Uncompressed, so the changed byte reaches pg_restore as row data instead of failing zstd.
    dumped = nightly_dump(database=block, storage=storage, compression=Compression.none)
    rewrite(s3, bucket, f"dbops/{dumped.key}", flip_one_byte_of_row_data)
    pg.sql("INSERT INTO images (name) VALUES ('written after the backup')", name)
    before = content(pg, name)
    target = block if mode == "replace" else make_database_block(pg, f"new-{unique}", f"restored_{unique}")
    confirm = name if mode == "replace" else ""
    state = restore(
        storage=storage, source_database=name, target=target, mode=mode, confirm=confirm, return_state=True
    )
    message = failure_message(state)
    assert "does not match its manifest" in message
    assert "before it committed anything" in message
    assert content(pg, name) == before  # replace: rolled back; create: never touched
    assert databases(pg, f"restored_{unique}%") == []  # create: no target, no temporary database


def test_protected_target_without_confirm_is_refused_before_any_connection(
    source: tuple[str, str], storage: str, unique: str
) -> None:
    from blocks import PostgresDatabase

    _, name = source
    # Nothing listens on this port: any connection attempt would fail with "cannot reach" instead.
    PostgresDatabase(
        host="127.0.0.1", port=free_port(), database="imagemanager", user="u", password="p", protected=True
    ).save(f"prod-{unique}", overwrite=True)
    state = restore(
        storage=storage,
        source_database=name,
        target=f"prod-{unique}",
        mode="replace",
        confirm="IMAGEMANAGER",
        return_state=True,
    )
    message = failure_message(state)
    assert "is protected" in message
    assert "confirm='imagemanager'" in message
    assert "cannot reach" not in message


def test_latest_before_picks_the_newest_backup_started_before_that_time(
    pg: PgCluster, source: tuple[str, str], storage: str, s3: S3Endpoint, bucket: str, unique: str
) -> None:
    block, name = source
    old = nightly_dump(database=block, storage=storage)
    old_content = content(pg, name)
    now = datetime.now(UTC)

    def two_days_earlier(body: bytes) -> bytes:
        m = Manifest.from_json(body)
        return m.model_copy(
            update={"started_at": now - timedelta(days=2), "ended_at": now - timedelta(days=2, minutes=-5)}
        ).to_json()

    rewrite(s3, bucket, f"dbops/{old.manifest_key}", two_days_earlier)
    pg.sql("DELETE FROM images WHERE id > 15000", name)
    nightly_dump(database=block, storage=storage)
    new_content = content(pg, name)
    cutoff = (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = make_database_block(pg, f"b-{unique}", f"before_{unique}")
    report = restore(storage=storage, source_database=name, target=before, backup=f"latest before {cutoff}")
    assert report.key == old.key
    assert content(pg, f"before_{unique}") == old_content
    assert new_content != old_content


# -- globals=true: roles are server-wide -------------------------------------------------------------------


def role(pg: PgCluster, name: str) -> tuple | None:
    rows = pg.sql(
        "SELECT rolcanlogin, rolcreatedb, rolconnlimit, "
        "ARRAY(SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid "
        "      WHERE m.member = r.oid ORDER BY 1)::text "
        "FROM pg_roles r WHERE rolname = %s",
        params=(name,),
    )
    return rows[0] if rows else None


def can_log_in(pg: PgCluster, user: str, password: str) -> bool:
    import psycopg

    try:
        psycopg.connect(pg.conninfo(user=user, password=password)).close()
    except psycopg.OperationalError:
        return False
    return True


def test_globals_create_missing_roles_and_leave_existing_ones_exactly_as_they_are(
    pg: PgCluster, source: tuple[str, str], storage: str, unique: str
) -> None:
    block, name = source
    keep, gone = f"keep_{unique}", f"gone_{unique}"
    pg.create_role(keep, "old-password")  # LOGIN, NOCREATEDB
    pg.create_role(gone, "gone-password", "CONNECTION LIMIT 3")
    pg.sql(f'GRANT "{keep}" TO "{gone}"')
    pg.sql(f"COMMENT ON ROLE \"{gone}\" IS 'was here; before'")
    nightly_dump(database=block, storage=storage, globals=True)

    # After the backup: the existing role gets a new password and CREATEDB; the other role is dropped.
    pg.sql(f"ALTER ROLE \"{keep}\" PASSWORD 'new-password' CREATEDB")
    pg.sql(f'DROP ROLE "{gone}"')
    kept_before = role(pg, keep)

    target = make_database_block(pg, f"g-{unique}", f"withroles_{unique}")
    report = restore(
        storage=storage, source_database=name, target=target, globals=True, confirm=f"withroles_{unique}"
    )
    assert f"created 1 role(s) ({gone})" in report.globals, report.globals
    assert "already present, left unchanged" in report.globals
    assert keep in report.globals
    # the missing role is back, with its attributes, membership and comment
    assert role(pg, gone) == (True, False, 3, f"{{{keep}}}")
    assert pg.sql(f"SELECT shobj_description('\"{gone}\"'::regrole, 'pg_authid')")[0][0] == "was here; before"
    # the existing role was not ALTERed: still CREATEDB, still the new password
    assert role(pg, keep) == kept_before
    assert kept_before is not None
    assert kept_before[1] is True
    assert can_log_in(pg, keep, "new-password")
    assert not can_log_in(pg, keep, "old-password")
    assert content(pg, f"withroles_{unique}") == content(pg, name)


def test_globals_without_confirm_is_refused_before_any_connection_even_when_unprotected(
    source: tuple[str, str], storage: str, unique: str
) -> None:
    from blocks import PostgresDatabase

    _, name = source
    PostgresDatabase(
        host="127.0.0.1", port=free_port(), database="scratch", user="u", password="p", protected=False
    ).save(f"scratch-{unique}", overwrite=True)
    state = restore(
        storage=storage, source_database=name, target=f"scratch-{unique}", globals=True, return_state=True
    )
    message = failure_message(state)
    assert "globals=true creates roles" in message
    assert "confirm='scratch'" in message
    assert "cannot reach" not in message


@pytest.mark.parametrize(
    ("statement", "named"),
    [
        ("GRANT pg_monitor TO no_such_role_{u} GRANTED BY postgres;", "role 'no_such_role_{u}'"),
        ("CREATE TABLESPACE ts_{u} LOCATION '/nonexistent/dbops-{u}';", "tablespace 'ts_{u}'"),
    ],
    ids=["grant-to-a-role-that-does-not-exist", "tablespace-whose-directory-is-missing"],
)
def test_failing_statement_in_the_roles_file_fails_the_run_naming_its_object(
    pg: PgCluster,
    source: tuple[str, str],
    storage: str,
    s3: S3Endpoint,
    bucket: str,
    unique: str,
    statement: str,
    named: str,
) -> None:
    block, name = source
    dumped = nightly_dump(database=block, storage=storage, globals=True)
    manifest = Manifest.from_json(
        s3.client().get_object(Bucket=bucket, Key=f"dbops/{dumped.manifest_key}")["Body"].read()
    )
    extra = statement.format(u=unique).encode()
    rewrite(s3, bucket, f"dbops/{manifest.globals_key}", lambda body: body + b"\n" + extra + b"\n")
    target = make_database_block(pg, f"f-{unique}", f"failing_{unique}")
    state = restore(
        storage=storage,
        source_database=name,
        target=target,
        globals=True,
        confirm=f"failing_{unique}",
        return_state=True,
    )
    message = failure_message(state)
    assert "applying the roles file" in message, message
    assert named.format(u=unique) in message, message
    assert databases(pg, f"failing_{unique}%") == []  # the database was not restored after it
