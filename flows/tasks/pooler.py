"""Tasks of the PgBouncer check: read PgBouncer's console, read PostgreSQL's connection limits."""

from __future__ import annotations

from prefect import get_run_logger

from blocks.postgres import load_database
from flows.core.health.pooler import (
    PgBouncerSnapshot,
    ServerLimits,
    connect_console,
    read_pgbouncer,
    read_server_limits,
)
from flows.tasks.common import dbops_task
from flows.tasks.session import direct_session


@dbops_task("read_pgbouncer_console")
def read_pgbouncer_console(pgbouncer: str) -> PgBouncerSnapshot:
    """SHOW POOLS / STATS / DATABASES / CONFIG from the console of the PgBouncer the block points at."""
    params = load_database(pgbouncer).params()
    with connect_console(params) as conn:
        snap = read_pgbouncer(conn)
    get_run_logger().info(
        "%s at %s:%s: %d pools, pool_mode %s, default_pool_size %s, reserve_pool_size %s",
        snap.version,
        params.host,
        params.port,
        len(snap.pools),
        snap.config.get("pool_mode"),
        snap.config.get("default_pool_size"),
        snap.config.get("reserve_pool_size"),
    )
    return snap


@dbops_task("read_connection_limits")
def read_connection_limits(database: str) -> ServerLimits:
    """max_connections, superuser_reserved_connections and client backends of PostgreSQL itself."""
    block = load_database(database)
    with direct_session(block) as conn:
        return read_server_limits(conn, f"{block.host}:{block.port}")
