"""Index ``image_classifications(image_id)`` CONCURRENTLY.

Revision ID: 0004_classifications_image_index
Revises: 0003_projects_archived
Create Date: 2024-05-27 08:15:00

The table is large by now, and a plain CREATE INDEX would block writes to it for the whole
build. CONCURRENTLY cannot run inside a transaction block, hence the autocommit block (and
``transaction_per_migration=True`` in env.py). A failed concurrent build leaves an INVALID
index behind that would make a re-run fail or, with IF NOT EXISTS, be silently kept; such a
leftover is dropped first.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0004_classifications_image_index"
down_revision: str | None = "0003_projects_archived"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX_NAME = "idx_classifications_image"


def _has_invalid_leftover() -> bool:
    """True if an earlier, interrupted concurrent build left an INVALID index behind."""
    if context.is_offline_mode():
        return False
    valid = op.get_bind().scalar(
        sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
        {"name": INDEX_NAME},
    )
    return valid is False


def upgrade() -> None:
    with op.get_context().autocommit_block():
        if _has_invalid_leftover():
            op.drop_index(
                INDEX_NAME, table_name="image_classifications", postgresql_concurrently=True
            )
        op.create_index(
            INDEX_NAME,
            "image_classifications",
            ["image_id"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            INDEX_NAME,
            table_name="image_classifications",
            postgresql_concurrently=True,
            if_exists=True,
        )
