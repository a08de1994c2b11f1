"""Alembic environment of the image manager.

Convention shared with the dbops flows, tests and benchmarks (keep it stable):

* ``DATABASE_URL`` is a SQLAlchemy URL *without* password, e.g.
  ``postgresql+psycopg://app@127.0.0.1:5432/imagemanager`` or ``postgresql+asyncpg://...``.
  Keeping the secret out of the URL means the URL can be logged and stored in deployment
  parameters, while the password travels separately as ``PGPASSWORD`` or in a passfile
  (``PGPASSFILE``: dbops's migrate flow uses one).
* ``PGPASSWORD`` is read by libpq itself for psycopg; asyncpg gets it passed explicitly. Without it,
  both read the passfile.
* Each migration runs in its own transaction (``transaction_per_migration=True``) because
  revisions use ``autocommit_block()`` (CREATE INDEX CONCURRENTLY, batched backfills), which
  commits the transaction in progress: with one transaction for the whole run, an earlier
  revision would be committed halfway without its ``alembic_version`` bump.
"""

from __future__ import annotations

import asyncio
import os
import sys
from logging.config import fileConfig
from pathlib import Path

from alembic import context
from alembic.util import CommandError
from sqlalchemy import URL, Connection, make_url, pool
from sqlalchemy.engine import create_engine
from sqlalchemy.ext.asyncio import create_async_engine

# Make ``examples.imagemanager`` importable when alembic is run from a checkout that is not
# installed in the current environment (``alembic -c examples/imagemanager/alembic.ini``).
_REPO_ROOT = Path(__file__).resolve().parents[3]
if str(_REPO_ROOT) not in sys.path:
    sys.path.append(str(_REPO_ROOT))

from examples.imagemanager.models import Base  # noqa: E402

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    # Callers embedding alembic (e.g. a Prefect flow) can keep their own logging setup by
    # setting config.attributes["configure_logger"] = False.
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata

# Offline mode only needs a dialect to render SQL, so a bare URL is enough there.
OFFLINE_DEFAULT_URL = "postgresql://"


def database_url(*, required: bool) -> URL:
    """Return the URL from ``DATABASE_URL``, normalised to a driver that is installed.

    A bare ``postgresql://`` would make SQLAlchemy pick psycopg2, which this project does not
    ship, so it is mapped to psycopg 3 (same libpq semantics, so PGPASSWORD keeps working).
    """
    raw = os.environ.get("DATABASE_URL", "").strip()
    if not raw:
        if required:
            raise CommandError(
                "DATABASE_URL is not set: export it as a SQLAlchemy URL without password, e.g. "
                "DATABASE_URL=postgresql+psycopg://app@127.0.0.1:5432/imagemanager, and put the "
                "password in PGPASSWORD."
            )
        return make_url(OFFLINE_DEFAULT_URL)
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def _configure(**kwargs: object) -> None:
    """Options common to offline and online runs, so both render the same migrations."""
    context.configure(
        target_metadata=target_metadata,
        transaction_per_migration=True,
        compare_type=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    """Render the migrations as SQL (``alembic upgrade a:b --sql``) without connecting."""
    url = database_url(required=False)
    _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run_with_connection(connection: Connection) -> None:
    """Run the migrations on an open connection; shared by the sync and async drivers."""
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: URL) -> None:
    """Drive the sync migration code through an asyncpg connection.

    asyncpg does not use libpq, so the password from PGPASSWORD is passed explicitly.
    """
    connect_args: dict[str, object] = {}
    password = os.environ.get("PGPASSWORD")
    if password and url.password is None:
        connect_args["password"] = password
    engine = create_async_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_with_connection)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Connect with the URL from the environment and apply the migrations."""
    url = database_url(required=True)
    if url.get_dialect().is_async:
        asyncio.run(_run_async(url))
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _run_with_connection(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
