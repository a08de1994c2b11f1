"""wal_archive_check: is WAL archiving working, so that point-in-time recovery is possible? Every 15 min.

1. settings   wal_level, archive_mode, archive_command / archive_library, archive_timeout
2. archiver   pg_stat_archiver: failing now (last failure newer than the last success), failures per hour
3. lag        complete segments and bytes not yet archived; age of the last archive while WAL waits
4. backlog    .ready files in pg_wal/archive_status (pg_monitor may read them)
5. contents   the last archived file is in the archive; no gap since the last verified segment, and once a
              day (full_verify) none in the whole window, so a segment deleted behind that point is found;
              with base backups in backups_storage, the whole window starts at the oldest one's start WAL
6. stall      the oldest waiting segment has not moved since the previous run
7. probe      (active=true) restore point + pg_switch_wal(), then wait for that segment in the archive
8. standbys   replication lag from pg_stat_replication
9. report     a typed report and a table artifact; Failed with the first critical check's sentence
"""

from __future__ import annotations

from datetime import datetime, timedelta

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from flows.core.health import Check, Status, worst
from flows.core.locations import StorageList, parse_locations
from flows.core.wal import segment_name
from flows.core.wal_archive import ArchiveLocation, ContentsResult, FullVerify, full_verify_due
from flows.core.wal_server import CheckState, ServerSnapshot, WalArchiveBroken
from flows.core.wal_server_checks import (
    Thresholds,
    archiver_failing,
    check_archiver,
    check_backlog,
    check_lag,
    check_settings,
    check_stall,
    check_standbys,
    oldest_pending,
)
from flows.tasks.common import (
    artifact_key,
    failed_state,
    failure_sentence,
    judged_description,
    publish_failure,
    table_lines,
)
from flows.tasks.wal import (
    load_check_state,
    oldest_kept_base_backup,
    read_archiver_status,
    save_check_state,
    state_variable,
    switch_wal_and_wait_for_archive,
    verify_archive_contents,
)


class CheckOptions(BaseModel):
    """Less common knobs of the WAL archive check."""

    probe_timeout_seconds: float = Field(
        default=60,
        gt=0,
        description="How long the active probe waits for the switched segment to be archived.",
    )
    window_segments: int = Field(
        default=4096,
        ge=1,
        description="The window this check answers for: how many segments back from the last archived one "
        "the first run and every full re-verification check for gaps (never before where the archive "
        "began); other runs continue from the last verified segment. Keep it within what your WAL "
        "retention keeps, or expired segments are reported missing.",
    )
    full_verify_every_hours: float = Field(
        default=24,
        gt=0,
        description="With full_verify=auto, re-list the whole window when the last full verification is "
        "older than this.",
    )
    remember: bool = Field(
        default=True,
        description="Keep the last verified segment and the oldest waiting one in a Prefect Variable, so "
        "each run lists only new archive keys and can spot a stalled archiver.",
    )
    state_variable: str | None = Field(
        default=None, description="Name of that Variable; default wal-archive-check-<database block>."
    )


class WalArchiveReport(BaseModel):
    database: str
    server: str
    archive: str
    status: Status
    checks: list[Check]
    segment_size: int
    timeline: int | None
    last_archived_wal: str | None
    verified_through: str | None
    missing_segments: list[str] = Field(default_factory=list)
    listed_keys: int = 0
    list_requests: int = Field(default=0, description="Listings of the gap window in this run.")
    total_list_requests: int = Field(default=0, description="Every listing of the archive in this run.")
    full_verify: bool = Field(default=False, description="This run re-listed the whole window.")
    checked_at: datetime

    def first_critical(self) -> Check | None:
        return next((c for c in self.checks if c.status == "critical"), None)


