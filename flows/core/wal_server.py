"""The PostgreSQL side of WAL archiving: what the server says, read into plain typed data.

Readers (`read_*`, `snapshot`) take a psycopg connection and return plain data; the judges that turn it
into `Check`s are in `flows.core.wal_server_checks`. Everything a role with only `pg_monitor` may read is
enough; what needs more (the active probe) says which grant is missing instead of crashing.
"""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
from pydantic import BaseModel

from flows.core.errors import WalArchiveError
from flows.core.postgres import one_row, scalar
from flows.core.redact import redact_secrets
from flows.core.wal import (
    BadWalName,
    WalPosition,
    parse_lsn,
    parse_wal_name,
    segment_name,
    segno_of_lsn,
)


class WalArchiveBroken(WalArchiveError):
    """WAL archiving is broken: point-in-time recovery past the last good segment is impossible."""


# -- what the server says -----------------------------------------------------------------------------------


class ArchiveSettings(BaseModel):
    wal_level: str
    archive_mode: str
    archive_mode_pending: str | None = None  # set but waiting for a restart
    archive_command: str
    archive_library: str = ""
    archive_timeout: int = 0
    segment_size: int
    in_recovery: bool
    server: str = ""


class ArchiverStats(BaseModel):
    archived_count: int
    last_archived_wal: str | None
    last_archived_time: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None
    stats_reset: datetime | None


class WalPositionNow(BaseModel):
    lsn: int
    tli: int
    walfile: str  # the file being written now


class Backlog(BaseModel):
    ready: int | None = None
    oldest_ready: str | None = None
    denied: str | None = None  # why it could not be read


class Standby(BaseModel):
    name: str
    client: str
    state: str
    sync_state: str
    replay_lag_bytes: int | None
    replay_lag_seconds: float | None


class ServerSnapshot(BaseModel):
    settings: ArchiveSettings
    archiver: ArchiverStats
    position: WalPositionNow | None
    backlog: Backlog
    standbys: list[Standby] | None  # None: not visible to this role
    user: str
    taken_at: datetime


def _settings(conn: psycopg.Connection, names: list[str]) -> dict[str, tuple[str, bool]]:
    rows = conn.execute(
        "SELECT name, setting, pending_restart FROM pg_settings WHERE name = ANY(%s)", (names,)
    ).fetchall()
    return {r[0]: (r[1], bool(r[2])) for r in rows}


def read_settings(conn: psycopg.Connection) -> ArchiveSettings:
    s = _settings(
        conn,
        [
            "wal_level",
            "archive_mode",
            "archive_command",
            "archive_library",
            "archive_timeout",
            "wal_segment_size",
        ],
    )
    mode, pending = s["archive_mode"]
    pending_mode = None
    if pending:  # pg_settings shows the running value; pg_file_settings what a restart would apply
        row = (
            conn.execute(
                "SELECT setting FROM pg_file_settings WHERE name = 'archive_mode' AND applied IS NOT TRUE "
                "ORDER BY seqno DESC LIMIT 1"
            ).fetchone()
            if _can_read_file_settings(conn)
            else None
        )
        pending_mode = row[0] if row else "(changed)"
    in_recovery = bool(scalar(conn, "SELECT pg_is_in_recovery()"))
    info = conn.info
    return ArchiveSettings(
        wal_level=s["wal_level"][0],
        archive_mode=mode,
        archive_mode_pending=pending_mode,
        # redacted here, so no report, artifact or log line can show a credential written into it
        archive_command=redact_secrets(s["archive_command"][0]),
        archive_library=s.get("archive_library", ("", False))[0],
        archive_timeout=int(s["archive_timeout"][0]),
        segment_size=int(s["wal_segment_size"][0]),
        in_recovery=in_recovery,
        server=f"{info.host}:{info.port}",
    )


