"""The migrate flow's safety fixes end to end (issue 10): a brand-new empty database can be migrated,
a revision whose SQL cannot be rendered blocks before anything is touched, and lock_timeout holds with an
asyncpg application. Real PostgreSQL, local storage, the application's Alembic in subprocesses, a real
Prefect API.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from flows.core.alembic_runner import AlembicApp
from flows.migrate import MigrateReport
from tests.harness.factories import conn_params
from tests.harness.migrate_env import (
    FAST,
    READS_DATA_REVISION,
    Env,
    backups_in,
    env_with_blocks,
    has_column,
    report_table,
    revision,
)
from tests.harness.pg import PgCluster
from tests.harness.runs import failure_message

pytestmark = pytest.mark.usefixtures("prefect_api")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MIGRATE_APP = FIXTURES / "migrate_app"
ASYNC_APP = FIXTURES / "async_app"
ASYNC = FAST.model_copy(update={"driver": "postgresql+asyncpg"})


@pytest.fixture
def empty_env(pg: PgCluster, unique: str, tmp_path: Path) -> Env:
    """Production and staging: brand-new databases without a single table."""
    prod, staging = f"new_{unique}", f"newstg_{unique}"
    pg.create_database(prod)
    pg.create_database(staging)
    return env_with_blocks(pg, prod, staging, tmp_path / "backups")


def test_first_migration_of_a_new_empty_database_completes_after_a_verified_pre_backup(
    empty_env: Env, pg: PgCluster
) -> None:
    env = empty_env
    state = env.run()
    assert state.is_completed(), failure_message(state)
    report: MigrateReport = state.result()
    assert report.from_revision == "base"
    assert revision(pg, env.prod) == "0003_email_unique"
    manifests = backups_in(env.backups)
    assert len(manifests) == 1
    assert report.backup_key
    manifest = json.loads(manifests[0].read_text())
    assert manifest["verified"] is True
    assert manifest["alembic_revision"] is None
    assert "no tables" in manifest["verification"]["detail"]


def async_app_copy(tmp_path: Path, extra: dict[str, str]) -> Path:
    root = tmp_path / "async_app"
    shutil.copytree(ASYNC_APP, root, ignore=shutil.ignore_patterns("__pycache__"))
    for name, source in extra.items():
        (root / "alembic" / "versions" / name).write_text(source)
    return root


@pytest.fixture
def async_env(pg: PgCluster, unique: str, tmp_path: Path) -> Env:
    """Production at 0001_items of the async-template application, with a few rows."""
    prod, staging = f"aprod_{unique}", f"astg_{unique}"
    pg.create_database(prod)
    pg.create_database(staging)
    app = AlembicApp(ASYNC_APP / "alembic.ini", driver="postgresql+asyncpg")
    app.upgrade(conn_params(pg, prod), "0001_items", start=[])
    pg.sql("INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 100) g", prod)
    return env_with_blocks(pg, prod, staging, tmp_path / "backups")


def test_revision_whose_sql_cannot_be_rendered_blocks_before_production_unless_waived(
    async_env: Env, pg: PgCluster, tmp_path: Path
) -> None:
    env = async_env
    app = async_app_copy(tmp_path, {"0003_reads_data.py": READS_DATA_REVISION})
    state = env.run(alembic=str(app), options=ASYNC)
    message = failure_message(state)
    assert "0003_reads_data:offline-sql-not-rendered" in message
    assert "revision 0003_reads_data: Its offline SQL could not be rendered (" in message
    assert "waivers=['offline-sql-not-rendered@0003_reads_data']" in message
    assert revision(pg, env.prod) == "0001_items"
    assert not has_column(pg, env.prod, "items", "note")
    assert backups_in(env.backups) == [], "blocked before the pre-backup"
    # 0002's SQL rendered although env.py reads os.environ["DATABASE_URL"]: only 0003 is named
    assert "0002_items_note:offline-sql-not-rendered" not in message

    waived = env.run(
        alembic=str(app), options=ASYNC, dry_run=True, waivers=["offline-sql-not-rendered@0003_reads_data"]
    )
    assert waived.is_completed(), failure_message(waived)
    assert "0003_reads_data" in report_table(env.prod)["offline SQL not rendered"]


def test_asyncpg_application_behind_a_held_lock_retries_then_fails_within_the_budget(
    async_env: Env, pg: PgCluster
) -> None:
    """The reported case: asyncpg ignores PGOPTIONS, and the ALTER queued behind a long transaction."""
    env = async_env
    blocker = pg.connect(env.prod, autocommit=False)
    try:
        blocker.execute("LOCK TABLE items IN ROW EXCLUSIVE MODE")
        t0 = time.monotonic()
        state = env.run(alembic=str(ASYNC_APP), options=ASYNC, lock_timeout="1s", retry_budget=6)
        elapsed = time.monotonic() - t0
        message = failure_message(state)
        assert blocker.execute("SELECT count(*) FROM items").fetchone() == (100,), "holder unaffected"
    finally:
        blocker.rollback()
        blocker.close()
    assert "revision 0002_items_note" in message
    assert "waited longer than lock_timeout (1000 ms)" in message
    assert "within retry_budget 6 s" in message
    assert "the database is at 0001_items" in message
    assert int(message.split("(1000 ms) ")[1].split(" time")[0]) >= 2, "retried at least once"
    assert revision(pg, env.prod) == "0001_items"
    assert not has_column(pg, env.prod, "items", "note")
    assert revision(pg, env.staging) == "0002_items_note", "the rehearsal on staging passed"
    assert elapsed < 120, f"{elapsed:.0f} s"
