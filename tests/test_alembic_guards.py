"""The guards around an application's Alembic run hold whatever driver the application uses.

Two applications: tests/fixtures/migrate_app (a sync env.py, psycopg) and tests/fixtures/async_app
(Alembic's async template, `os.environ["DATABASE_URL"]`, asyncpg). Locks are real: another session
holds a lock on the table in an open transaction while the revision tries to ALTER it.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from flows.core.alembic_errors import LockTimeout, MigrationFailed, MigrationTimeout, WatchdogBlind
from flows.core.alembic_runner import AlembicApp
from flows.core.ddl_lint import lint
from flows.core.ddl_rules import blocking
from flows.core.postgres import ConnParams
from tests.harness.factories import conn_params
from tests.harness.migrate_env import READS_DATA_REVISION
from tests.harness.pg import PgCluster, wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"


@dataclass(frozen=True)
class Sample:
    """One application: where it is, its driver, and its revision that ALTERs a table."""

    folder: str
    driver: str
    base: str  # creates `table`
    alter: str  # adds `column` to `table`
    table: str
    column: str


PSYCOPG = Sample("migrate_app", "postgresql+psycopg", "0001_base", "0002_nickname", "accounts", "nickname")
ASYNCPG = Sample("async_app", "postgresql+asyncpg", "0001_items", "0002_items_note", "items", "note")
BOTH = pytest.mark.parametrize("sample", [PSYCOPG, ASYNCPG], ids=["psycopg", "asyncpg"])


def app_copy(tmp_path: Path, sample: Sample, extra: dict[str, str] | None = None, **kw: Any) -> AlembicApp:
    """A copy of the sample app (plus extra revision files) so a test can add revisions of its own."""
    root = tmp_path / sample.folder
    shutil.copytree(FIXTURES / sample.folder, root, ignore=shutil.ignore_patterns("__pycache__"))
    for name, source in (extra or {}).items():
        (root / "alembic" / "versions" / name).write_text(source)
    kw.setdefault("timeout_s", 60)
    return AlembicApp(root / "alembic.ini", driver=sample.driver, **kw)


@pytest.fixture
def params(pg: PgCluster, unique: str) -> ConnParams:
    name = f"guard_{unique}"
    pg.create_database(name)
    return conn_params(pg, name)


def has_column(pg: PgCluster, database: str, table: str, column: str) -> bool:
    rows = pg.sql(
        "SELECT 1 FROM information_schema.columns WHERE table_name = %s AND column_name = %s",
        database,
        (table, column),
    )
    return bool(rows)


def stamped(pg: PgCluster, database: str) -> list[str]:
    return sorted(r[0] for r in pg.sql("SELECT version_num FROM alembic_version", database))


def migrate_sessions(pg: PgCluster, database: str, lock_wait: bool = False) -> bool:
    """Whether a session of a migration run (application_name dbops-migrate-<token>) is there (waiting)."""
    rows = pg.sql(
        "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND application_name LIKE 'dbops-migrate-%%' "
        "AND (NOT %s OR wait_event_type = 'Lock')",
        "postgres",
        (database, lock_wait),
    )
    return bool(rows)


def allow_connections(database: str, allow: bool) -> sql.Composed:
    return sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
        sql.Identifier(database), sql.SQL("true" if allow else "false")
    )


def upgrade_in_thread(
    app: AlembicApp, params: ConnParams, target: str, start: str, lock_timeout_ms: int
) -> tuple[threading.Thread, list[BaseException]]:
    """Start `app.upgrade` from `start` to `target` in a thread (statement_timeout off); what it raises
    lands in the returned list."""
    outcome: list[BaseException] = []

    def migrate() -> None:
        try:
            app.upgrade(
                params, target, lock_timeout_ms=lock_timeout_ms, statement_timeout_ms=0, start=[start]
            )
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    runner = threading.Thread(target=migrate)
    runner.start()
    return runner, outcome


def hold_lock(pg: PgCluster, database: str, table: str) -> psycopg.Connection:
    """An open transaction that wrote to the table: ALTER TABLE must wait for it."""
    blocker = pg.connect(database, autocommit=False)
    blocker.execute(sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(sql.Identifier(table)))
    return blocker


# -- item 16: lock_timeout and statement_timeout, whatever the driver ------------------------------------


def upgrade_while_the_table_is_locked(
    app: AlembicApp, sample: Sample, params: ConnParams, pg: PgCluster, target: str
) -> tuple[LockTimeout, float]:
    """Upgrade from the sample's base to `target` (lock_timeout 1 s) while another session holds a lock on
    the sample's table; returns the LockTimeout it must raise and the seconds it took. The blocking
    transaction must come through unaffected."""
    app.upgrade(params, sample.base, lock_timeout_ms=1000, statement_timeout_ms=0, start=[])
    blocker = hold_lock(pg, params.database, sample.table)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as caught:
            app.upgrade(params, target, lock_timeout_ms=1000, statement_timeout_ms=0, start=[sample.base])
        elapsed = time.monotonic() - t0
        assert blocker.execute("SELECT 1").fetchone() == (1,), "the held transaction is unaffected"
    finally:
        blocker.rollback()
        blocker.close()
    return caught.value, elapsed


@BOTH
def test_held_lock_fails_the_revision_within_lock_timeout(
    sample: Sample, tmp_path: Path, params: ConnParams, pg: PgCluster
) -> None:
    app = app_copy(tmp_path, sample)
    caught, elapsed = upgrade_while_the_table_is_locked(app, sample, params, pg, sample.alter)
    assert caught.revision == sample.alter
    assert "waited longer than lock_timeout" in str(caught)
    assert elapsed < 15, f"{elapsed:.1f} s: the ALTER waited far past lock_timeout (1 s)"
    assert not has_column(pg, params.database, sample.table, sample.column)
    assert stamped(pg, params.database) == [sample.base]


TURNS_GUARD_OFF = '''"""A revision that switches the guard off for its own transaction, then ALTERs."""
from alembic import op
import sqlalchemy as sa

revision = "0009_guard_off"
down_revision = "{down}"


def upgrade():
    op.execute("SET LOCAL lock_timeout = 0")
    op.add_column("{table}", sa.Column("guard_off", sa.Text(), nullable=True))


def downgrade():
    op.drop_column("{table}", "guard_off")
'''


@BOTH
def test_watchdog_cancels_a_lock_wait_even_when_the_revision_turns_lock_timeout_off(
    sample: Sample, tmp_path: Path, params: ConnParams, pg: PgCluster
) -> None:
    source = TURNS_GUARD_OFF.format(down=sample.base, table=sample.table)
    app = app_copy(tmp_path, sample, {"0009_guard_off.py": source})
    (app.ini_path.parent / "alembic" / "versions" / f"{sample.alter}.py").unlink()
    if sample is PSYCOPG:
        (app.ini_path.parent / "alembic" / "versions" / "0003_email_unique.py").unlink()
    caught, elapsed = upgrade_while_the_table_is_locked(app, sample, params, pg, "0009_guard_off")
    assert caught.revision == "0009_guard_off"
    assert elapsed < 15, f"{elapsed:.1f} s: nothing cancelled the wait"
    assert not has_column(pg, params.database, sample.table, "guard_off")
    assert stamped(pg, params.database) == [sample.base]


def test_a_migration_the_watchdog_cannot_see_is_stopped(
    tmp_path: Path, params: ConnParams, pg: PgCluster
) -> None:
    """Fail closed: the watchdog's connection is cut and no new one is allowed (ALLOW_CONNECTIONS false)
    while the revision, which turned lock_timeout off, waits for a lock: the Alembic child is stopped."""
    app = app_copy(
        tmp_path, ASYNCPG, {"0009_guard_off.py": TURNS_GUARD_OFF.format(down="0001_items", table="items")}
    )
    (app.ini_path.parent / "alembic" / "versions" / "0002_items_note.py").unlink()
    app.upgrade(params, "0001_items", lock_timeout_ms=8000, statement_timeout_ms=0, start=[])
    blocker = hold_lock(pg, params.database, "items")
    runner, outcome = upgrade_in_thread(app, params, "0009_guard_off", "0001_items", lock_timeout_ms=8000)

    def sessions(lock_wait: bool = False) -> bool:
        return migrate_sessions(pg, params.database, lock_wait)

    try:
        wait_until(lambda: sessions(lock_wait=True), timeout=30, what="the revision waiting for the lock")
        pg.sql(allow_connections(params.database, False))
        pg.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
            "AND application_name LIKE 'dbops-watchdog %%'",
            "postgres",
            (params.database,),
        )
        t0 = time.monotonic()
        runner.join(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        pg.sql(allow_connections(params.database, True))
        blocker.rollback()
        blocker.close()
        runner.join(timeout=60)
    assert outcome, outcome
    assert isinstance(outcome[0], WatchdogBlind), outcome
    assert "could not watch its locks" in str(outcome[0])
    assert outcome[0].revision == "0009_guard_off"
    assert elapsed < 30, f"{elapsed:.1f} s (blind for 8 s, the longer of 5 s and lock_timeout, then stopped)"
    # The killed child's session notices its client is gone once it gets the lock, and rolls back.
    wait_until(lambda: not sessions(), timeout=30, what="the orphaned session to end")
    assert not has_column(pg, params.database, "items", "guard_off")
    assert stamped(pg, params.database) == ["0001_items"]


def test_a_stopped_alembic_leaves_no_session_queued_for_the_lock(
    tmp_path: Path, params: ConnParams, pg: PgCluster
) -> None:
    """Alembic outlives timeout_s and is killed while its ALTER waits (lock_timeout is longer): the server
    session would stay in the lock queue, blocking the application, until the lock came free."""
    guard_off = TURNS_GUARD_OFF.format(down="0001_items", table="items")
    app = app_copy(tmp_path, ASYNCPG, {"0009_guard_off.py": guard_off}, timeout_s=20)
    (app.ini_path.parent / "alembic" / "versions" / "0002_items_note.py").unlink()
    app.upgrade(params, "0001_items", lock_timeout_ms=60000, statement_timeout_ms=0, start=[])
    blocker = hold_lock(pg, params.database, "items")
    runner, outcome = upgrade_in_thread(app, params, "0009_guard_off", "0001_items", lock_timeout_ms=60000)
    try:
        wait_until(
            lambda: migrate_sessions(pg, params.database, lock_wait=True), timeout=20, what="lock wait"
        )
        runner.join(timeout=40)
        assert outcome, outcome
        assert isinstance(outcome[0], MigrationTimeout), outcome
        # still holding the lock: the queued session must be gone now, not when the lock comes free
        wait_until(lambda: not migrate_sessions(pg, params.database), timeout=5, what="the session to end")
        assert blocker.execute("SELECT 1").fetchone() == (1,)
    finally:
        blocker.rollback()
        blocker.close()
        runner.join(timeout=60)
    assert not has_column(pg, params.database, "items", "guard_off")


SLEEPS = '''"""A revision whose statement runs for a minute."""
from alembic import op

revision = "0003_slow"
down_revision = "0002_items_note"


def upgrade():
    op.execute("SELECT pg_sleep(60)")


def downgrade():
    pass
'''


def test_statement_timeout_cancels_a_long_statement_with_asyncpg(
    tmp_path: Path, params: ConnParams, pg: PgCluster
) -> None:
    app = app_copy(tmp_path, ASYNCPG, {"0003_slow.py": SLEEPS})
    app.upgrade(params, ASYNCPG.alter, lock_timeout_ms=1000, statement_timeout_ms=0, start=[])
    t0 = time.monotonic()
    with pytest.raises(MigrationFailed, match="ran longer than statement_timeout") as caught:
        app.upgrade(params, "head", lock_timeout_ms=1000, statement_timeout_ms=1000, start=[ASYNCPG.alter])
    elapsed = time.monotonic() - t0
    assert caught.value.revision == "0003_slow"
    assert elapsed < 15, f"{elapsed:.1f} s: the minute-long statement was not cancelled"
    assert stamped(pg, params.database) == [ASYNCPG.alter]


# -- item 11 (Alembic): an allowlisted environment, the password in a private passfile --------------------

WRITES_ENV = '''"""Records the environment the revision runs in."""
import json
import os
import stat
import sys

revision = "0009_env"
down_revision = "{down}"


def upgrade():
    passfile = os.environ.get("PGPASSFILE")
    info = {{
        "env": dict(os.environ),
        "argv": sys.argv[1:],
        "passfile_mode": stat.S_IMODE(os.stat(passfile).st_mode) if passfile else None,
    }}
    with open({out!r}, "w") as f:
        json.dump(info, f)


def downgrade():
    pass
'''


@BOTH
def test_alembic_sees_an_allowlisted_environment_and_the_password_only_in_a_private_passfile(
    sample: Sample, tmp_path: Path, params: ConnParams, pg: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "env.json"
    head = "0003_email_unique" if sample is PSYCOPG else sample.alter
    app = app_copy(
        tmp_path,
        sample,
        {"0009_env.py": WRITES_ENV.format(down=head, out=str(out))},
        pass_env=("IMAGEMANAGER_FLAG",),
    )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-of-the-worker")
    monkeypatch.setenv("PREFECT_API_KEY", "prefect-key-of-the-worker")
    monkeypatch.setenv("PGPASSWORD", "a-stale-worker-password")
    monkeypatch.setenv("IMAGEMANAGER_FLAG", "on")
    app.upgrade(params, "head", lock_timeout_ms=2000, statement_timeout_ms=0, start=[])
    seen = json.loads(out.read_text())
    env = seen["env"]
    assert env["DATABASE_URL"] == f"{sample.driver}://postgres@{params.host}:{params.port}/{params.database}"
    assert "PGPASSWORD" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "PREFECT_API_KEY" not in env
    assert env["IMAGEMANAGER_FLAG"] == "on", "a name listed in pass_env reaches env.py"
    assert seen["passfile_mode"] == 0o600
    assert not Path(env["PGPASSFILE"]).exists(), "the passfile is removed after the run"
    assert pg.password not in json.dumps(seen), "the password is in no variable and no argument"
    assert env["PGAPPNAME"].startswith("dbops-migrate-")
    allowed = {"PATH", "HOME", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "IMAGEMANAGER_FLAG"}
    ours = {"DATABASE_URL", "PGPASSFILE", "PGAPPNAME", "PGCONNECT_TIMEOUT", "PGOPTIONS"}
    assert [k for k in env if k not in allowed | ours and not k.startswith(("LC_", "PGSSL"))] == []


# -- item 13: offline SQL with the application's DATABASE_URL convention -----------------------------------


def test_offline_sql_renders_an_env_py_that_reads_os_environ_database_url(
    tmp_path: Path, params: ConnParams
) -> None:
    app = app_copy(tmp_path, ASYNCPG, {"0003_reads_data.py": READS_DATA_REVISION})
    offline = app.offline_sql(None, "head", params)
    assert list(offline) == [ASYNCPG.base, ASYNCPG.alter]
    assert "ADD COLUMN note TEXT" in offline[ASYNCPG.alter]
    assert list(offline.failed) == ["0003_reads_data"]
    findings = lint(dict(offline), existing_tables=[], not_rendered=offline.failed)
    blocked = blocking(findings)
    assert [(f.revision, f.rule) for f in blocked] == [("0003_reads_data", "offline-sql-not-rendered")]
    assert offline.failed["0003_reads_data"] in blocked[0].why
    waived = lint(
        dict(offline),
        existing_tables=[],
        not_rendered=offline.failed,
        waivers=["0003_reads_data:offline-sql-not-rendered"],
    )
    assert blocking(waived) == []
