"""Is there a connection pooler between dbops and PostgreSQL? Every flow asks before it does anything.

Applications reach `imagemanager` through PgBouncer in transaction pooling (port 6432), and a person
configuring dbops copies that URL. Through it, pg_dump's exported snapshot, the migration's session
advisory lock and `lock_timeout` set for the session land on whichever server connection PgBouncer hands
out next: they "work" by luck, until they do not. So the preflight of every flow refuses such a block with
one sentence.

A plain TCP forward (Docker's `-p 15432:5432`, an SSH tunnel, HAProxy in TCP mode) also shows a server
port that differs from the block's, but gives a real dedicated session, and must not be refused. Hence
two steps:

1. cheap signals, one query on the connection the flow opened anyway: the server's `port` setting and
   `inet_server_port()` against the block's port, and the client endpoint the server sees
   (`inet_client_addr()`, `inet_client_port()`) against our socket's own local endpoint. No signal: it is
   PostgreSQL itself, done.
2. a signal: look for a pooler's fingerprint on the same host:port. A login to the database `pgbouncer`
   reaches PgBouncer's admin console whatever its [databases] say: it answers `SHOW VERSION` with
   "PgBouncer 1.18.0", or refuses with its own words ("not allowed", "SASL authentication failed", "no
   such user"); PostgreSQL itself says `database "pgbouncer" does not exist`. And two client connections
   that report the same `pg_backend_pid()` share one server session: any pooler in transaction or
   statement mode does that while idle. PostgreSQL's own answer and two distinct backends: a TCP
   forward, logged. A probe that fails in another way: we cannot tell, and refuse (fail closed).

`allow_pooler=true` (a session-pooling setup that really wants it) still requires what dbops relies on:
a session advisory lock taken on one connection stays on that connection's backend across transactions,
and a second connection gets a backend of its own. Transaction pooling fails that, so it is refused even
then.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass, replace

import psycopg

from flows.core.errors import ConnectionPoolerInTheWay, ConnectionRouteUnknown
from flows.core.pooler_refusal import fatal_line, is_pgbouncer_refusal, refusal
from flows.core.postgres import ConnParams, connect, scalar

#: PgBouncer's default listen_port: a URL with it is an application's URL until proven otherwise
PGBOUNCER_DEFAULT_PORT = 6432

#: PostgreSQL's own answers to a login to a database called `pgbouncer`
POSTGRES_ANSWERS = (
    'database "pgbouncer" does not exist',
    "no pg_hba.conf entry",
    'permission denied for database "pgbouncer"',
)


# -- step 1: cheap signals -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerView:
    """What the server says about this session: where it listens, who it thinks we are."""

    port_setting: int
    server_port: int | None  # inet_server_port(): NULL over a unix socket
    client_addr: str | None  # inet_client_addr(): NULL over a unix socket
    client_port: int | None
    backend_pid: int


def read_server_view(conn: psycopg.Connection) -> ServerView:
    row = conn.execute(
        "SELECT current_setting('port')::int, inet_server_port(), host(inet_client_addr()), "
        "inet_client_port(), pg_backend_pid()"
    ).fetchone()
    assert row is not None
    return ServerView(int(row[0]), row[1], row[2], row[3], int(row[4]))


def local_endpoint(conn: psycopg.Connection) -> tuple[str, int] | None:
    """Our side of the connection's socket (None over a unix socket): the server must see the same."""
    fd = os.dup(conn.pgconn.socket)
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        name = sock.getsockname()
        return _normal_ip(name[0]), int(name[1])
    finally:
        sock.close()


