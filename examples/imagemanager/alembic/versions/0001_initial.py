"""Initial schema: meta groups, projects, images and their classifications.

Revision ID: 0001_initial
Revises:
Create Date: 2024-01-08 09:00:00

The tables are empty when this runs, so plain CREATE INDEX (inside the migration's
transaction) is fine here; later indexes on populated tables are built CONCURRENTLY.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _created_at() -> sa.Column:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")
    )


def upgrade() -> None:
    op.create_table(
        "meta_groups",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="meta_groups_pkey"),
        sa.UniqueConstraint("name", name="meta_groups_name_key"),
    )
    op.create_table(
        "projects",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("meta_group_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="projects_pkey"),
        sa.ForeignKeyConstraint(
            ["meta_group_id"], ["meta_groups.id"], name="projects_meta_group_id_fkey"
        ),
    )
    op.create_index("idx_projects_meta_group", "projects", ["meta_group_id"])
    op.create_table(
        "data_instances",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("project_id", sa.BigInteger(), nullable=False),
        sa.Column("file_name", sa.Text(), nullable=False),
        sa.Column("checksum", sa.Text(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        _created_at(),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="data_instances_pkey"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name="data_instances_project_id_fkey"),
    )
    op.create_index("idx_images_project", "data_instances", ["project_id"])
    op.create_index(
        "idx_images_deleted",
        "data_instances",
        ["project_id"],
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.create_table(
        "image_classifications",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("image_id", sa.BigInteger(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("confidence", sa.REAL(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="image_classifications_pkey"),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["data_instances.id"],
            name="image_classifications_image_id_fkey",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("image_classifications")
    op.drop_index("idx_images_deleted", table_name="data_instances")
    op.drop_index("idx_images_project", table_name="data_instances")
    op.drop_table("data_instances")
    op.drop_index("idx_projects_meta_group", table_name="projects")
    op.drop_table("projects")
    op.drop_table("meta_groups")
