"""The PostgreSQL side of WAL archiving: read what the server says, judge it, one typed result per check.

Readers (`read_*`) take a psycopg connection and return plain data; judges (`check_*`) are pure and
return a `Check`: ok / warning / critical (or skipped), the figure it is about, and for anything not ok
one sentence saying what is wrong and how to fix it. Everything a role with only `pg_monitor` may read
is enough; what needs more (the active probe) says which grant is missing instead of crashing.
"""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
from pydantic import BaseModel, Field

from flows.core.errors import DbopsError
from flows.core.health import Check, Status
from flows.core.postgres import one_row, scalar
from flows.core.redact import redact_secrets
from flows.core.wal import (
    BadWalName,
    WalPosition,
    format_lsn,
    ordered_after,
    parse_lsn,
    parse_wal_name,
    segment_name,
    segno_of_lsn,
)

#: archive_command values that archive nothing while PostgreSQL believes they succeeded
NOOP_COMMANDS = {"", "(disabled)", "true", "/bin/true", "/usr/bin/true", ":", "exit 0", "/bin/true %p"}


class WalArchiveBroken(DbopsError):
    """WAL archiving is broken: point-in-time recovery past the last good segment is impossible."""


class Thresholds(BaseModel):
    """When a figure turns into a warning or a failed run."""

    max_archive_age_seconds: int = Field(
        default=900,
        ge=1,
        description="Critical when the last archived segment is older than this while newer WAL is "
        "complete and waiting (an idle database with nothing to archive is fine).",
    )
    max_pending_segments: int = Field(
        default=16,
        ge=0,
        description="Critical when more complete segments than this wait between the current WAL file "
        "and the last archived one.",
    )
    warn_pending_segments: int = Field(
        default=4, ge=0, description="Warning when more complete segments than this wait to be archived."
    )
    max_ready_files: int = Field(
        default=32,
        ge=0,
        description="Critical when pg_wal/archive_status holds more .ready files than this.",
    )
    max_failures_since_success: int = Field(
        default=0,
        ge=0,
        description="archive_command failures tolerated after the last success before the run fails "
        "(0: a failure newer than the last success fails the run).",
    )
    warn_failures_per_hour: float = Field(
        default=1.0,
        ge=0,
        description="Warning when archive_command failed more often than this per hour, even if it "
        "recovered.",
    )
    stall_after_seconds: int = Field(
        default=300,
        ge=0,
        description="Critical when the oldest segment waiting to be archived is the same one as in a run "
        "at least this many seconds ago, even though the archiver reports no failure.",
    )
    warn_standby_lag_bytes: int | None = Field(
        default=None, ge=0, description="Warning when a standby replays more than this many bytes behind."
    )
    max_standby_lag_bytes: int | None = Field(
        default=None, ge=0, description="Critical when a standby replays more than this many bytes behind."
    )


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


# -- judging -----------------------------------------------------------------------------------------------


def check_settings(s: ArchiveSettings) -> list[Check]:
    checks: list[Check] = []
    if s.wal_level == "minimal":
        checks.append(
            Check(
                name="wal_level",
                status="critical",
                figure="minimal",
                message=f"wal_level is minimal on {s.server}, which cannot be archived; "
                "set wal_level = replica and restart PostgreSQL",
            )
        )
    else:
        checks.append(Check(name="wal_level", status="ok", figure=s.wal_level))
    if s.archive_mode not in ("on", "always"):
        pending = ""
        if s.archive_mode_pending == "(changed)":  # pg_file_settings is for superusers only
            pending = " (a new value is set but the server was not restarted)"
        elif s.archive_mode_pending:
            pending = f" (it is set to {s.archive_mode_pending} but the server was not restarted)"
        checks.append(
            Check(
                name="archive_mode",
                status="critical",
                figure=s.archive_mode,
                message=f"archive_mode is {s.archive_mode} on {s.server}{pending}, so no WAL is archived; "
                "set archive_mode = on (ALTER SYSTEM SET archive_mode = on) and restart PostgreSQL: it only "
                "takes effect after a restart",
            )
        )
    else:
        checks.append(Check(name="archive_mode", status="ok", figure=s.archive_mode))
    command = s.archive_command.strip()
    if s.archive_library:
        checks.append(
            Check(name="archive_command", status="ok", figure=f"archive_library={s.archive_library}")
        )
    elif s.archive_mode in ("on", "always") and command.lower() in NOOP_COMMANDS:
        checks.append(
            Check(
                name="archive_command",
                status="critical",
                figure=command or "(empty)",
                message=f"archive_command on {s.server} is {command or 'empty'!r}, which stores nothing (WAL "
                "piles up in pg_wal or is thrown away); set it to copy %p to the archive, e.g. "
                "'cp %p /var/lib/postgresql/wal_archive/%f', and reload",
            )
        )
    else:
        checks.append(Check(name="archive_command", status="ok", figure=command))
    checks.append(
        Check(
            name="archive_timeout",
            status="ok",
            figure=f"{s.archive_timeout} s"
            if s.archive_timeout
            else "0 (a segment is archived only when full)",
        )
    )
    return checks


