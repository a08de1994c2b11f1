"""Point-in-time recovery, step by step: preflight, extract + verify, configure, replay, report.

`flows/pitr_restore.py` runs these steps as tasks; `recover_cluster` runs them in one go for the PITR
drill and the tests. Every step is plain Python with no Prefect, and leaves nothing half done: a failed
extraction removes what it wrote; a failed replay leaves the server stopped (the caller removes the
directory when it was scratch).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from pydantic import BaseModel, Field

from flows.core.base_layout import BaseBackupManifest
from flows.core.childenv import child_environment
from flows.core.objectstore import ObjectStore
from flows.core.pgtools import find_tool
from flows.core.pitr.config import recovery_settings, write_recovery_config
from flows.core.pitr.errors import ExtractionFailed, RecoveryFailed
from flows.core.pitr.extract import (
    Extracted,
    clear_directory,
    extract_base_backup,
    own,
)
from flows.core.pitr.selection import Choice
from flows.core.pitr.server import LogFacts, PgServer, ReplayState, parse_log, read_replay_state
from flows.core.pitr.spool import WalSpool
from flows.core.pitr.targets import RecoveryTarget
from flows.core.pitr.workdir import preflight, prepare_work_directory
from flows.core.wal import parse_lsn, segno_of_lsn
from flows.core.wal_archive import WalArchive

PROGRESS_EVERY = 10.0


class RecoveryProgress(BaseModel):
    segments_replayed: int
    lsn: str | None
    replay_timestamp: datetime | None
    eta_seconds: float | None
    bytes_downloaded: int


class PitrReport(BaseModel):
    """What a recovery did; never holds a password."""

    database: str
    base_backup: str = Field(description="tar key of the base backup restored")
    base_backup_ended_at: datetime
    target: str
    window: str
    data_directory: str
    port: int
    reached_lsn: str | None = None
    reached_timestamp: datetime | None = None
    timeline: int | None = None
    stopped_by: str | None = Field(default=None, description="The server's 'recovery stopping ...' line.")
    segments_replayed: int = 0
    bytes_downloaded: int = 0
    download_seconds: float = 0
    replay_seconds: float = 0
    start_seconds: float = 0
    verified: str = ""
    superuser: str = Field(default="", description="The role the flow used on the copy's private socket.")
    running: bool = False
    connect: str = ""
    stop: str = ""
    location: str = Field(default="", description="The storage location the base backup was read from.")
    fallbacks: list[str] = Field(
        default_factory=list, description="Locations passed over before it, each with why."
    )

    @property
    def rto_seconds(self) -> float:
        return self.download_seconds + self.replay_seconds + self.start_seconds


def verify_extracted(data_directory: Path, manifest: BaseBackupManifest, bindir: str | None = None) -> str:
    """pg_verifybackup on the plain directory (PG15 reads no tar), before any configuration is written.

    A -X none backup has no WAL to parse (`--no-parse-wal`; the archive check covers the WAL). A failure
    removes what was extracted: a backup that does not match its own manifest is not started.
    """
    if not (data_directory / "backup_manifest").is_file():
        return "no backup_manifest in the backup: checked by sha256 only"
    tool = find_tool("pg_verifybackup", manifest.server_version_num, bindir)
    argv = [str(tool.path)] + ([] if manifest.wal_included else ["--no-parse-wal"]) + [str(data_directory)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=3600, env=child_environment())
    if run.returncode != 0:
        detail = (run.stderr or run.stdout).strip().splitlines()
        clear_directory(data_directory, created=False)
        raise ExtractionFailed(
            f"pg_verifybackup found the restored files do not match the backup's manifest "
            f"({detail[0] if detail else f'exit {run.returncode}'}); what was extracted has been removed: "
            "use another base backup"
        )
    return "pg_verifybackup: " + (run.stdout.strip().splitlines() or ["ok"])[-1]


def configure(
    data_directory: Path,
    work: Path,
    spool: WalSpool,
    target: RecoveryTarget,
    port: int,
    cluster_name: str,
    user: str | None,
    listen_addresses: str = "localhost",
) -> None:
    settings = recovery_settings(
        restore_command=spool.restore_command(),
        target=target.settings(),
        port=port,
        socket_dir=work / "sock",
        cluster_name=cluster_name,
        listen_addresses=listen_addresses,
        data_directory=data_directory,
    )
    write_recovery_config(data_directory, settings)
    own(data_directory, user)


@dataclass
class Replayed:
    state: ReplayState
    facts: LogFacts
    segments_replayed: int
    replay_seconds: float
    start_seconds: float
    superuser: str


def _segments(lsn: str | None, first: int, size: int) -> int:
    if not lsn:
        return 0
    return max(0, segno_of_lsn(parse_lsn(lsn), size) - first + 1)


def _failure(target: RecoveryTarget, facts: LogFacts, spool: WalSpool, archive: WalArchive) -> RecoveryFailed:
    where = f"the last replayed LSN is {facts.redo_done_lsn or 'unknown'}"
    if facts.last_transaction:
        where += f" (last transaction at {facts.last_transaction})"
    if spool.error:
        return RecoveryFailed(
            f"recovery ended before the target ({target.describe()}): {where}; {spool.error}",
            last_lsn=facts.redo_done_lsn,
        )
    if spool.missing:
        return RecoveryFailed(
            f"recovery ended before the target ({target.describe()}): {where}; WAL segment "
            f"{spool.missing} is missing from {archive.url} while later segments are there, so replay "
            "stopped there: copy it back from the server's pg_wal if it is still there, or choose an "
            "earlier target",
            missing_segment=spool.missing,
            last_lsn=facts.redo_done_lsn,
        )
    if facts.fatal and "recovery ended before" in facts.fatal:
        last = next(
            (n for n in reversed(spool.stats.absent) if len(n) == 24), None
        )  # a segment, not a .history
        return RecoveryFailed(
            f"recovery ended before the target ({target.describe()}): {where}; the archive has nothing after "
            f"that{f' ({last} is not there)' if last else ''}: the target is not in the archived WAL (a "
            "restore point older than the base backup, or a time after the last transaction)",
            last_lsn=facts.redo_done_lsn,
        )
    return RecoveryFailed(
        f"the recovered server stopped during recovery to {target.describe()}: "
        f"{facts.fatal or 'no FATAL line'}; {where}; see its log",
        last_lsn=facts.redo_done_lsn,
    )


def replay(
    server: PgServer,
    spool: WalSpool,
    archive: WalArchive,
    target: RecoveryTarget,
    choice: Choice,
    login_user: str,
    login_database: str,
    *,
    timeout: float = 24 * 3600,
    on_progress: Callable[[RecoveryProgress], None] | None = None,
    base_bytes: int = 0,
    poll: float = 0.25,
    progress_every: float = PROGRESS_EVERY,
    clock: Callable[[], float] = time.monotonic,
) -> Replayed:
    """Start the server with the spool filling, and wait until it reached the target or failed."""
    m = choice.manifest
    size = m.wal_segment_size
    first = segno_of_lsn(parse_lsn(m.start_lsn), size)
    spool.prepare()
    spool.start()
    started = clock()
    try:
        server.start()
        conn: psycopg.Connection | None = None
        superuser: str | None = None
        last_progress = started
        replayed_at: float | None = None
        while True:
            now = clock()
            if now - started > timeout:
                lines = [line for line in server.log().splitlines() if line.strip()]
                raise RecoveryFailed(
                    f"recovery to {target.describe()} did not finish within {timeout / 3600:.1f} h; "
                    f"the server was stopped (its last log line: {lines[-1] if lines else 'none'}), "
                    f"see {server.log_file}"
                )
            facts = parse_log(server.log())
            if facts.fatal or (not server.running() and now - started > 5):
                raise _failure(target, facts, spool, archive)
            if spool.error:
                raise _failure(target, facts, spool, archive)
            if replayed_at is None and (facts.stopping or facts.paused or facts.redo_done_lsn):
                replayed_at = now
            if conn is None and (facts.consistent or facts.ready):
                try:
                    conn = _login(server, superuser, login_user, login_database)
                    if superuser is None:
                        row = conn.execute("SELECT rolname FROM pg_roles WHERE oid = 10").fetchone()
                        superuser = str(row[0]) if row else login_user
                        if superuser != login_user:
                            conn.close()
                            conn = server.connect(superuser, login_database)
                except psycopg.OperationalError:
                    conn = None
            state: ReplayState | None = None
            if conn is not None:
                try:
                    state = read_replay_state(conn)
                except psycopg.Error:
                    conn.close()
                    conn = None
            if state is not None:
                done = (
                    (not state.in_recovery)
                    if target.action == "promote" or target.kind == "latest"
                    else state.paused
                )
                if done:
                    reached = replayed_at or now
                    facts = parse_log(server.log())
                    if target.kind == "latest" and spool.missing:
                        raise _failure(target, facts, spool, archive)
                    if conn is not None:
                        conn.close()
                    return Replayed(
                        state=state,
                        facts=facts,
                        segments_replayed=_segments(state.lsn, first, size),
                        replay_seconds=reached - started,
                        start_seconds=clock() - reached,
                        superuser=superuser or login_user,
                    )
            if on_progress and now - last_progress >= progress_every:
                last_progress = now
                on_progress(_progress(state, spool, first, size, choice, now - started, base_bytes))
            time.sleep(poll)
    except BaseException:
        server.stop("immediate")
        raise
    finally:
        spool.stop()


def _login(server: PgServer, superuser: str | None, login_user: str, database: str) -> psycopg.Connection:
    """The known superuser; else the block's role, then `postgres` (a role the block's may not reach)."""
    if superuser:
        return server.connect(superuser, database)
    try:
        return server.connect(login_user, database)
    except psycopg.OperationalError as exc:
        if "not yet accepting" in str(exc) or "starting up" in str(exc) or login_user == "postgres":
            raise
        return server.connect("postgres", database)


def _progress(
    state: ReplayState | None,
    spool: WalSpool,
    first: int,
    size: int,
    choice: Choice,
    elapsed: float,
    base: int,
) -> RecoveryProgress:
    lsn = state.lsn if state else None
    done = _segments(lsn, first, size)
    if not done and spool.stats.wanted and len(spool.stats.wanted) == 24:
        done = max(
            0,
            int(spool.stats.wanted[8:16], 16) * (0x100000000 // size)
            + int(spool.stats.wanted[16:], 16)
            - first,
        )
    eta = None
    if choice.end_segno is not None and done > 0:
        remaining = choice.end_segno - (first + done - 1)
        eta = max(0.0, remaining * elapsed / done)
    return RecoveryProgress(
        segments_replayed=done,
        lsn=lsn,
        replay_timestamp=state.timestamp if state else None,
        eta_seconds=eta,
        bytes_downloaded=base + spool.stats.bytes_downloaded,
    )


def recover_cluster(
    *,
    database: str,
    store: ObjectStore,
    archive: WalArchive,
    choice: Choice,
    target: RecoveryTarget,
    data_directory: Path,
    port: int,
    login_user: str,
    login_database: str,
    user: str | None,
    cluster_name: str | None = None,
    keep_running: bool = False,
    bindir: str | None = None,
    ahead: int = 8,
    timeout: float = 24 * 3600,
    on_progress: Callable[[RecoveryProgress], None] | None = None,
    progress_every: float = PROGRESS_EVERY,
) -> tuple[PitrReport, PgServer]:
    """Every step in one call (drill, tests). The server is stopped at the end unless `keep_running`; on
    failure it is always stopped. The data directory is left for the caller to keep or remove."""
    m = choice.manifest
    preflight(data_directory, port, m, user)
    work = prepare_work_directory(data_directory, user)
    t0 = time.monotonic()
    extracted: Extracted = extract_base_backup(store, m, data_directory, user)
    verified = verify_extracted(data_directory, m, bindir)
    download = time.monotonic() - t0
    spool = WalSpool(
        archive,
        choice.scan,
        work / "spool",
        segno_of_lsn(parse_lsn(m.start_lsn), m.wal_segment_size),
        ahead=ahead,
        user=user,
    )
    name = cluster_name or f"dbops-pitr-{database}"[:63]
    configure(data_directory, work, spool, target, port, name, user)
    server = PgServer(
        data_directory=data_directory,
        pg_ctl=find_tool("pg_ctl", m.server_version_num, bindir).path,
        log_file=work / "server.log",
        socket_dir=work / "sock",
        port=port,
        user=user,
    )
    done = replay(
        server,
        spool,
        archive,
        target,
        choice,
        login_user,
        login_database,
        timeout=timeout,
        on_progress=on_progress,
        base_bytes=extracted.stored_bytes,
        progress_every=progress_every,
    )
    report = build_report(
        database, choice, target, data_directory, port, extracted, download, verified, done, spool, server
    )
    if not keep_running:
        server.stop()
        report.running = False
    return report, server


def build_report(
    database: str,
    choice: Choice,
    target: RecoveryTarget,
    data_directory: Path,
    port: int,
    extracted: Extracted,
    download_seconds: float,
    verified: str,
    done: Replayed,
    spool: WalSpool,
    server: PgServer,
) -> PitrReport:
    return PitrReport(
        database=database,
        base_backup=choice.manifest.tar_key,
        base_backup_ended_at=choice.manifest.ended_at,
        target=target.describe(),
        window=choice.sentence(),
        data_directory=str(data_directory),
        port=port,
        reached_lsn=done.state.lsn,
        reached_timestamp=done.state.timestamp,
        timeline=done.state.timeline,
        stopped_by=done.facts.stopping,
        segments_replayed=done.segments_replayed,
        bytes_downloaded=extracted.stored_bytes + spool.stats.bytes_downloaded,
        download_seconds=round(download_seconds, 3),
        replay_seconds=round(done.replay_seconds, 3),
        start_seconds=round(done.start_seconds, 3),
        verified=verified,
        superuser=done.superuser,
        running=True,
        connect=f"psql -h localhost -p {port} -U <a role of the recovered cluster> -d <database>",
        stop=server.command_line(),
    )


def now_utc() -> datetime:
    return datetime.now(UTC)


__all__ = ["PitrReport", "RecoveryProgress", "recover_cluster", "replay"]
