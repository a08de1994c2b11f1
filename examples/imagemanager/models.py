"""SQLAlchemy models of the image manager schema at Alembic head.

The migrations under ``alembic/versions`` are the source of truth for the live schema; these
models mirror head so that application code, ``alembic check`` and autogenerate agree with it.
Constraint names follow PostgreSQL's own defaults (``<table>_pkey``, ``<table>_<col>_fkey``)
so that names are identical whether a table was created by a migration or by the database,
which matters to the dbops flows that address constraints and indexes by name.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    REAL,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Text,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION: dict[str, str] = {
    "pk": "%(table_name)s_pkey",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "uq": "%(table_name)s_%(column_0_name)s_key",
    "ck": "%(table_name)s_%(constraint_name)s_check",
    "ix": "ix_%(table_name)s_%(column_0_name)s",
}


class Base(DeclarativeBase):
    """Declarative base whose metadata uses PostgreSQL-style constraint names."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class MetaGroup(Base):
    """Top-level grouping of projects (a customer, a department...)."""

    __tablename__ = "meta_groups"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class Project(Base):
    """A collection of images belonging to one meta group."""

    __tablename__ = "projects"
    __table_args__ = (Index("idx_projects_meta_group", "meta_group_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    meta_group_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("meta_groups.id"), nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # Added by revision 0003 (nullable, batched backfill, then NOT NULL); the default keeps
    # inserts from code that predates the column valid.
    archived: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())


class DataInstance(Base):
    """One image file. Rows are soft-deleted (``deleted_at``) before being purged for real."""

    __tablename__ = "data_instances"
    __table_args__ = (
        Index("idx_images_project", "project_id"),
        # Almost every query filters on live images of one project; the partial index stays
        # small because soft-deleted rows (the ones purge jobs churn through) are left out.
        Index(
            "idx_images_deleted",
            "project_id",
            postgresql_where=text("deleted_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    project_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("projects.id"), nullable=False)
    file_name: Mapped[str] = mapped_column(Text, nullable=False)
    # Hex-encoded SHA-256 of the file: text rather than bytea so that it is readable in psql
    # and in dumps, at the cost of 2x the bytes.
    checksum: Mapped[str] = mapped_column(Text, nullable=False)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    # The column is called "metadata", which is reserved on declarative classes.
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ImageClassification(Base):
    """A label predicted for an image; it has no meaning without its image, hence the cascade."""

    __tablename__ = "image_classifications"
    __table_args__ = (Index("idx_classifications_image", "image_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    image_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("data_instances.id", ondelete="CASCADE"), nullable=False
    )
    label: Mapped[str] = mapped_column(Text, nullable=False)
    confidence: Mapped[float] = mapped_column(REAL, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


TABLES: tuple[str, ...] = ("meta_groups", "projects", "data_instances", "image_classifications")
INDEXES: tuple[str, ...] = (
    "idx_projects_meta_group",
    "idx_images_project",
    "idx_images_deleted",
    "idx_classifications_image",
)
