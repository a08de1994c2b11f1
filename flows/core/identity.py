"""Which database a connection really reaches: the server's system identifier plus the database.

A block's host, port and database name are spellings: `localhost` and `127.0.0.1`, a DNS alias, an IP
address or another case reach one server, so comparing them cannot tell whether two blocks name one
database. PostgreSQL can: `system_identifier` (pg_control, chosen at initdb, the same on every physical
copy of the cluster) names the server, and the database's name (and, for one incarnation of it, its
oid) names the database on it. Every destructive step (a DROP DATABASE, a rename onto a name, a
pg_restore --clean) records the identity when it plans and checks it again, on the connection that
acts, right before it acts; a database named by a protected block is never its victim without confirm.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace

import psycopg

from flows.core.errors import (
    DatabaseMissing,
    IdentityUnknown,
    ProtectedTarget,
    SameDatabase,
    TargetIdentityMismatch,
)
from flows.core.postgres import ConnParams, connect, scalar


@dataclass(frozen=True)
class DatabaseIdentity:
    """One database on one server, however it was spelt: (system_identifier, database name, oid).

    `oid` is None when no database of that name exists (yet): a create-mode target, staging before its
    first refresh, a drill's scratch database before the restore.
    """

    system_identifier: int
    database: str
    oid: int | None = None

    def same_database(self, other: DatabaseIdentity) -> bool:
        """Same server and same name: one database, whichever incarnation (oid) of it."""
        return self.system_identifier == other.system_identifier and self.database == other.database

    def __str__(self) -> str:
        state = f"oid {self.oid}" if self.oid is not None else "absent"
        return f"database {self.database!r} on server {self.system_identifier} ({state})"


def system_identifier(conn: psycopg.Connection) -> int:
    """The cluster's system identifier; a server that will not say fails closed (IdentityUnknown)."""
    try:
        row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IdentityUnknown(
            f"PostgreSQL at {conn.info.host}:{conn.info.port} would not report its system identifier "
            f"(pg_control_system(): {first}); dbops needs it to be sure which database it locks or drops, "
            "so nothing was done: GRANT EXECUTE ON FUNCTION pg_control_system() to the block's role"
        ) from None
    if not row or row[0] is None:
        raise IdentityUnknown(
            f"PostgreSQL at {conn.info.host}:{conn.info.port} returned no system identifier, so nothing was "
            "done; check that the server is a PostgreSQL 9.6+ cluster and not a pooler"
        )
    return int(row[0])


def identify_database(conn: psycopg.Connection, name: str) -> DatabaseIdentity:
    """The identity of database `name` on the server `conn` reaches (oid None when it does not exist)."""
    sysid = system_identifier(conn)
    row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return DatabaseIdentity(sysid, name, int(row[0]) if row else None)


def identify(conn: psycopg.Connection) -> DatabaseIdentity:
    """The identity of the database `conn` is connected to."""
    try:
        name = str(scalar(conn, "SELECT current_database()"))
    except psycopg.Error as exc:  # e.g. PgBouncer's console, which speaks only SHOW
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IdentityUnknown(
            f"the server at {conn.info.host}:{conn.info.port} would not say which database this is "
            f"({first}); dbops needs PostgreSQL itself here, so nothing was done"
        ) from None
    return identify_database(conn, name)


def resolve(params: ConnParams, maintenance_database: str = "postgres") -> DatabaseIdentity:
    """The identity of the database a block names; read through the maintenance database when that
    database does not exist (a create-mode target, staging before its first refresh)."""
    try:
        with connect(params) as conn:
            return identify(conn)
    except DatabaseMissing:
        with connect(params.with_database(maintenance_database)) as conn:
            return identify_database(conn, params.database)


#: characters a Prefect concurrency limit name may hold and that survive a URL path unchanged
_SAFE = re.compile(r"[A-Za-z0-9_.-]+")


def limit_name(identity: DatabaseIdentity) -> str:
    """`db:<system_identifier>:<database>`: one name per database, whatever block or spelling reached it.

    Prefect refuses `/ % & > <` in names, and the name travels in URL paths; a database name with other
    characters is kept readable and made unique again by a short hash of the real name.
    """
    name = identity.database
    if not _SAFE.fullmatch(name):
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name) + "~" + digest
    return f"db:{identity.system_identifier}:{name}"


