"""What PgBouncer says when it refuses a login, and the one sentence dbops says about a pooler in the way.

Plain text functions, below `flows.core.postgres` (which turns a failed login into a named error) and
`flows.core.pooler` (which probes for a pooler): both use them, neither imports the other for them.
"""

from __future__ import annotations

import re

from flows.core.errors import ConnectionPoolerInTheWay

#: what only PgBouncer says when it refuses a login (the FATAL line; PostgreSQL words these differently)
PGBOUNCER_LOGIN_ERRORS = re.compile(
    r"^(not allowed$|no such database: |no such user|SASL authentication failed$|"
    r"pgbouncer cannot connect to server|server login has been failing|bouncer config error|"
    r"client_login_timeout|query_wait_timeout)"
)


def is_pgbouncer_refusal(text: str) -> bool:
    match = re.search(r"FATAL:\s*(.+)", text)
    return bool(match and PGBOUNCER_LOGIN_ERRORS.match(match.group(1).strip()))


WHY = "dbops needs a real session for pg_dump's snapshot, the migration lock and lock_timeout"


def refusal(
    block: str | None,
    host: str,
    port: int,
    server_port: int | None = None,
    evidence: str | None = None,
    *,
    transaction_pooling: bool = False,
) -> ConnectionPoolerInTheWay:
    """The one sentence: which block, where the pooler is, where PostgreSQL listens, what to do."""
    who = f"database block {block}" if block else f"the database block for {host}:{port}"
    facts = [f for f in (evidence, f"the server listens on {server_port}" if server_port else None) if f]
    inside = f" ({'; '.join(facts)})" if facts else ""
    hint = "point the block at PostgreSQL itself"
    if transaction_pooling:
        hint += " (allow_pooler=true does not help: this pooler shares server sessions between clients)"
    return ConnectionPoolerInTheWay(
        f"{who} reaches PostgreSQL through a connection pooler at {host}:{port}{inside}; {WHY}: {hint}",
        block=block,
        host=host,
        port=port,
        server_port=server_port,
        evidence=evidence,
    )


def pooler_login_refusal(
    text: str, host: str, port: int, block: str | None = None
) -> ConnectionPoolerInTheWay | None:
    """A failed login whose text only PgBouncer writes ("no such database: postgres"): say so, instead of
    sending the person to check whether PostgreSQL is up."""
    if is_pgbouncer_refusal(text):
        return refusal(block, host, port, evidence=f"PgBouncer answered: {fatal_line(text)}")
    return None


def fatal_line(text: str) -> str:
    """The FATAL line's message (or the last line) of a failed login."""
    match = re.search(r"FATAL:\s*(.+)", text)
    return (match.group(1) if match else text.strip().splitlines()[-1] if text.strip() else text).strip()