def _can_read_file_settings(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT has_function_privilege('pg_show_all_file_settings()', 'EXECUTE')").fetchone()
    return bool(row and row[0])


def read_archiver(conn: psycopg.Connection) -> ArchiverStats:
    row = conn.execute(
        "SELECT archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal, "
        "last_failed_time, stats_reset FROM pg_stat_archiver"
    ).fetchone()
    assert row is not None
    return ArchiverStats(
        archived_count=row[0],
        last_archived_wal=row[1],
        last_archived_time=row[2],
        failed_count=row[3],
        last_failed_wal=row[4],
        last_failed_time=row[5],
        stats_reset=row[6],
    )


def read_position(conn: psycopg.Connection, settings: ArchiveSettings) -> WalPositionNow | None:
    """The WAL file being written now (on a primary); None on a standby."""
    if settings.in_recovery:
        return None
    lsn_text, walfile = one_row(
        conn, "SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn())"
    )
    lsn = parse_lsn(lsn_text)
    tli = int(walfile[:8], 16)
    # pg_walfile_name puts a boundary LSN in the previous file; the file being written is the LSN's own
    return WalPositionNow(
        lsn=lsn,
        tli=tli,
        walfile=segment_name(tli, segno_of_lsn(lsn, settings.segment_size), settings.segment_size),
    )


def read_backlog(conn: psycopg.Connection, user: str) -> Backlog:
    """`.ready` files in pg_wal/archive_status; pg_monitor (or superuser) may list them."""
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT count(*), min(name) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'"
            ).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return Backlog(
            denied=f"role {user!r} may not list pg_wal/archive_status; GRANT pg_monitor TO {user} "
            "so the .ready backlog can be checked"
        )
    assert row is not None
    oldest = row[1][: -len(".ready")] if row[1] else None
    return Backlog(ready=int(row[0]), oldest_ready=oldest)


def read_standbys(conn: psycopg.Connection) -> list[Standby] | None:
    rows = conn.execute(
        "SELECT application_name, coalesce(client_addr::text, 'local'), state, sync_state, "
        "CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) "
        "END::bigint, extract(epoch FROM replay_lag)::float8 FROM pg_stat_replication"
    ).fetchall()
    if any(r[2] is None for r in rows):  # the columns are NULL for roles without pg_read_all_stats
        return None
    return [
        Standby(
            name=r[0],
            client=r[1],
            state=r[2],
            sync_state=r[3],
            replay_lag_bytes=r[4],
            replay_lag_seconds=r[5],
        )
        for r in rows
    ]


def snapshot(conn: psycopg.Connection) -> ServerSnapshot:
    """Everything the checks need from the server, read in one go."""
    user = str(scalar(conn, "SELECT current_user"))
    settings = read_settings(conn)
    return ServerSnapshot(
        settings=settings,
        archiver=read_archiver(conn),
        position=read_position(conn, settings),
        backlog=read_backlog(conn, user),
        standbys=read_standbys(conn),
        user=user,
        taken_at=datetime.now(UTC),
    )


def wal_position(name: str | None, segment_size: int) -> WalPosition | None:
    if not name:
        return None
    try:
        return parse_wal_name(name, segment_size)
    except BadWalName:
        return None


# -- the active probe --------------------------------------------------------------------------------------


class ProbeStart(BaseModel):
    restore_point: str
    lsn: int
    walfile: str


def switch_wal(conn: psycopg.Connection, label: str, user: str) -> ProbeStart:
    """pg_create_restore_point + pg_switch_wal (like `pgbackrest check`): the segment to wait for."""
    try:
        with conn.transaction():
            conn.execute("SELECT pg_create_restore_point(%s)", (label,))
            lsn_text, walfile = one_row(conn, "SELECT s::text, pg_walfile_name(s) FROM pg_switch_wal() AS s")
    except psycopg.errors.InsufficientPrivilege:
        raise WalArchiveBroken(
            f"role {user!r} may not switch WAL for the active probe; GRANT EXECUTE ON FUNCTION "
            f"pg_switch_wal(), pg_create_restore_point(text) TO {user}, or run with active=false"
        ) from None
    return ProbeStart(restore_point=label, lsn=parse_lsn(lsn_text), walfile=walfile)


class CheckState(BaseModel):
    """What one run leaves for the next (a Prefect Variable): the incremental and the stall checks."""

    segment_size: int | None = None
    tli: int | None = None
    verified_through: int | None = None  # every segment up to this number is in the archive
    verified_from: int | None = None  # where the last full pass began: the window never reaches before it
    full_verified_at: datetime | None = None  # when the whole window was last listed (full_verify=auto)
    oldest_pending: str | None = None
    oldest_pending_seen_at: datetime | None = None
    failed_count: int | None = None
    failed_count_at_success: int | None = None
    checked_at: datetime | None = None
