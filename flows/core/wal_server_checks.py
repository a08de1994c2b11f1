"""Judging what the PostgreSQL server says about WAL archiving, one typed result per check.

The judges (`check_*`) are pure: they take what `flows.core.wal_server` read and return a `Check`:
ok / warning / critical (or skipped), the figure it is about, and for anything not ok one sentence saying
what is wrong and how to fix it. `Thresholds` says when a figure turns into a warning or a failed run.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field

from flows.core.health import Check, Status
from flows.core.wal import (
    format_lsn,
    ordered_after,
    segment_name,
    segno_of_lsn,
)
from flows.core.wal_server import (
    ArchiverStats,
    ArchiveSettings,
    Backlog,
    ProbeStart,
    ServerSnapshot,
    Standby,
    wal_position,
)

#: archive_command values that archive nothing while PostgreSQL believes they succeeded
NOOP_COMMANDS = {"", "(disabled)", "true", "/bin/true", "/usr/bin/true", ":", "exit 0", "/bin/true %p"}


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


# -- judging -----------------------------------------------------------------------------------------------


def check_settings(settings: ArchiveSettings) -> list[Check]:
    checks: list[Check] = []
    if settings.wal_level == "minimal":
        checks.append(
            Check(
                name="wal_level",
                status="critical",
                figure="minimal",
                message=f"wal_level is minimal on {settings.server}, which cannot be archived; "
                "set wal_level = replica and restart PostgreSQL",
            )
        )
    else:
        checks.append(Check(name="wal_level", status="ok", figure=settings.wal_level))
    if settings.archive_mode not in ("on", "always"):
        pending = ""
        if settings.archive_mode_pending == "(changed)":  # pg_file_settings is for superusers only
            pending = " (a new value is set but the server was not restarted)"
        elif settings.archive_mode_pending:
            pending = f" (it is set to {settings.archive_mode_pending} but the server was not restarted)"
        checks.append(
            Check(
                name="archive_mode",
                status="critical",
                figure=settings.archive_mode,
                message=f"archive_mode is {settings.archive_mode} on {settings.server}{pending}, so no WAL "
                "is archived; set archive_mode = on (ALTER SYSTEM SET archive_mode = on) and restart "
                "PostgreSQL: it only takes effect after a restart",
            )
        )
    else:
        checks.append(Check(name="archive_mode", status="ok", figure=settings.archive_mode))
    command = settings.archive_command.strip()
    if settings.archive_library:
        checks.append(
            Check(name="archive_command", status="ok", figure=f"archive_library={settings.archive_library}")
        )
    elif settings.archive_mode in ("on", "always") and command.lower() in NOOP_COMMANDS:
        checks.append(
            Check(
                name="archive_command",
                status="critical",
                figure=command or "(empty)",
                message=f"archive_command on {settings.server} is {command or 'empty'!r}, which stores "
                "nothing (WAL piles up in pg_wal or is thrown away); set it to copy %p to the archive, e.g. "
                "'cp %p /var/lib/postgresql/wal_archive/%f', and reload",
            )
        )
    else:
        checks.append(Check(name="archive_command", status="ok", figure=command))
    checks.append(
        Check(
            name="archive_timeout",
            status="ok",
            figure=f"{settings.archive_timeout} s"
            if settings.archive_timeout
            else "0 (a segment is archived only when full)",
        )
    )
    return checks


def _when(t: datetime | None) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S} UTC" if t else "never"


def archiver_failing(archiver: ArchiverStats, segment_size: int) -> bool:
    """The last failure is newer than the last success. Times decide; when the failed WAL file is not after
    the archived one (by timeline and segment, a .history file first on its timeline) the failure was of a
    file that has since been archived, e.g. a retried segment or a history file re-sent after a switch."""
    if archiver.last_failed_time is None:
        return False
    if archiver.last_archived_time is None:
        return True
    if archiver.last_failed_time <= archiver.last_archived_time:
        return False
    failed = wal_position(archiver.last_failed_wal, segment_size)
    archived = wal_position(archiver.last_archived_wal, segment_size)
    segments = failed and archived and "history" not in (failed.kind, archived.kind)
    return not (segments and ordered_after(archived, failed))  # type: ignore[arg-type]


def check_archiver(
    archiver: ArchiverStats,
    settings: ArchiveSettings,
    thresholds: Thresholds,
    failed_count_at_success: int | None,
    previous_failed_count: int | None,
    hours_since_previous: float | None,
) -> list[Check]:
    checks = []
    if archiver_failing(archiver, settings.segment_size):
        since = (
            archiver.failed_count - failed_count_at_success
            if failed_count_at_success is not None
            else archiver.failed_count
        )
        since = max(since, 1)
        status: Status = "critical" if since > thresholds.max_failures_since_success else "warning"
        checks.append(
            Check(
                name="archiver",
                status=status,
                figure=f"failed_count={archiver.failed_count}, last_failed_wal={archiver.last_failed_wal}",
                message=f"archive_command is failing on {settings.server}: "
                f"failed_count={archiver.failed_count}, "
                f"last_failed_wal={archiver.last_failed_wal} at {_when(archiver.last_failed_time)}, "
                "last success "
                f"{archiver.last_archived_wal or 'none'} at {_when(archiver.last_archived_time)}; "
                "run the archive_command by hand as the postgres OS user for that file and read the server "
                "log to see why",
            )
        )
    else:
        checks.append(
            Check(
                name="archiver",
                status="ok",
                figure=f"archived_count={archiver.archived_count}, "
                f"last_archived_wal={archiver.last_archived_wal}, "
                f"failed_count={archiver.failed_count}",
            )
        )
    if previous_failed_count is not None and hours_since_previous and hours_since_previous > 0:
        delta = max(archiver.failed_count - previous_failed_count, 0)
        per_hour, basis = delta / hours_since_previous, "since the previous check"
    elif archiver.stats_reset is not None:
        hours = max((datetime.now(UTC) - archiver.stats_reset).total_seconds() / 3600, 1 / 60)
        per_hour, basis = archiver.failed_count / hours, "since the statistics were reset"
    else:
        per_hour, basis = 0.0, ""
    status = "warning" if per_hour > thresholds.warn_failures_per_hour else "ok"
    checks.append(
        Check(
            name="failure rate",
            status=status,
            figure=f"{per_hour:.1f}/h {basis}".strip(),
            message=""
            if status == "ok"
            else f"archive_command failed {per_hour:.1f} times per hour {basis} on "
            f"{settings.server} although it recovers; look for intermittent errors in the server log",
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


def check_lag(snap: ServerSnapshot, thresholds: Thresholds, now: datetime) -> list[Check]:
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
    elif pending > thresholds.max_pending_segments:
        checks.append(
            Check(
                name="pending segments",
                status="critical",
                figure=figure,
                message=f"{pending} complete WAL segments on {snap.settings.server} wait to be archived "
                f"(more than {thresholds.max_pending_segments}); the archive falls behind: "
                "check archive_command's speed and the archive's free space",
            )
        )
    elif pending > thresholds.warn_pending_segments:
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
        if age is None or age > thresholds.max_archive_age_seconds:
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


def check_backlog(backlog: Backlog, thresholds: Thresholds) -> Check:
    if backlog.denied:
        return Check(name="backlog", status="warning", figure="not readable", message=backlog.denied)
    assert backlog.ready is not None
    oldest = f", oldest {backlog.oldest_ready}" if backlog.oldest_ready else ""
    figure = f"{backlog.ready} .ready file(s){oldest}"
    if backlog.ready > thresholds.max_ready_files:
        return Check(
            name="backlog",
            status="critical",
            figure=figure,
            message=f"{backlog.ready} WAL files wait in pg_wal/archive_status "
            f"(more than {thresholds.max_ready_files}), "
            f"oldest {backlog.oldest_ready}; pg_wal will fill the disk: fix archive_command before it does",
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
    current: str | None,
    previous: str | None,
    previous_seen_at: datetime | None,
    now: datetime,
    thresholds: Thresholds,
) -> Check:
    if current is None:
        return Check(name="stall", status="ok", figure="nothing waiting")
    if previous != current or previous_seen_at is None:
        return Check(name="stall", status="ok", figure=f"oldest waiting {current} (new since the last run)")
    waited = (now - previous_seen_at).total_seconds()
    if waited >= thresholds.stall_after_seconds:
        return Check(
            name="stall",
            status="critical",
            figure=f"{current} waiting for {waited:.0f} s",
            message=f"WAL file {current} has waited to be archived since {_when(previous_seen_at)} "
            f"({waited:.0f} s) although the archiver reports no newer failure; archive_command is hanging or "
            "the archiver is stuck: look for a hung archive_command process and check the archive's mount",
        )
    return Check(name="stall", status="ok", figure=f"{current} waiting for {waited:.0f} s")


def check_standbys(standbys: list[Standby] | None, thresholds: Thresholds, user: str) -> Check:
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
    if thresholds.max_standby_lag_bytes is not None and lag > thresholds.max_standby_lag_bytes:
        return Check(
            name="standbys",
            status="critical",
            figure=figure,
            message=f"standby {worst.name or worst.client} replays {lag} bytes behind (more than "
            f"{thresholds.max_standby_lag_bytes}); check its replay and network",
        )
    if thresholds.warn_standby_lag_bytes is not None and lag > thresholds.warn_standby_lag_bytes:
        return Check(
            name="standbys",
            status="warning",
            figure=figure,
            message=f"standby {worst.name or worst.client} replays {lag} bytes behind",
        )
    return Check(name="standbys", status="ok", figure=figure)


# -- the active probe --------------------------------------------------------------------------------------


def standby_probe() -> Check:
    """A standby cannot switch WAL: the active probe is skipped there, not failed."""
    return Check(
        name="probe",
        status="skipped",
        figure="standby",
        message="this server is a standby, where WAL cannot be switched; run the active probe "
        "against the primary",
    )


def judge_probe(
    start: ProbeStart, key: str | None, waited: float, timeout_seconds: float, archive_url: str
) -> Check:
    """The switched segment `start.walfile` found in the archive under `key` after `waited` seconds, or
    not found (`key` None) within `timeout_seconds`: archiving does not work end to end."""
    if key is None:
        return Check(
            name="probe",
            status="critical",
            figure=f"{start.walfile} not archived after {waited:.0f} s",
            message=f"pg_switch_wal() closed {start.walfile} (restore point {start.restore_point}) but it "
            f"did not reach {archive_url} within {timeout_seconds:.0f} s; archiving does not work end to "
            "end: check archive_command, the server log, and that the archive location given here is where "
            "it writes",
        )
    return Check(name="probe", status="ok", figure=f"{start.walfile} archived in {waited:.1f} s ({key})")
