"""Which database a block really reaches: the server's system identifier plus the database, never the
spelling of the host. Two blocks for one database (`127.0.0.1` and `localhost`) are one database to the
staging refresh, the protected-database rule and the db:<...> concurrency limit; every DROP re-checks the
identity on the connection that drops. Real PostgreSQL, a real Prefect API.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from prefect import flow
from prefect.concurrency.sync import concurrency
from prefect.logging import disable_run_logger

from flows.core.errors import IdentityUnknown, ProtectedTarget, TargetIdentityMismatch
from flows.core.identity import DatabaseIdentity, Guard, Protected, identify, limit_name
from flows.core.postgres import ConnParams, connect
from flows.migrate import migrate
from flows.nightly_dump import DumpOptions, nightly_dump
from flows.restore import restore
from flows.tasks.common import database_lock, ensure_concurrency_limit
from flows.tasks.identity import identify_target
from flows.tasks.migrate import refresh_staging
from flows.tasks.restore import drop_scratch_database
from tests.conftest import make_database_block, make_local_block
from tests.harness.factories import conn_params, sample_database
from tests.harness.migrate_env import FAST, MIGRATE_APP, revision
from tests.harness.pg import PgCluster
from tests.harness.runs import failure_message

pytestmark = pytest.mark.usefixtures("prefect_api")


def alias_block(pg: PgCluster, name: str, dbname: str, **fields: object) -> str:
    """A second block for a database of the session cluster, through `localhost` instead of 127.0.0.1."""
    from blocks import PostgresDatabase

    PostgresDatabase(
        host="localhost", port=pg.port, database=dbname, user=pg.superuser, password=pg.password, **fields
    ).save(name, overwrite=True)
    return name


def oid_of(pg: PgCluster, dbname: str) -> int | None:
    rows = pg.sql("SELECT oid FROM pg_database WHERE datname = %s", params=(dbname,))
    return int(rows[0][0]) if rows else None


def has_table(pg: PgCluster, dbname: str, table: str) -> bool:
    return bool(pg.sql("SELECT to_regclass(%s) IS NOT NULL", dbname, (table,))[0][0])


def identity_of(pg: PgCluster, dbname: str) -> DatabaseIdentity:
    with connect(conn_params(pg, dbname)) as conn:
        return identify(conn)


@pytest.fixture
def prod(pg: PgCluster, unique: str) -> str:
    """A production database the migrate app has never touched (every revision pending), with rows."""
    name = f"prod_{unique}"
    pg.create_database(name)
    pg.sql("CREATE TABLE accounts (id int)", name)
    pg.sql("INSERT INTO accounts SELECT generate_series(1, 2000)", name)
    return name


def run_migrate(prod_block: str, staging_block: str, tmp_path: Path, unique: str):
    return migrate(
        database=prod_block,
        staging_database=staging_block,
        storage=make_local_block(f"bk-{unique}", tmp_path / "backups"),
        alembic=str(MIGRATE_APP),
        retry_budget=0,
        options=FAST,
        return_state=True,
    )


# -- the staging refresh ---------------------------------------------------------------------------------


def test_staging_block_reaching_production_through_localhost_is_refused_and_production_is_intact(
    pg: PgCluster, prod: str, unique: str, tmp_path: Path
) -> None:
    prod_block = make_database_block(pg, f"prod-{unique}", prod)  # 127.0.0.1
    staging_block = alias_block(pg, f"stg-{unique}", prod)  # localhost: the same database
    before = (oid_of(pg, prod), pg.sql("SELECT count(*) FROM accounts", prod)[0][0])

    message = failure_message(run_migrate(prod_block, staging_block, tmp_path, unique))

    sysid = identity_of(pg, prod).system_identifier
    assert f"blocks {prod_block!r} and {staging_block!r} reach the same database {prod!r}" in message
    assert f"on server {sysid}" in message
    assert (oid_of(pg, prod), pg.sql("SELECT count(*) FROM accounts", prod)[0][0]) == before  # never dropped
    assert revision(pg, prod) is None
    assert not (tmp_path / "backups").exists() or not list((tmp_path / "backups").rglob("*.manifest.json"))


def test_refresh_into_a_database_a_protected_block_names_is_refused_before_the_backup(
    pg: PgCluster, prod: str, unique: str, tmp_path: Path
) -> None:
    other = f"other_{unique}"
    pg.create_database(other)
    pg.sql("CREATE TABLE keep_me (id int)", other)
    make_database_block(pg, f"guarded-{unique}", other, protected=True)
    staging_block = alias_block(pg, f"stg-{unique}", other)  # unprotected, through localhost
    prod_block = make_database_block(pg, f"prod-{unique}", prod)

    message = failure_message(run_migrate(prod_block, staging_block, tmp_path, unique))

    assert "refused to refresh staging" in message
    assert f"protected block 'guarded-{unique}'" in message
    assert has_table(pg, other, "keep_me")
    assert revision(pg, prod) is None
    assert not (tmp_path / "backups").exists() or not list((tmp_path / "backups").rglob("*.manifest.json"))


# -- the re-check on the connection that drops -------------------------------------------------------------


@pytest.fixture
def backup(pg: PgCluster, unique: str, tmp_path: Path) -> tuple[str, str, str]:
    """(storage, source database, key) of a small verified backup."""
    source = sample_database(pg, f"src_{unique}", rows=500)
    storage = make_local_block(f"st-{unique}", tmp_path / "store")
    report = nightly_dump(database=make_database_block(pg, f"src-{unique}", source), storage=storage)
    return storage, source, report.key


@pytest.mark.parametrize("change", ["recreated", "another-server"])
def test_staging_that_is_not_what_the_plan_identified_is_not_dropped(
    pg: PgCluster, unique: str, backup: tuple[str, str, str], change: str
) -> None:
    storage, source, key = backup
    staging = f"stg_{unique}"
    pg.create_database(staging)
    block = make_database_block(pg, f"stg-{unique}", staging)
    planned = identity_of(pg, staging)
    if change == "recreated":  # between plan and act someone dropped and recreated it: another database
        pg.sql(f'DROP DATABASE "{staging}"')
        pg.create_database(staging)
    else:  # the plan was made on another cluster than the one the block now reaches
        planned = DatabaseIdentity(planned.system_identifier ^ 1, staging, planned.oid)
    pg.sql("CREATE TABLE marker (id int)", staging)
    guard = Guard(block=block, planned=planned, action="refresh staging")

    with disable_run_logger(), pytest.raises(TargetIdentityMismatch, match="nothing was dropped"):
        refresh_staging.fn(block, storage, "", source, key, "postgres", guard)

    assert has_table(pg, staging, "marker")  # the DROP never ran


# -- protected databases reached through another block -----------------------------------------------------


def test_restore_into_a_protected_database_through_an_unprotected_alias_needs_confirm(
    pg: PgCluster, unique: str, backup: tuple[str, str, str]
) -> None:
    storage, source, _ = backup
    make_database_block(pg, f"guarded-{unique}", source, protected=True)
    alias = alias_block(pg, f"alias-{unique}", source)
    pg.sql("INSERT INTO images (name) VALUES ('written after the backup')", source)

    state = restore(storage=storage, source_database=source, target=alias, mode="replace", return_state=True)
    message = failure_message(state)
    assert f"protected block 'guarded-{unique}'" in message
    assert f"confirm={source!r}" in message
    assert pg.sql("SELECT count(*) FROM images", source)[0][0] == 501  # untouched

    report = restore(storage=storage, source_database=source, target=alias, mode="replace", confirm=source)
    assert report.mode == "replace"
    assert pg.sql("SELECT count(*) FROM images", source)[0][0] == 500


def test_create_restore_into_the_missing_database_of_a_protected_block_needs_confirm(
    pg: PgCluster, unique: str, backup: tuple[str, str, str]
) -> None:
    storage, source, _ = backup
    lost = f"lost_{unique}"  # production's database is gone; its protected block still names it
    make_database_block(pg, f"guarded-{unique}", lost, protected=True)
    alias = alias_block(pg, f"alias-{unique}", lost)

    state = restore(storage=storage, source_database=source, target=alias, mode="create", return_state=True)
    assert f"protected block 'guarded-{unique}'" in failure_message(state)
    assert oid_of(pg, lost) is None

    restore(storage=storage, source_database=source, target=alias, mode="create", confirm=lost)
    assert pg.sql("SELECT count(*) FROM images", lost)[0][0] == 500


def test_unreachable_protected_block_blocks_only_its_own_database_name(pg: PgCluster, unique: str) -> None:
    victim = f"drill_{unique}"
    pg.create_database(victim)
    planned = identity_of(pg, victim)
    away = Protected(f"far-{unique}", victim, None, "cannot reach PostgreSQL at 10.0.0.1:5432")
    elsewhere = Protected(f"far2-{unique}", "imagemanager", None, "cannot reach PostgreSQL at 10.0.0.2:5432")
    params = ConnParams(pg.host, pg.port, "postgres", pg.superuser, pg.password)
    guard = Guard(f"scratch-{unique}", planned, "drop the drill's scratch database")

    with disable_run_logger():
        with pytest.raises(ProtectedTarget, match="could not be reached to prove it is another one"):
            drop_scratch_database.fn(params, victim, "postgres", replace(guard, protected=(away,)))
        assert oid_of(pg, victim) == planned.oid
        drop_scratch_database.fn(params, victim, "postgres", replace(guard, protected=(elsewhere,)))
    assert oid_of(pg, victim) is None


def test_drill_scratch_drop_refuses_a_database_a_protected_block_names(pg: PgCluster, unique: str) -> None:
    victim = f"drill_{unique}"
    pg.create_database(victim)
    make_database_block(pg, f"guarded-{unique}", victim, protected=True)
    planned = identity_of(pg, victim)
    params = ConnParams("localhost", pg.port, "postgres", pg.superuser, pg.password)
    protected = (Protected(f"guarded-{unique}", victim, planned),)
    guard = Guard(f"scratch-{unique}", planned, "drop the drill's scratch database", protected)
    with disable_run_logger(), pytest.raises(ProtectedTarget, match="never touches a protected database"):
        drop_scratch_database.fn(params, victim, "postgres", guard)
    assert oid_of(pg, victim) == planned.oid


def test_a_server_that_will_not_say_who_it_is_fails_closed(pg: PgCluster, unique: str) -> None:
    name, role = f"closed_{unique}", f"r_{unique}"
    pg.create_database(name)
    pg.create_role(role, "pw")
    pg.sql("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC", name)  # in this database only
    with (
        connect(ConnParams(pg.host, pg.port, name, role, "pw")) as conn,
        pytest.raises(IdentityUnknown, match="GRANT EXECUTE ON FUNCTION pg_control_system"),
    ):
        identify(conn)


# -- one concurrency limit per database --------------------------------------------------------------------


def test_every_spelling_and_alias_of_one_database_takes_one_limit(pg: PgCluster, unique: str) -> None:
    name = f"lim_{unique}"
    pg.create_database(name)
    direct = make_database_block(pg, f"lim-{unique}", name)
    alias = alias_block(pg, f"lim-alias-{unique}", name)
    with disable_run_logger():
        names = {
            limit_name(identify_target.fn(spelling))
            for spelling in (direct, f"postgres-database/{direct}", alias, f"postgres-database/{alias}")
        }
    assert names == {f"db:{identity_of(pg, name).system_identifier}:{name}"}
    odd = DatabaseIdentity(1, "we/ird%name")
    assert limit_name(odd).startswith("db:1:we_ird_name~")
    assert limit_name(odd) != limit_name(DatabaseIdentity(1, "we_ird_name"))


def test_a_dump_through_an_alias_block_waits_for_the_limit_held_for_the_same_database(
    pg: PgCluster, unique: str, tmp_path: Path
) -> None:
    name = sample_database(pg, f"held_{unique}", rows=200)
    alias = alias_block(pg, f"held-alias-{unique}", name)
    held = limit_name(identity_of(pg, name))
    ensure_concurrency_limit(held)
    with concurrency(held, occupy=1, strict=True):  # a dump through the 127.0.0.1 block holds it
        state = nightly_dump(
            database=alias,
            storage=make_local_block(f"h-{unique}", tmp_path / "h"),
            options=DumpOptions(lock_wait_hours=0.0005),
            return_state=True,
        )
    assert f"another dbops job held {held} ({alias})" in failure_message(state)


def test_a_timeout_inside_the_locked_work_keeps_its_own_message(pg: PgCluster, unique: str) -> None:
    name = f"body_{unique}"
    pg.create_database(name)
    block = make_database_block(pg, f"body-{unique}", name)

    @flow(name="timeout-inside-the-lock")
    def work() -> None:
        with database_lock(block, wait_seconds=30):
            raise TimeoutError("pg_restore did not finish in 5 s")

    message = failure_message(work(return_state=True))
    assert message == "pg_restore did not finish in 5 s"