@flow(name="wal-archive-check", log_prints=True)
def wal_archive_check(
    database: str,
    archive: ArchiveLocation,
    thresholds: Thresholds | None = None,
    active: bool = False,
    full_verify: FullVerify = "auto",
    options: CheckOptions | None = None,
    backups_storage: StorageList | None = None,
    backups_prefix: str = "",
) -> WalArchiveReport:
    """Check that WAL archiving works; Failed, with what to fix, when it does not.

    Args:
        database: Name of the PostgresDatabase block of the server whose archiving is checked (a role with
            pg_monitor is enough unless active=true).
        archive: Where archive_command stores WAL: a storage block slug and prefix, or a local directory.
        thresholds: When lag, backlog, failures and stalls become warnings or a failed run.
        active: Also create a restore point, switch WAL and wait for that segment to be archived (needs
            EXECUTE on pg_switch_wal and pg_create_restore_point); skipped on a standby.
        full_verify: Re-list the whole window, not only segments newer than the last verified one, so a
            segment deleted from the archive after an earlier run saw it is found by name: auto (once a day,
            see options), always (now, on demand), never.
        options: Probe timeout, first-run window, where the check remembers its position.
        backups_storage: Storage block slug holding the base backups (the base_backup flow's storage; its
            list of a primary and copies too: the oldest base backup kept in any of them counts). With base
            backups there, a full verification covers every segment from the oldest one's start WAL to
            now, whatever window_segments says. Empty: the window is window_segments back.
        backups_prefix: Folder inside backups_storage (e.g. prod); base backups are filed under the
            database block's database name.
    """
    logger = get_run_logger()
    report: WalArchiveReport | None = None
    published = False  # a judged failure keeps its table: the checks, each with what to do
    try:
        thresholds = thresholds or Thresholds()
        options = options or CheckOptions()
        variable = options.state_variable or state_variable(database)
        state = load_check_state(variable) if options.remember else CheckState()

        snap = read_archiver_status(database)
        now = snap.taken_at
        hours = (now - state.checked_at).total_seconds() / 3600 if state.checked_at else None
        checks = check_settings(snap.settings)
        checks += check_archiver(
            snap.archiver,
            snap.settings,
            thresholds,
            failed_count_at_success=state.failed_count_at_success,
            previous_failed_count=state.failed_count,
            hours_since_previous=hours,
        )
        checks += check_lag(snap, thresholds, now)
        checks.append(check_backlog(snap.backlog, thresholds))

        archiving = snap.settings.archive_mode in ("on", "always")
        contents: ContentsResult | None = None
        if archiving:
            full, why = full_verify_due(
                full_verify, state, now, timedelta(hours=options.full_verify_every_hours)
            )
            oldest_needed: str | None = None
            if backups_storage:  # the chain: every segment from the oldest kept base backup's start on
                for where in parse_locations(backups_storage):  # a copy may keep older ones than the primary
                    start, found = oldest_kept_base_backup(database, where.block, backups_prefix)
                    checks += found
                    if start is not None and (oldest_needed is None or start[8:] < oldest_needed[8:]):
                        oldest_needed = start
            contents = verify_archive_contents(
                archive,
                snap,
                state,
                window_segments=options.window_segments,
                full=full,
                why=why,
                oldest_needed_segment=oldest_needed,
            )
            checks += contents.checks
        else:
            checks.append(Check(name="contents", status="skipped", figure="archive_mode is off"))

        pending = oldest_pending(snap)
        checks.append(
            check_stall(
                pending,
                previous=state.oldest_pending,
                previous_seen_at=state.oldest_pending_seen_at,
                now=now,
                thresholds=thresholds,
            )
        )

        if active and archiving:
            checks.append(switch_wal_and_wait_for_archive(database, archive, options.probe_timeout_seconds))
        elif active:
            checks.append(Check(name="probe", status="skipped", figure="archive_mode is off"))
        checks.append(check_standbys(snap.standbys, thresholds, snap.user))

        report = _report(database, archive, snap, checks, contents)
        if options.remember:
            save_check_state(variable, _next_state(state, snap, contents, pending))
        _publish(report)
        published = True
        for check in checks:
            if check.status in ("warning", "critical"):
                logger.warning("%s %s: %s", check.status, check.name, check.message or check.figure)
        critical = report.first_critical()
        if critical is not None:
            raise WalArchiveBroken(critical.message)
        return report
    except Exception as exc:
        if published and report is not None:
            _publish(report, failure_sentence(exc))  # the sentence on top of the table it judged
            return failed_state(exc)
        return publish_failure(
            artifact_key("wal-archive-check", database),
            f"WAL archiving of {database}",
            exc,
            table_lines(_rows(report)) if report is not None else [],
        )


def _next_state(
    state: CheckState, snap: ServerSnapshot, contents: ContentsResult | None, pending: str | None
) -> CheckState:
    failing = archiver_failing(snap.archiver, snap.settings.segment_size)
    same_segsize = state.segment_size == snap.settings.segment_size
    verified = contents.verified_through if contents else None
    full_pass = contents if contents is not None and contents.full else None
    return CheckState(
        segment_size=snap.settings.segment_size,
        tli=contents.tli if contents and contents.tli else state.tli,
        verified_through=verified
        if verified is not None
        else (state.verified_through if same_segsize else None),
        verified_from=full_pass.window_first
        if full_pass is not None
        else (state.verified_from if same_segsize else None),
        full_verified_at=snap.taken_at if full_pass is not None else state.full_verified_at,
        oldest_pending=pending,
        oldest_pending_seen_at=(
            state.oldest_pending_seen_at if pending and pending == state.oldest_pending else snap.taken_at
        ),
        failed_count=snap.archiver.failed_count,
        failed_count_at_success=state.failed_count_at_success if failing else snap.archiver.failed_count,
        checked_at=snap.taken_at,
    )


def _report(
    database: str,
    archive: ArchiveLocation,
    snap: ServerSnapshot,
    checks: list[Check],
    contents: ContentsResult | None,
) -> WalArchiveReport:
    size = snap.settings.segment_size
    through = None
    if contents and contents.verified_through is not None and contents.tli:
        through = segment_name(contents.tli, contents.verified_through, size)
    return WalArchiveReport(
        database=database,
        server=snap.settings.server,
        archive=archive.describe(),
        status=worst(checks),
        checks=checks,
        segment_size=size,
        timeline=snap.position.tli if snap.position else None,
        last_archived_wal=snap.archiver.last_archived_wal,
        verified_through=through,
        missing_segments=contents.missing if contents else [],
        listed_keys=contents.listed_keys if contents else 0,
        list_requests=contents.list_requests if contents else 0,
        total_list_requests=contents.total_list_requests if contents else 0,
        full_verify=contents.full if contents else False,
        checked_at=snap.taken_at,
    )


def _rows(report: WalArchiveReport) -> list[dict[str, object]]:
    return [
        {"check": c.name, "status": c.status, "figure": c.figure, "what to do": c.message}
        for c in report.checks
    ]


def _publish(report: WalArchiveReport, failure: str | None = None) -> None:
    create_table_artifact(
        key=artifact_key("wal-archive-check", report.database),
        table=_rows(report),
        description=judged_description(
            f"WAL archiving of {report.database} ({report.server}) into {report.archive}: {report.status}",
            failure,
        ),
    )


if __name__ == "__main__":  # pragma: no cover
    import sys

    wal_archive_check(database=sys.argv[1], archive=ArchiveLocation(directory=sys.argv[2]))
