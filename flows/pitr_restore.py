"""pitr_restore: point-in-time recovery of a database's cluster into a new data directory, as a flow.

1. target      exactly one of time (ISO 8601 with zone), lsn, restore_point, latest, immediate; a time in
               the future is refused
2. refuse      before anything is downloaded: a data directory that is not empty, a port in use, no base
               backup, a target outside the recoverable window (the window is in the sentence)
3. choose      the newest base backup that ends before the target and whose WAL chain reaches it (with a
               storage list: in the first location holding one)
4. extract     the base backup streamed into the data directory, sha256 checked while reading, safe tar
               members only; pg_verifybackup when the backup carries PostgreSQL's backup_manifest. Read
               from the first location whose copy is intact; one that fails its sha256 check is removed
               and the next location is read (the report says which, and why)
5. configure   recovery.signal, restore_command from a local WAL spool, the target; archive_mode=off,
               localhost only, a new cluster_name, production's connection strings and slots removed
6. replay      the server started as the data directory's owner; the flow fetches WAL ahead into the
               spool (archive credentials stay here), progress every 10 s; recovery that ends before the
               target is reported with the last replayed LSN and the missing segment
7. report      base backup, target, reached LSN and time, segments, bytes, RTO (download / replay /
               start); start=false stops the server, start=true leaves it running and says how to reach it
Never connects to the production server: the database block is read for its names only.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from blocks.storage import load_locations
from flows.core.layout import check_location
from flows.core.locations import StorageList
from flows.core.pitr.recovery import PitrReport
from flows.core.pitr.targets import TargetAction, parse_target
from flows.core.restore_sources import read_from_line
from flows.core.wal_archive import ArchiveLocation
from flows.tasks.common import artifact_key, database_name_of, human_bytes, publish_failure
from flows.tasks.pitr import (
    RecoveryPlan,
    plan_recovery,
    replay_to_target,
    restore_base_backup,
    stop_recovered_server,
)


class PitrOptions(BaseModel):
    """Less common knobs."""

    wal_ahead: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="How many WAL segments the flow keeps fetched ahead of the one being replayed; replayed "
        "segments are removed from the spool, so it holds at most this many (16 x 16 MiB by default).",
    )
    timeout_hours: float = Field(
        default=24.0, gt=0, description="Recovery is stopped (and reported failed) after this long."
    )
    cluster_name: str | None = Field(
        default=None, description="cluster_name of the recovered server; default dbops-pitr-<database>."
    )
    pg_bindir: str | None = Field(
        default=None,
        description="Directory with pg_ctl and pg_verifybackup; default: the backed-up server's major "
        "version.",
    )


def pitr_lines(report: PitrReport) -> list[dict[str, str]]:
    rows = [
        (
            "base backup",
            f"{report.base_backup} (ended {report.base_backup_ended_at.isoformat(timespec='seconds')})",
        ),
        ("target", report.target),
        ("window", report.window),
        ("reached LSN", report.reached_lsn or "-"),
        (
            "last replayed transaction",
            report.reached_timestamp.isoformat() if report.reached_timestamp else "-",
        ),
        ("stopped by", report.stopped_by or "end of the archive"),
        ("timeline", str(report.timeline or "-")),
        ("WAL segments replayed", str(report.segments_replayed)),
        ("downloaded", f"{report.bytes_downloaded} ({human_bytes(report.bytes_downloaded)})"),
        (
            "RTO",
            f"{report.rto_seconds:.1f} s: download {report.download_seconds:.1f} s, replay "
            f"{report.replay_seconds:.1f} s, start {report.start_seconds:.1f} s",
        ),
        ("verified", report.verified),
        ("read from", read_from_line(report.location or "-", report.fallbacks)),
        ("data directory", f"{report.data_directory} (port {report.port})"),
        ("server", "running: " + report.connect + "; stop: " + report.stop if report.running else "stopped"),
    ]
    return [{"item": k, "value": v} for k, v in rows]


@flow(name="pitr-restore", log_prints=True)
def pitr_restore(
    database: str,
    storage: StorageList,
    archive: ArchiveLocation,
    data_directory: str,
    prefix: str = "",
    time: str | None = None,
    lsn: str | None = None,
    restore_point: str | None = None,
    latest: bool = False,
    immediate: bool = False,
    inclusive: bool = True,
    action: TargetAction = "promote",
    port: Annotated[int, Field(ge=1024, le=65535)] = 5433,
    start: bool = False,
    options: PitrOptions | None = None,
) -> PitrReport:
    """Recover the cluster of `database` to a point in time into a new data directory on this worker.

    Args:
        database: Name of the PostgresDatabase block whose base backups and WAL are restored; only its
            database name (the storage folder) and role name are read, the server is never contacted.
        storage: Storage block slug holding the base backups (s3-bucket/NAME or local-file-system/NAME),
            or a list of them (the primary first, then its copies; a list, or slugs separated by commas):
            the base backup is read from the first location whose copy is intact.
        archive: Where the WAL is (the WAL archive check's location): a storage block slug and prefix, or
            a directory on this worker; any layout the check reads (dbops, WAL-G, pgBackRest, barman-cloud,
            compressed segments).
        data_directory: Directory on this worker for the recovered cluster; must not exist or be empty.
            Work files (WAL spool, socket, server log) go beside it in <data_directory>.dbops-pitr.
        prefix: Folder inside the storage the base backups were written under (e.g. prod); may be empty.
        time: Recover to this time, ISO 8601 with a time zone (2026-11-29T09:15:00+00:00). One target only.
        lsn: Recover to this WAL location (16/B374D848). One target only.
        restore_point: Recover to a restore point made with pg_create_restore_point. One target only.
        latest: Recover to the end of the archive (then promote). One target only.
        immediate: Recover only until the backup is consistent. One target only.
        inclusive: With time or lsn: stop just after the target (true) or just before it (false).
        action: At the target: promote (open read-write on a new timeline) or pause (stay read-only in
            recovery to inspect; promote later with SELECT pg_wal_replay_resume()).
        port: TCP port of the recovered server (localhost only); must be free.
        start: Leave the recovered server running (the report says how to connect and stop it); when
            false it is stopped after recovery was verified.
        options: WAL prefetch depth, timeout, cluster_name, client tool directory.
    """
    logger = get_run_logger()
    plan: RecoveryPlan | None = None
    try:
        options = options or PitrOptions()
        load_locations(storage)  # every slug a storage block, no place named twice (or under two names)
        name = database_name_of(database)
        check_location(prefix, name)
        target = parse_target(
            time=time,
            lsn=lsn,
            restore_point=restore_point,
            latest=latest,
            immediate=immediate,
            inclusive=inclusive,
            action=action,
        )
        plan = plan_recovery(database, storage, prefix, archive, target, data_directory, port)
        run_id = (flow_run.get_id() or "")[:8] or "manual"
        restored = restore_base_backup(plan, run_id, options.pg_bindir)
        report, server = replay_to_target(
            plan,
            restored,
            cluster_name=options.cluster_name or f"dbops-pitr-{plan.database}"[:63],
            ahead=options.wal_ahead,
            timeout_s=options.timeout_hours * 3600,
            pg_bindir=options.pg_bindir,
        )
        if start:
            logger.info(
                "the recovered server stays running: %s; stop it with %s", report.connect, report.stop
            )
        else:
            stop_recovered_server(server)
            report.running = False
            logger.info(
                "recovery verified; the server was stopped (start it with pg_ctl -D %s)", data_directory
            )
        create_table_artifact(
            key=artifact_key("pitr", plan.database),
            table=pitr_lines(report),
            description=f"Point-in-time recovery of {plan.database} to {report.target}: "
            f"RTO {report.rto_seconds:.0f} s",
        )
        return report
    except Exception as exc:
        details = []
        if plan is not None:
            details = [
                f"base backup: {plan.choice.manifest.tar_key}",
                f"window: {plan.choice.sentence()}",
            ]
            if plan.data_directory.is_dir() and any(plan.data_directory.iterdir()):
                details.append(
                    f"data directory {plan.data_directory} was left for inspection (server log in "
                    f"{plan.data_directory}.dbops-pitr/server.log); remove both before running again"
                )
        # the Failed state is the flow's result on failure (Prefect's convention), not a report
        return publish_failure(
            artifact_key("pitr", plan.database if plan else database_name_of(database)),
            f"Point-in-time recovery of {database}",
            exc,
            details,
        )
