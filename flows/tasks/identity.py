"""Tasks that find out which database a block really reaches, and which databases are protected.

The decisions live in flows.core.identity; these tasks load blocks (and list them through the Prefect
API) and connect, with the retry policy for a server that does not answer right now.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.client.orchestration import get_client

from blocks.postgres import load_database
from flows.core.errors import DbopsError
from flows.core.identity import DatabaseIdentity, Guard, Protected, resolve
from flows.tasks.common import dbops_task

BLOCK_TYPE = "postgres-database"


@dbops_task("identify_target")
def identify_target(block_name: str, maintenance_database: str = "postgres") -> DatabaseIdentity:
    """Connect with the block and read the server's system identifier and the database's oid."""
    identity = resolve(load_database(block_name).params(), maintenance_database)
    get_run_logger().info("%s reaches %s", block_name, identity)
    return identity


def protected_block_names() -> list[str]:
    """Every saved postgres-database block with protected=true (read without secrets)."""
    names: list[str] = []
    offset, page = 0, 200
    with get_client(sync_client=True) as client:
        while True:
            docs = client.read_block_documents_by_type(
                BLOCK_TYPE, offset=offset, limit=page, include_secrets=False
            )
            names += [d.name for d in docs if d.name and (d.data or {}).get("protected")]
            if len(docs) < page:
                return sorted(names)
            offset += page


@dbops_task("find_protected_databases")
def protected_databases(maintenance_database: str = "postgres") -> tuple[Protected, ...]:
    """The identities of the databases protected blocks name, once per run.

    A protected block that cannot be reached is kept with its database name only: a step whose victim
    has that name is refused (nothing proves they differ); any other goes ahead with a log line.
    A failure to list the blocks fails the task: without the list nothing may be dropped.
    """
    logger = get_run_logger()
    found: list[Protected] = []
    for name in protected_block_names():
        block = load_database(name)
        try:
            found.append(Protected(name, block.database, resolve(block.params(), maintenance_database)))
        except DbopsError as exc:
            found.append(Protected(name, block.database, identity=None, unreachable=str(exc)))
    for p in found:
        seen = p.identity or f"{p.database!r}, not reachable ({p.unreachable})"
        logger.info("protected block %s: %s", p.block, seen)
    return tuple(found)


def check_guard(guard: Guard) -> None:
    """The plan-time check: refuse a protected victim now, before any backup or restore work starts."""
    guard.require_unprotected(guard.planned)
    for note in guard.notes():
        get_run_logger().warning(note)