def require_distinct(
    production_block: str, production: DatabaseIdentity, staging_block: str, staging: DatabaseIdentity
) -> None:
    """Staging is dropped and recreated: it must never be the production database, however spelt."""
    if production.same_database(staging):
        raise SameDatabase(
            f"blocks {production_block!r} and {staging_block!r} reach the same database "
            f"{production.database!r} on server {production.system_identifier}, whatever host names or "
            "addresses they use; staging is dropped and restored from the backup, so point "
            f"{staging_block!r} at a database of its own (on a server cloned from production's files, "
            "which keeps its system identifier, that means another database name)"
        )


@dataclass(frozen=True)
class Protected:
    """A database named by a protected block; `identity` None when the block could not be reached."""

    block: str
    database: str
    identity: DatabaseIdentity | None = None
    unreachable: str = ""  # why it could not be identified

    def may_be(self, victim: DatabaseIdentity) -> bool:
        """Whether `victim` is (or, unreachable, cannot be proven not to be) this protected database."""
        if self.identity is not None:
            return self.identity.same_database(victim)
        return self.database == victim.database


@dataclass(frozen=True)
class Guard:
    """What must hold, on the connection that acts, before `planned.database` is dropped or replaced.

    `confirm` is the restore's confirm parameter: equal to the database name, it lets a protected target
    through (as a protected target block always needed); None for actions that never touch a protected
    database (staging refresh, the drill's scratch database).
    """

    block: str  # the block the victim was named through, for the messages
    planned: DatabaseIdentity
    action: str  # "refresh staging", "restore into", "drop the drill's scratch database"
    protected: tuple[Protected, ...] = ()
    confirm: str | None = None

    def with_planned(self, planned: DatabaseIdentity) -> Guard:
        return replace(self, planned=planned)

    def check(self, conn: psycopg.Connection) -> DatabaseIdentity:
        """Re-identify the victim on `conn` (the connection about to act) and refuse what was not planned."""
        current = identify_database(conn, self.planned.database)
        self.require_same(current)
        self.require_unprotected(current)
        return current

    def require_same(self, current: DatabaseIdentity) -> None:
        """Same server; an existing victim must be the incarnation (oid) the plan saw. A victim that is
        gone (dropped by an earlier attempt of the same step) leaves nothing to mistake."""
        planned = self.planned
        if current.system_identifier != planned.system_identifier or (
            current.oid is not None and current.oid != planned.oid
        ):
            raise TargetIdentityMismatch(
                f"refused to {self.action} {planned.database!r} through block {self.block!r}: the plan "
                f"recorded {planned}, but the connection about to act reaches {current}; a host name, alias "
                "or address now leads elsewhere, or the database was recreated since the plan, so nothing "
                "was dropped: check the block and start the run again"
            )

    def require_unprotected(self, victim: DatabaseIdentity) -> None:
        confirmed = self.confirm is not None and self.confirm == victim.database
        for p in self.protected:
            if confirmed or not p.may_be(victim):
                continue
            how = (
                f"run with confirm={victim.database!r} to {self.action} it anyway"
                if self.confirm is not None
                else f"a run that must {self.action} never touches a protected database: point block "
                f"{self.block!r} at a database of its own"
            )
            if p.identity is None:
                raise ProtectedTarget(
                    f"refused to {self.action} {victim.database!r} through block {self.block!r}: protected "
                    f"block {p.block!r} names a database of that name and could not be reached to prove it "
                    f"is another one ({p.unreachable}); make {p.block!r} reachable, or {how}"
                )
            raise ProtectedTarget(
                f"refused to {self.action} {victim}: it is the database of protected block {p.block!r}, "
                f"reached here through block {self.block!r}; {how}"
            )

    def notes(self) -> list[str]:
        """Protected blocks that could not be reached but name another database: the step goes ahead."""
        return [
            f"protected block {p.block!r} could not be reached ({p.unreachable}); it names database "
            f"{p.database!r}, not {self.planned.database!r}, so the {self.action} step goes ahead"
            for p in self.protected
            if p.identity is None and p.database != self.planned.database
        ]
