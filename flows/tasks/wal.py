"""Tasks of the WAL archive check: read the server, read the archive, probe, remember."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from prefect import get_run_logger
from prefect.variables import Variable

from blocks.postgres import load_database
from blocks.storage import load_store, open_archive
from flows.core.errors import DbopsError
from flows.core.health import Check
from flows.core.postgres import scalar
from flows.core.wal_archive import ArchiveLocation, ContentsResult, check_contents, wait_for
from flows.core.wal_server import CheckState, ServerSnapshot, snapshot, switch_wal
from flows.core.wal_server_checks import judge_probe, standby_probe
from flows.tasks.common import artifact_key, dbops_task
from flows.tasks.session import direct_session


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
            return standby_probe()
        label = f"dbops-wal-check-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        start = switch_wal(conn, label, block.user)
    archive = open_archive(location)
    key, waited = wait_for(lambda: archive.find(start.walfile), timeout_seconds)
    return judge_probe(start, key, waited, timeout_seconds, archive.url)


@dbops_task("oldest_kept_base_backup")
def oldest_kept_base_backup(database: str, storage: str, prefix: str) -> tuple[str | None, list[Check]]:
    """The start WAL of the oldest base backup in the storage (all of them are kept: retention already ran),
    filed under the block's database name; and what the check should say about the catalog.

    An unreadable or foreign manifest is a warning (that base backup is not trusted, so its WAL is not
    asked for); a storage that cannot be listed is critical: the window cannot be known.
    """
    from flows.core.base_catalog import read_base_catalog
    from flows.core.wal import parse_wal_name

    name = load_database(database).database
    try:
        catalog = read_base_catalog(load_store(storage), prefix, name)
    except DbopsError as exc:
        return None, [
            Check(
                name="base backups",
                status="critical",
                figure=f"{storage}:{prefix or '/'} unreadable",
                message=f"the base backups of {name} in {storage} cannot be listed ({exc}), so the WAL they "
                "need cannot be checked; fix access to the storage",
            )
        ]
    checks = [
        Check(
            name="base backup manifest",
            status="warning",
            figure=key,
            message=f"{why}; that base backup is not trusted and its WAL is not checked",
        )
        for key, why in catalog.unreadable
    ]
    if not catalog.backups:
        checks.append(Check(name="base backups", status="ok", figure=f"none of {name} in {storage}"))
        return None, checks
    oldest = min(
        catalog.backups,
        key=lambda b: parse_wal_name(b.manifest.start_wal, b.manifest.wal_segment_size).segno,
    )
    checks.append(
        Check(
            name="base backups",
            status="ok",
            figure=f"{len(catalog.backups)} of {name}; the oldest starts at {oldest.manifest.start_wal}",
        )
    )
    return oldest.manifest.start_wal, checks


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
