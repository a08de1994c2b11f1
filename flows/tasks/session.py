"""The first connection of every flow's preflight: PostgreSQL itself, never a connection pooler."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from prefect import get_run_logger

from blocks.postgres import PostgresDatabase, load_database
from flows.tasks.common import dbops_task


@contextmanager
def direct_session(
    block: PostgresDatabase, database: str | None = None, autocommit: bool = True
) -> Iterator[psycopg.Connection]:
    """A connection to the block's server (its database, or `database` on the same server) after the
    pooler check (flows.core.pooler); a TCP forward or an allowed session pooler is said in the log."""
    conn, route = block.connect_direct(database, autocommit=autocommit)
    if route.kind != "direct":
        get_run_logger().info(
            "%s reaches PostgreSQL (server port %d) through %s",
            block.params(database).where,
            route.server_port,
            route.detail,
        )
    with conn:
        yield conn


@dbops_task("check_database_route")
def check_database_route(database: str, maintenance_database: str | None = None) -> str:
    """The preflight of flows whose first connection takes a session lock (reindex, migrate): make sure
    the block reaches PostgreSQL itself before any lock is taken through a pooler."""
    block = load_database(database)
    with direct_session(block, maintenance_database) as conn:
        return f"{block.params(maintenance_database).where} (PostgreSQL pid {conn.info.backend_pid})"