def wal_position(name: str | None, segment_size: int) -> WalPosition | None:
    if not name:
        return None
    try:
        return parse_wal_name(name, segment_size)
    except BadWalName:
        return None


def _when(t: datetime | None) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S} UTC" if t else "never"


def archiver_failing(a: ArchiverStats, segment_size: int) -> bool:
    """The last failure is newer than the last success. Times decide; when the failed WAL file is not after
    the archived one (by timeline and segment, a .history file first on its timeline) the failure was of a
    file that has since been archived, e.g. a retried segment or a history file re-sent after a switch."""
    if a.last_failed_time is None:
        return False
    if a.last_archived_time is None:
        return True
    if a.last_failed_time <= a.last_archived_time:
        return False
    failed = wal_position(a.last_failed_wal, segment_size)
    archived = wal_position(a.last_archived_wal, segment_size)
    if failed is None or archived is None or "history" in (failed.kind, archived.kind):
        return True
    return not ordered_after(archived, failed)


def check_archiver(
    a: ArchiverStats,
    s: ArchiveSettings,
    t: Thresholds,
    failed_count_at_success: int | None,
    previous_failed_count: int | None,
    hours_since_previous: float | None,
) -> list[Check]:
    checks = []
    if archiver_failing(a, s.segment_size):
        since = (
            a.failed_count - failed_count_at_success
            if failed_count_at_success is not None
            else a.failed_count
        )
        since = max(since, 1)
        status: Status = "critical" if since > t.max_failures_since_success else "warning"
        checks.append(
            Check(
                name="archiver",
                status=status,
                figure=f"failed_count={a.failed_count}, last_failed_wal={a.last_failed_wal}",
                message=f"archive_command is failing on {s.server}: failed_count={a.failed_count}, "
                f"last_failed_wal={a.last_failed_wal} at {_when(a.last_failed_time)}, last success "
                f"{a.last_archived_wal or 'none'} at {_when(a.last_archived_time)}; "
                "run the archive_command by hand as the postgres OS user for that file and read the server "
                "log to see why",
            )
        )
    else:
        checks.append(
            Check(
                name="archiver",
                status="ok",
                figure=f"archived_count={a.archived_count}, last_archived_wal={a.last_archived_wal}, "
                f"failed_count={a.failed_count}",
            )
        )
    if previous_failed_count is not None and hours_since_previous and hours_since_previous > 0:
        delta = max(a.failed_count - previous_failed_count, 0)
        per_hour, basis = delta / hours_since_previous, "since the previous check"
    elif a.stats_reset is not None:
        hours = max((datetime.now(UTC) - a.stats_reset).total_seconds() / 3600, 1 / 60)
        per_hour, basis = a.failed_count / hours, "since the statistics were reset"
    else:
        per_hour, basis = 0.0, ""
    status = "warning" if per_hour > t.warn_failures_per_hour else "ok"
    checks.append(
        Check(
            name="failure rate",
            status=status,
            figure=f"{per_hour:.1f}/h {basis}".strip(),
            message=""
            if status == "ok"
            else f"archive_command failed {per_hour:.1f} times per hour {basis} on "
            f"{s.server} although it recovers; look for intermittent errors in the server log",
        )
    )
    return checks


def pending_segments(snap: ServerSnapshot) -> int | None:
    """Complete segments between the last archived one and the file being written now."""
    if snap.position is None:
        return None
    size = snap.settings.segment_size
    current = segno_of_lsn(snap.position.lsn, size)
    archived = wal_position(snap.archiver.last_archived_wal, size)
    if archived is None or archived.kind == "history":
        return snap.backlog.ready
    if archived.tli != snap.position.tli and archived.tli > snap.position.tli:
        return snap.backlog.ready
    return max(current - archived.segno - 1, 0)


