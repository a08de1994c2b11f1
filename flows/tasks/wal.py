"""Tasks of the WAL archive check: read the server, read the archive, probe, remember."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from prefect import get_run_logger
from prefect.variables import Variable

from blocks.storage import load_store
from flows.core.errors import ConfigurationError
from flows.core.health import Check
from flows.core.objectstore import LocalObjectStore
from flows.core.postgres import scalar
from flows.core.wal_archive import ArchiveLocation, ContentsResult, WalArchive, check_contents, wait_for
from flows.core.wal_server import CheckState, ServerSnapshot, snapshot, switch_wal
from flows.tasks.backup import load_database
from flows.tasks.common import artifact_key, dbops_task
from flows.tasks.session import direct_session


def open_archive(location: ArchiveLocation) -> WalArchive:
    if location.directory:
        path = Path(location.directory)
        if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
            raise ConfigurationError(
                f"archive directory {path} does not exist or is not readable on this machine; run the check "
                "on a worker that mounts the archive, readable by its user (group postgres), or fix directory"
            )
        return WalArchive(LocalObjectStore(path), "")
    assert location.storage is not None
    return WalArchive(load_store(location.storage), location.prefix)


@dbops_task("read_archiver_status")
def read_archiver_status(database: str) -> ServerSnapshot:
    """Settings, pg_stat_archiver, the current WAL position, the .ready backlog and the standbys."""
    block = load_database(database)
    with direct_session(block) as conn:  # refuses a connection pooler, like every flow
        conn.execute("SET statement_timeout = '30s'")
        snap = snapshot(conn)
    get_run_logger().info(
        "%s: archive_mode=%s, last archived %s, failed_count=%d, segment size %d",
        block.params().where,
        snap.settings.archive_mode,
        snap.archiver.last_archived_wal,
        snap.archiver.failed_count,
        snap.settings.segment_size,
    )
    return snap


@dbops_task("verify_archive_contents")
def verify_archive_contents(
    location: ArchiveLocation,
    snap: ServerSnapshot,
    state: CheckState,
    window_segments: int,
    full: bool = False,
    why: str = "",
    oldest_needed_segment: str | None = None,
) -> ContentsResult:
    """List the archive from the last verified segment on (or, `full`, the whole window) and look for gaps.

    `oldest_needed_segment`: the start WAL of the oldest kept base backup, once base backups exist; the
    full window then starts there instead of `window_segments` back.
    """
    result = check_contents(
        open_archive(location),
        snap,
        state,
        window_segments,
        full=full,
        oldest_needed_segment=oldest_needed_segment,
        why=why,
    )
    get_run_logger().info(
        "archive %s: %s check of segments %s..%s with %d listing(s) (%d in all) of %d key(s); %d missing",
        location.describe(),
        "full" if result.full else "incremental",
        result.first,
        result.last,
        result.list_requests,
        result.total_list_requests,
        result.listed_keys,
        result.missing_count,
    )
    return result


@dbops_task("switch_wal_and_wait_for_archive")
def switch_wal_and_wait_for_archive(
    database: str, location: ArchiveLocation, timeout_seconds: float
) -> Check:
    """Like `pgbackrest check`: restore point, pg_switch_wal(), then wait for that segment in the archive."""
    block = load_database(database)
    with block.connect() as conn:
        if scalar(conn, "SELECT pg_is_in_recovery()"):
            return Check(
                name="probe",
                status="skipped",
                figure="standby",
                message="this server is a standby, where WAL cannot be switched; run the active probe "
                "against the primary",
            )
        label = f"dbops-wal-check-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        start = switch_wal(conn, label, block.user)
    archive = open_archive(location)
    key, waited = wait_for(lambda: archive.find(start.walfile), timeout_seconds)
    if key is None:
        return Check(
            name="probe",
            status="critical",
            figure=f"{start.walfile} not archived after {waited:.0f} s",
            message=f"pg_switch_wal() closed {start.walfile} (restore point {label}) but it did not reach "
            f"{archive.url} within {timeout_seconds:.0f} s; archiving does not work end to end: check "
            "archive_command, the server log, and that the archive location given here is where it writes",
        )
    return Check(name="probe", status="ok", figure=f"{start.walfile} archived in {waited:.1f} s ({key})")


def state_variable(database: str) -> str:
    return artifact_key("wal-archive-check", database)


@dbops_task("load_check_state")
def load_check_state(name: str) -> CheckState:
    raw = Variable.get(name, default=None)
    if raw is None:
        return CheckState()
    try:
        return CheckState.model_validate(json.loads(raw) if isinstance(raw, str) else raw)
    except ValueError:
        get_run_logger().warning("ignoring unreadable state in variable %s; starting afresh", name)
        return CheckState()


@dbops_task("save_check_state")
def save_check_state(name: str, state: CheckState) -> None:
    Variable.set(name, state.model_dump_json(), overwrite=True)
