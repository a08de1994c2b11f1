"""A production and a staging database of tests/fixtures/migrate_app, with blocks, for the migrate flow.

Production starts at 0001_base with 2,000 accounts; every upgrade() and downgrade() of that app writes a
row into migration_log, so a test can count how often each ran. A test module gets the `env` fixture by
importing `env_fixture`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect.client.schemas.objects import State

from flows.core.alembic_runner import AlembicApp
from flows.migrate import MigrateOptions, migrate
from tests.conftest import make_database_block, make_local_block
from tests.harness.factories import conn_params
from tests.harness.pg import PgCluster
from tests.harness.runs import artifact_table

REPO_ROOT = Path(__file__).resolve().parents[2]
MIGRATE_APP = REPO_ROOT / "tests" / "fixtures" / "migrate_app"
LINT_APP = REPO_ROOT / "tests" / "fixtures" / "lint_app" / "alembic.ini"
HEAD = "0003_email_unique"
FAST = MigrateOptions(approval_poll_seconds=1, retry_first_delay_s=0.2, lock_wait_hours=0.05)


#: a revision of the async-template app (tests/fixtures/async_app) that reads data through the connection:
#: offline (--sql) it cannot be rendered, so the lint must block it unless waived
READS_DATA_REVISION = '''"""Reads data through the connection: offline (--sql) it cannot be rendered."""
import sqlalchemy as sa
from alembic import op

revision = "0003_reads_data"
down_revision = "0002_items_note"


def upgrade():
    n = op.get_bind().execute(sa.text("SELECT count(*) FROM items")).scalar_one()
    op.execute(f"COMMENT ON TABLE items IS 'had {n} rows'")


def downgrade():
    op.execute("COMMENT ON TABLE items IS NULL")
'''


@dataclass
class Env:
    prod: str  # database names
    staging: str
    prod_block: str
    staging_block: str
    storage: str
    backups: Path

    def run(self, **kw: Any) -> State:
        params: dict[str, Any] = {
            "database": self.prod_block,
            "staging_database": self.staging_block,
            "storage": self.storage,
            "prefix": "prod",
            "alembic": str(MIGRATE_APP),  # the folder: alembic.ini is found inside it
            "lock_timeout": "2s",
            "retry_budget": 0,
            "options": FAST,
        }
        params.update(kw)
        return migrate(**params, return_state=True)


def revision(pg: PgCluster, database: str) -> str | None:
    exists = pg.sql("SELECT to_regclass('alembic_version') IS NOT NULL", database)[0][0]
    if not exists:
        return None
    rows = pg.sql("SELECT version_num FROM alembic_version", database)
    return ",".join(r[0] for r in rows) or None


def log_counts(pg: PgCluster, database: str) -> dict[str, int]:
    """{"0002_nickname up": 1, ...}: how often each upgrade()/downgrade() of the app ran there."""
    rows = pg.sql("SELECT revision || ' ' || direction, count(*) FROM migration_log GROUP BY 1", database)
    return {k: int(n) for k, n in rows}


def has_column(pg: PgCluster, database: str, table: str, column: str) -> bool:
    return bool(
        pg.sql(
            "SELECT 1 FROM information_schema.columns WHERE table_name = %s AND column_name = %s",
            database,
            (table, column),
        )
    )


def report_table(database: str) -> dict[str, str]:
    return {row["item"]: row["value"] for row in artifact_table(f"migrate-{database}".replace("_", "-"))}


def backups_in(path: Path) -> list[Path]:
    return sorted(path.rglob("*.manifest.json")) if path.exists() else []


def env_with_blocks(pg: PgCluster, prod: str, staging: str, backups: Path) -> Env:
    """An Env over two existing databases: their blocks are named after them (`_` -> `-`), the storage is
    a local folder."""
    prod_block = make_database_block(pg, prod.replace("_", "-"), prod)
    return Env(
        prod=prod,
        staging=staging,
        prod_block=prod_block,
        staging_block=make_database_block(pg, staging.replace("_", "-"), staging),
        storage=make_local_block(f"bk-{prod_block}", backups),
        backups=backups,
    )


@pytest.fixture(name="env")
def env_fixture(pg: PgCluster, unique: str, tmp_path: Path) -> Env:
    prod, staging = f"prod_{unique}", f"stg_{unique}"
    pg.create_database(prod)
    pg.create_database(staging)
    AlembicApp(MIGRATE_APP / "alembic.ini").upgrade(conn_params(pg, prod), "0001_base")
    pg.sql(
        "INSERT INTO accounts (email) SELECT 'user' || g || '@example.org' FROM generate_series(1, 2000) g",
        prod,
    )
    pg.sql("CREATE TABLE stale_marker (id int)", staging)  # whatever staging held before: refresh drops it
    return env_with_blocks(pg, prod, staging, tmp_path / "backups")