def check_lag(snap: ServerSnapshot, t: Thresholds, now: datetime) -> list[Check]:
    if snap.position is None:
        return [
            Check(
                name="lag",
                status="skipped",
                figure="standby",
                message="this server is a standby: lag is checked on the primary",
            )
        ]
    size = snap.settings.segment_size
    pending = pending_segments(snap)
    archived = wal_position(snap.archiver.last_archived_wal, size)
    behind = 0
    if archived is not None and archived.kind != "history":
        behind = max(snap.position.lsn - (archived.segno + 1) * size, 0)
    figure = (
        f"{pending} segment(s), {behind} bytes behind {snap.position.walfile} "
        f"(LSN {format_lsn(snap.position.lsn)})"
    )
    checks = []
    if pending is None:
        checks.append(Check(name="pending segments", status="ok", figure="unknown (nothing archived yet)"))
    elif pending > t.max_pending_segments:
        checks.append(
            Check(
                name="pending segments",
                status="critical",
                figure=figure,
                message=f"{pending} complete WAL segments on {snap.settings.server} wait to be archived "
                f"(more than {t.max_pending_segments}); the archive falls behind: "
                "check archive_command's speed and the archive's free space",
            )
        )
    elif pending > t.warn_pending_segments:
        checks.append(
            Check(
                name="pending segments",
                status="warning",
                figure=figure,
                message=f"{pending} complete WAL segments wait to be archived",
            )
        )
    else:
        checks.append(Check(name="pending segments", status="ok", figure=figure))
    # since the last archive, or since the statistics were reset when nothing was archived after that
    last = snap.archiver.last_archived_time or snap.archiver.stats_reset
    if pending:
        age = (now - last).total_seconds() if last else None
        age_text = f"{age:.0f} s" if age is not None else "never archived"
        if age is None or age > t.max_archive_age_seconds:
            checks.append(
                Check(
                    name="archive age",
                    status="critical",
                    figure=age_text,
                    message=f"nothing was archived on {snap.settings.server} for {age_text} while "
                    f"{pending} WAL segment(s) are complete; archiving has stopped: check archive_command "
                    "and the server log",
                )
            )
        else:
            checks.append(Check(name="archive age", status="ok", figure=age_text))
    else:
        age_text = f"{(now - last).total_seconds():.0f} s" if last else "never"
        checks.append(Check(name="archive age", status="ok", figure=f"{age_text} (no complete WAL waiting)"))
    return checks


def check_backlog(b: Backlog, t: Thresholds) -> Check:
    if b.denied:
        return Check(name="backlog", status="warning", figure="not readable", message=b.denied)
    assert b.ready is not None
    figure = f"{b.ready} .ready file(s)" + (f", oldest {b.oldest_ready}" if b.oldest_ready else "")
    if b.ready > t.max_ready_files:
        return Check(
            name="backlog",
            status="critical",
            figure=figure,
            message=f"{b.ready} WAL files wait in pg_wal/archive_status (more than {t.max_ready_files}), "
            f"oldest {b.oldest_ready}; pg_wal will fill the disk: fix archive_command before it does",
        )
    return Check(name="backlog", status="ok", figure=figure)


def oldest_pending(snap: ServerSnapshot) -> str | None:
    """The oldest WAL file waiting: from the .ready files, else the one after the last archived."""
    if snap.backlog.oldest_ready:
        return snap.backlog.oldest_ready
    pending = pending_segments(snap)
    archived = wal_position(snap.archiver.last_archived_wal, snap.settings.segment_size)
    if pending and archived and archived.kind != "history" and snap.position:
        return segment_name(snap.position.tli, archived.segno + 1, snap.settings.segment_size)
    return None


def check_stall(
    current: str | None, previous: str | None, previous_seen_at: datetime | None, now: datetime, t: Thresholds
) -> Check:
    if current is None:
        return Check(name="stall", status="ok", figure="nothing waiting")
    if previous != current or previous_seen_at is None:
        return Check(name="stall", status="ok", figure=f"oldest waiting {current} (new since the last run)")
    waited = (now - previous_seen_at).total_seconds()
    if waited >= t.stall_after_seconds:
        return Check(
            name="stall",
            status="critical",
            figure=f"{current} waiting for {waited:.0f} s",
            message=f"WAL file {current} has waited to be archived since {_when(previous_seen_at)} "
            f"({waited:.0f} s) although the archiver reports no newer failure; archive_command is hanging or "
            "the archiver is stuck: look for a hung archive_command process and check the archive's mount",
        )
    return Check(name="stall", status="ok", figure=f"{current} waiting for {waited:.0f} s")


def check_standbys(standbys: list[Standby] | None, t: Thresholds, user: str) -> Check:
    if standbys is None:
        return Check(
            name="standbys",
            status="warning",
            figure="not visible",
            message=f"role {user!r} cannot see pg_stat_replication's positions; GRANT pg_monitor TO {user}",
        )
    if not standbys:
        return Check(name="standbys", status="ok", figure="none connected")
    worst = max(standbys, key=lambda s: s.replay_lag_bytes or 0)
    figure = ", ".join(
        f"{s.name or s.client} {s.state}/{s.sync_state} replay lag {s.replay_lag_bytes} B"
        + (f" ({s.replay_lag_seconds:.1f} s)" if s.replay_lag_seconds is not None else "")
        for s in standbys
    )
    lag = worst.replay_lag_bytes or 0
    if t.max_standby_lag_bytes is not None and lag > t.max_standby_lag_bytes:
        return Check(
            name="standbys",
            status="critical",
            figure=figure,
            message=f"standby {worst.name or worst.client} replays {lag} bytes behind (more than "
            f"{t.max_standby_lag_bytes}); check its replay and network",
        )
    if t.warn_standby_lag_bytes is not None and lag > t.warn_standby_lag_bytes:
        return Check(
            name="standbys",
            status="warning",
            figure=figure,
            message=f"standby {worst.name or worst.client} replays {lag} bytes behind",
        )
    return Check(name="standbys", status="ok", figure=figure)


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

