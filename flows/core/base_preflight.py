"""Before a base backup: may this role replicate (REPLICATION, a pg_hba.conf replication line), does the
cluster allow it (max_wal_senders, no extra tablespaces, not a standby, archiving for -X none). Each
refusal says exactly which one is missing and how to add it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg

from flows.core.base_backup_errors import NoWalSender, ReplicationNotAllowed
from flows.core.errors import (
    ConfigurationError,
    DbopsError,
)
from flows.core.postgres import ConnParams, classify_connect_error

TAR_BLOCK = 512
#: backup_label is a few hundred bytes; backup_manifest ~150 bytes per file of the cluster
MAX_CAPTURE = 256 * 1024 * 1024
WAITING_NOTICE = "waiting for required WAL segments to be archived"


# -- preflight ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterFacts:
    system_identifier: str
    server_version: str
    server_version_num: int
    wal_segment_size: int
    archive_mode: str
    in_recovery: bool
    cluster_bytes: int | None


def read_cluster(conn: psycopg.Connection) -> ClusterFacts:
    row = conn.execute(
        "SELECT (SELECT system_identifier FROM pg_control_system())::text,"
        " current_setting('server_version'), current_setting('server_version_num')::int,"
        " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),"
        " current_setting('archive_mode'), pg_is_in_recovery()"
    ).fetchone()
    assert row is not None
    size: int | None
    try:
        with conn.transaction():
            got = conn.execute("SELECT sum(pg_database_size(oid))::bigint FROM pg_database").fetchone()
            size = int(got[0]) if got and got[0] is not None else None
    except psycopg.Error:
        size = None  # only the ETA needs it: a role without CONNECT on some database still backs up
    return ClusterFacts(str(row[0]), str(row[1]), int(row[2]), int(row[3]), str(row[4]), bool(row[5]), size)


def check_replication_role(conn: psycopg.Connection, user: str) -> None:
    row = conn.execute(
        "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not row or not row[0]:
        raise ReplicationNotAllowed(
            f"role {user} lacks REPLICATION, which pg_basebackup needs: ALTER ROLE {user} REPLICATION "
            "(or use a role that has it)"
        )


def check_cluster_settings(conn: psycopg.Connection, cluster: ClusterFacts, include_wal: bool) -> None:
    """What makes a base backup impossible or useless, each refused with what to change."""
    senders = int(conn.execute("SELECT current_setting('max_wal_senders')::int").fetchone()[0])  # type: ignore[index]
    if senders <= 0:
        raise ConfigurationError(
            "max_wal_senders is 0 on the server, so pg_basebackup cannot connect; set max_wal_senders = 10 "
            "(and wal_level = replica) and restart PostgreSQL"
        )
    spaces = [
        r[0]
        for r in conn.execute(
            "SELECT spcname FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1"
        ).fetchall()
    ]
    if spaces:
        raise ConfigurationError(
            f"the cluster has {len(spaces)} extra tablespace(s) ({', '.join(spaces[:5])}), which a tar "
            "streamed to stdout cannot carry; dbops base backups do not support tablespaces yet, so this "
            "cluster is not backed up this way (nightly dumps still cover it)"
        )
    if cluster.in_recovery:
        raise ConfigurationError(
            "the server is a standby; run the base backup against the primary, where WAL can be switched "
            "and its archiving confirmed"
        )
    if not include_wal and cluster.archive_mode not in ("on", "always"):
        raise ConfigurationError(
            f"archive_mode is {cluster.archive_mode} on the server, so a base backup without its WAL could "
            "never be made consistent; set include_wal=true, or turn archiving on (archive_mode = on, "
            "archive_command) and restart PostgreSQL"
        )


def check_replication_connection(params: ConnParams) -> None:
    """Open the kind of connection pg_basebackup opens: pg_hba.conf needs a `replication` line for it."""
    try:
        psycopg.connect(
            params.conninfo(), password=params.password or None, replication="true", autocommit=True
        ).close()
    except psycopg.OperationalError as exc:
        raise classify_replication_error(str(exc), params) from None


def classify_replication_error(text: str, params: ConnParams) -> DbopsError:
    lowered = text.lower()
    if "no pg_hba.conf entry for replication connection" in lowered:
        host = re.search(r'from host "([^"]+)"', text)
        client = host.group(1) if host else "this worker's address"
        mask = "/128" if ":" in client else "/32"
        return ReplicationNotAllowed(
            f"pg_hba.conf on {params.host}:{params.port} has no replication line for user {params.user} from "
            f"{client}: add `host replication {params.user} {client}{mask} scram-sha-256`, then reload"
        )
    if (
        "must be superuser or replication role" in lowered
        or "permission denied to start wal sender" in lowered
    ):
        return ReplicationNotAllowed(
            f"role {params.user} lacks REPLICATION, which pg_basebackup needs: ALTER ROLE {params.user} "
            "REPLICATION (or use a role that has it)"
        )
    if "number of requested standby connections exceeds" in lowered or "too many" in lowered:
        return NoWalSender(
            f"PostgreSQL at {params.host}:{params.port} has no free WAL sender (max_wal_senders all in use); "
            "it will be retried"
        )
    return classify_connect_error(psycopg.OperationalError(text), params)
