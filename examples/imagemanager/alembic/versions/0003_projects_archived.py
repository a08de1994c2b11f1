"""Add ``projects.archived boolean NOT NULL`` without holding long locks.

Revision ID: 0003_projects_archived
Revises: 0002_image_metadata
Create Date: 2024-04-02 14:00:00

The textbook "safe" sequence, so that no step holds ACCESS EXCLUSIVE while scanning or
rewriting the table:

1. ADD COLUMN nullable, then SET DEFAULT false: catalog-only changes; new rows get false.
2. Backfill existing NULLs in primary-key ranges, each batch committed on its own (autocommit
   block), so row locks and dead tuples stay bounded and vacuum can keep up.
3. ADD CHECK (archived IS NOT NULL) NOT VALID, committed, then VALIDATE CONSTRAINT, which
   scans under SHARE UPDATE EXCLUSIVE only (reads and writes continue). It is added after the
   backfill so that updates of not-yet-backfilled rows never trip over it.
4. SET NOT NULL, which PostgreSQL (>= 12) proves from the validated CHECK without a scan,
   then drop the now redundant CHECK.

Steps 1-3 are idempotent, so a run interrupted during the backfill can simply be re-run.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0003_projects_archived"
down_revision: str | None = "0002_image_metadata"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH_SIZE = 1000
CHECK_NAME = "projects_archived_not_null"

# Offline (--sql) there is no connection to read the id range from, so the loop runs
# server-side; COMMIT inside DO is allowed because the autocommit block emits it outside
# any transaction block.
OFFLINE_BACKFILL = f"""
DO $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    SELECT min(id), max(id) INTO lo, hi FROM projects;
    WHILE lo <= hi LOOP
        UPDATE projects SET archived = false
        WHERE id >= lo AND id < lo + {BATCH_SIZE} AND archived IS NULL;
        COMMIT;
        lo := lo + {BATCH_SIZE};
    END LOOP;
END
$$
"""


def _backfill_online() -> None:
    """Walk the primary key in ranges: each UPDATE is its own transaction in autocommit mode.

    Ranges rather than "LIMIT n WHERE archived IS NULL" because the latter rescans the
    already-backfilled prefix for every batch (there is no index on ``archived``).
    """
    bind = op.get_bind()
    lo, hi = bind.execute(sa.text("SELECT min(id), max(id) FROM projects")).one()
    if lo is None:
        return
    update = sa.text(
        "UPDATE projects SET archived = false "
        "WHERE id >= :lo AND id < :hi AND archived IS NULL"
    )
    for start in range(lo, hi + 1, BATCH_SIZE):
        bind.execute(update, {"lo": start, "hi": start + BATCH_SIZE})


def upgrade() -> None:
    op.execute("ALTER TABLE projects ADD COLUMN IF NOT EXISTS archived boolean")
    op.execute("ALTER TABLE projects ALTER COLUMN archived SET DEFAULT false")

    with op.get_context().autocommit_block():
        if context.is_offline_mode():
            op.execute(OFFLINE_BACKFILL)
        else:
            _backfill_online()
        op.execute(f"ALTER TABLE projects DROP CONSTRAINT IF EXISTS {CHECK_NAME}")
        op.execute(
            f"ALTER TABLE projects ADD CONSTRAINT {CHECK_NAME} CHECK (archived IS NOT NULL) NOT VALID"
        )
        op.execute(f"ALTER TABLE projects VALIDATE CONSTRAINT {CHECK_NAME}")

    op.alter_column("projects", "archived", existing_type=sa.Boolean(), nullable=False)
    # Raw SQL: op.drop_constraint() would run the name through the metadata naming convention.
    op.execute(f"ALTER TABLE projects DROP CONSTRAINT {CHECK_NAME}")


def downgrade() -> None:
    op.drop_column("projects", "archived")