def _normal_ip(addr: str) -> str:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def route_signals(view: ServerView, local: tuple[str, int] | None, block_port: int) -> list[str]:
    """Why this session may not be a direct one (pure): an empty list means PostgreSQL itself."""
    signals = []
    if view.port_setting != block_port:
        signals.append(f"the server listens on {view.port_setting}, the block connects to {block_port}")
    elif view.server_port is not None and view.server_port != block_port:
        signals.append(f"the server accepted this session on {view.server_port}, not {block_port}")
    seen = (_normal_ip(view.client_addr), view.client_port) if view.client_addr else None
    if seen is None and local is not None:
        signals.append("we connect over TCP but the server sees a unix-socket client")
    elif seen is not None and local is None:
        signals.append(f"we connect over a unix socket but the server sees a TCP client {seen[0]}:{seen[1]}")
    elif seen is not None and local is not None and seen != local:
        signals.append(f"the server sees the client {seen[0]}:{seen[1]}, our socket is {local[0]}:{local[1]}")
    return signals


# -- step 2: fingerprints ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """What answered a login to the database `pgbouncer`: pgbouncer, postgresql or unknown."""

    kind: str
    detail: str


def probe_admin_console(params: ConnParams) -> Fingerprint:
    """Log in to the database `pgbouncer` with the block's credentials and read who answers."""
    probe = replace(params, database="pgbouncer", connect_timeout=min(params.connect_timeout, 10))
    try:
        conn = psycopg.connect(probe.conninfo(), password=probe.password or None, autocommit=True)
    except psycopg.OperationalError as exc:
        text = str(exc)
        if any(answer in text for answer in POSTGRES_ANSWERS):
            return Fingerprint("postgresql", fatal_line(text))
        if is_pgbouncer_refusal(text):
            return Fingerprint("pgbouncer", f"PgBouncer answered: {fatal_line(text)}")
        return Fingerprint("unknown", fatal_line(text))
    try:
        with conn:
            version = str(scalar(conn, "SHOW VERSION"))
    except psycopg.Error as exc:  # PostgreSQL with a real database called pgbouncer: no such setting
        if "unrecognized configuration parameter" in str(exc):
            return Fingerprint("postgresql", "a database named pgbouncer on PostgreSQL")
        return Fingerprint("unknown", str(exc).strip().splitlines()[0])
    if "pgbouncer" in version.lower():
        return Fingerprint("pgbouncer", version)
    return Fingerprint("unknown", f"SHOW VERSION said {version!r}")


def backends_shared(params: ConnParams) -> tuple[int, int]:
    """pg_backend_pid() of two client connections opened one after the other (the first stays open,
    idle): equal pids mean a pooler hands one server session to several clients."""
    with connect(params) as first:
        a = int(scalar(first, "SELECT pg_backend_pid()"))
        with connect(params) as second:
            b = int(scalar(second, "SELECT pg_backend_pid()"))
    return a, b


def dedicated_session_problem(params: ConnParams) -> str | None:
    """What breaks dbops through a pooler, tried for real: a session advisory lock taken on a connection
    must stay on that connection's backend across transactions, and a second connection must get a
    backend of its own. None when both hold (session pooling); else what went wrong."""
    key = int.from_bytes(secrets.token_bytes(8), "big", signed=True)
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    classid, objid = unsigned >> 32, unsigned & 0xFFFFFFFF
    with connect(params) as conn:
        got = conn.execute("SELECT pg_try_advisory_lock(%s), pg_backend_pid()", (key,)).fetchone()
        assert got is not None
        locked, pid = bool(got[0]), int(got[1])
        try:
            if not locked:
                return "a session advisory lock could not be taken"
            for _ in range(3):
                row = conn.execute(
                    "SELECT pg_backend_pid(), EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
                    "AND granted AND pid = pg_backend_pid() AND classid = %s::bigint::oid "
                    "AND objid = %s::bigint::oid AND objsubid = 1)",
                    (classid, objid),
                ).fetchone()
                assert row is not None
                if int(row[0]) != pid or not row[1]:
                    return (
                        f"the session lock taken on backend {pid} was not there in the next transaction "
                        f"(backend {row[0]})"
                    )
            with connect(params) as other:
                other_pid = int(scalar(other, "SELECT pg_backend_pid()"))
            if other_pid == pid:
                return f"a second connection was handed the same backend {pid}"
            return None
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


