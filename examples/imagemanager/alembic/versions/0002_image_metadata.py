"""Add the nullable jsonb ``metadata`` column to images.

Revision ID: 0002_image_metadata
Revises: 0001_initial
Create Date: 2024-02-19 10:30:00

Nullable and without default, so ADD COLUMN only touches the catalog: no table rewrite and
the ACCESS EXCLUSIVE lock is held for milliseconds even on a large table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_image_metadata"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("data_instances", sa.Column("metadata", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("data_instances", "metadata")