# -- the check ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionRoute:
    """How a block reaches PostgreSQL: `direct`, `tcp forward` or `session pooler (allowed)`."""

    kind: str
    block_port: int
    server_port: int
    detail: str


def check_direct_session(
    conn: psycopg.Connection,
    params: ConnParams,
    *,
    allow_pooler: bool = False,
    block: str | None = None,
) -> SessionRoute:
    """Refuse (ConnectionPoolerInTheWay) when `conn` goes through a connection pooler; fail closed
    (ConnectionRouteUnknown) when a signal says "not direct" and the probe cannot say what it is."""
    view = read_server_view(conn)
    signals = route_signals(view, local_endpoint(conn), params.port)
    if not signals:
        return SessionRoute("direct", params.port, view.port_setting, "PostgreSQL itself")
    why = "; ".join(signals)
    console = probe_admin_console(params)
    if console.kind == "pgbouncer":
        return _pooler_found(params, block, view.port_setting, console.detail, allow_pooler)
    a, b = backends_shared(params)
    if a == b:
        found = f"two connections shared backend {a}"
        raise refusal(block, params.host, params.port, view.port_setting, found, transaction_pooling=True)
    if console.kind == "postgresql":
        return SessionRoute(
            "tcp forward",
            params.port,
            view.port_setting,
            f"a TCP forward to PostgreSQL ({why}; PostgreSQL itself answered the pooler probe)",
        )
    if allow_pooler:
        return _allowed(params, block, view.port_setting, f"unidentified: {console.detail}")
    raise ConnectionRouteUnknown(
        f"cannot tell whether database block {block or params.where} reaches PostgreSQL directly: {why}, "
        f"and a login to the database pgbouncer there answered {console.detail!r}; check what listens on "
        f"{params.host}:{params.port} and point the block at PostgreSQL itself (set allow_pooler=true only "
        "for a pooler in session mode)"
    )


def _pooler_found(
    params: ConnParams, block: str | None, server_port: int, evidence: str, allow_pooler: bool
) -> SessionRoute:
    if not allow_pooler:
        raise refusal(block, params.host, params.port, server_port, evidence)
    return _allowed(params, block, server_port, evidence)


def _allowed(params: ConnParams, block: str | None, server_port: int, evidence: str) -> SessionRoute:
    problem = dedicated_session_problem(params)
    if problem is not None:
        raise refusal(
            block, params.host, params.port, server_port, f"{evidence}; {problem}", transaction_pooling=True
        )
    return SessionRoute(
        "session pooler (allowed)",
        params.port,
        server_port,
        f"{evidence}; allow_pooler=true and every connection keeps its own server session",
    )


def connect_direct(
    params: ConnParams,
    *,
    allow_pooler: bool = False,
    block: str | None = None,
    autocommit: bool = True,
) -> tuple[psycopg.Connection, SessionRoute]:
    """Connect and check the route in one go: the preflight of every flow. A login that PgBouncer
    refused is named as such, with the block."""
    try:
        conn = connect(params, autocommit=autocommit)
    except ConnectionPoolerInTheWay as exc:
        raise refusal(block, params.host, params.port, evidence=exc.evidence) from None
    try:
        route = check_direct_session(conn, params, allow_pooler=allow_pooler, block=block)
        if not autocommit and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
        return conn, route
    except BaseException:
        conn.close()
        raise


__all__ = [
    "PGBOUNCER_DEFAULT_PORT",
    "Fingerprint",
    "ServerView",
    "SessionRoute",
    "backends_shared",
    "check_direct_session",
    "connect_direct",
    "dedicated_session_problem",
    "local_endpoint",
    "probe_admin_console",
    "read_server_view",
    "route_signals",
]
