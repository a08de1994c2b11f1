"""Physical base backups: pg_basebackup -Ft to stdout → zstd → sha256 → object store, nothing on local disk.

A WAL archive restores nothing without a base backup to replay it onto. pg_basebackup's tar stream goes
through the same stages as a dump (flows.core.streams) into one object; while it passes, a small streaming
tar reader (`TarScanner`) watches the members go by and keeps the two small ones a recovery needs to
trust the backup: `backup_label` (start LSN, timeline) and PostgreSQL's own `backup_manifest` (WAL-Ranges:
where the backup becomes consistent). PostgreSQL only appends backup_manifest to the stdout tar when the
server does not compress it, so there is no server-side compression here: zstd runs in-process.

With `-X none` (the default) the server itself waits, at the end of the backup, until the stop segment is
archived; when archiving is broken that wait never ends, so a watchdog ends it after the caller's timeout
and names the first segment missing from the archive. Either way, the caller confirms every segment from
start to stop in the archive before it writes the manifest (like pgBackRest's archive check).
"""

from __future__ import annotations

import builtins
import hashlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flows.core.base_backup_errors import BaseBackupFailed, WalNotArchived
from flows.core.base_facts import BackupFacts, facts_from, parse_backup_label
from flows.core.base_preflight import (
    classify_replication_error,
)
from flows.core.errors import (
    DbopsError,
    VerificationFailed,
)
from flows.core.objectstore import DEFAULT_PART_SIZE, ObjectStore
from flows.core.pgtools import PgTool, ToolRun
from flows.core.postgres import ConnParams, libpq_environment
from flows.core.stored_stream import StoredStream, put_tool_output
from flows.core.streams import hashing, zstd_compress, zstd_decompress
from flows.core.tar_stream import TarScanner

TAR_BLOCK = 512
#: backup_label is a few hundred bytes; backup_manifest ~150 bytes per file of the cluster
MAX_CAPTURE = 256 * 1024 * 1024
WAITING_NOTICE = "waiting for required WAL segments to be archived"


# -- the command line --------------------------------------------------------------------------------------


def backup_label_text(database: str, when: datetime) -> str:
    return f"dbops-{database}-{when.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def pg_basebackup_argv(
    tool: PgTool, label: str, *, include_wal: bool, manifest_checksums: str | None = "SHA256"
) -> list[str]:
    """The pg_basebackup command line: a tar to stdout, uncompressed (so backup_manifest is in it)."""
    argv = [
        str(tool.path),
        "-D",
        "-",
        "-Ft",
        "--checkpoint=fast",
        f"--label={label}",
        "-X",
        "fetch" if include_wal else "none",
        "--no-password",
    ]
    if manifest_checksums:
        argv.append(f"--manifest-checksums={manifest_checksums}")
    return argv


# -- running it --------------------------------------------------------------------------------------------


@dataclass
class BaseBackupResult(StoredStream):
    facts: BackupFacts
    pg_manifest: builtins.bytes
    wal_files: list[str]
    members: int
    argv: list[str] = field(default_factory=list)


class _ArchiveWatchdog(threading.Thread):
    """Ends pg_basebackup when the server has waited `timeout` s for the archive (it would wait forever)."""

    def __init__(self, run: ToolRun, timeout: float) -> None:
        super().__init__(daemon=True, name="basebackup-archive-watchdog")
        self.run_ = run
        self.timeout = timeout
        self.fired = False
        self.done = threading.Event()

    def _waiting(self) -> bool:
        collector = self.run_.stderr
        if collector is None:
            return False
        for _ in range(3):
            try:
                return any(WAITING_NOTICE.encode() in line for line in list(collector.buf))
            except RuntimeError:  # the deque changed while copied: look again
                continue
        return False

    def run(self) -> None:
        seen: float | None = None
        while not self.done.wait(0.25):
            if seen is None and self._waiting():
                seen = time.monotonic()
            if seen is not None and time.monotonic() - seen > self.timeout:
                proc = self.run_.proc
                if proc is not None and proc.poll() is None:
                    self.fired = True
                    proc.kill()
                return


def stream_base_backup(
    params: ConnParams,
    store: ObjectStore,
    key: str,
    *,
    tool: PgTool,
    label: str,
    include_wal: bool,
    segment_size: int,
    level: int = 3,
    zstd_threads: int = 1,
    part_size: int = DEFAULT_PART_SIZE,
    manifest_checksums: str | None = "SHA256",
    archive_wait_seconds: float = 300,
    on_archive_stall: Callable[[str | None], str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    if_absent: bool = True,
) -> BaseBackupResult:
    """Run pg_basebackup into `key`; the object appears only when pg_basebackup exited 0 and its tar held
    backup_label, global/pg_control and backup_manifest (else the upload is aborted, nothing is left).

    `on_archive_stall(start_wal)` words the failure when the server's wait for the archive outlasts
    `archive_wait_seconds` (it names the first missing segment).
    """
    argv = pg_basebackup_argv(tool, label, include_wal=include_wal, manifest_checksums=manifest_checksums)
    started = datetime.now(UTC)
    scanner = TarScanner()
    with libpq_environment(params) as env:
        run = ToolRun(argv=argv, params=params, env=env, on_start=on_start)
        run.start()
        watchdog = _ArchiveWatchdog(run, archive_wait_seconds)
        watchdog.start()

        def source() -> Iterator[bytes]:
            try:
                yield from run.chunks()
            except DbopsError:
                if watchdog.fired:
                    start_wal = _start_wal(scanner)
                    raise WalNotArchived(
                        on_archive_stall(start_wal)
                        if on_archive_stall
                        else f"the server waited more than {archive_wait_seconds:.0f} s for this backup's "
                        "WAL to be archived; fix archive_command, then run the backup again"
                    ) from None
                raise
            facts_from(scanner, segment_size)  # raises before the upload completes: nothing is stored

        try:
            body = zstd_compress(scanner.tap(source()), level, threads=zstd_threads)

            put = put_tool_output(
                store, key, run, body, part_size=part_size, progress=progress, if_absent=if_absent
            )
        except DbopsError as exc:
            raise _reworded(exc, run) from None
        finally:
            watchdog.done.set()
            run.stop()
    facts = facts_from(scanner, segment_size)
    return BaseBackupResult(
        **put,
        started_at=started,
        ended_at=datetime.now(UTC),
        facts=facts,
        pg_manifest=scanner.captured["backup_manifest"],
        wal_files=list(scanner.wal_files),
        members=scanner.members,
        argv=argv[1:],
    )


def _start_wal(scanner: TarScanner) -> str | None:
    label = scanner.captured.get("backup_label")
    if label is None:
        return None
    try:
        return parse_backup_label(label.decode(errors="replace"))[1]
    except BaseBackupFailed:
        return None


def _reworded(exc: DbopsError, run: ToolRun) -> DbopsError:
    """pgtools words a tool's failure for dumps; say what it means for a base backup instead."""
    text = run.stderr_text()
    if "pg_hba.conf" in text or ("replication" in text.lower() and "role" in text.lower()):
        return classify_replication_error(text, run.params)
    msg = str(exc).replace("the upload was aborted", "the base backup's upload was aborted (nothing stored)")
    return type(exc)(msg) if msg != str(exc) else exc


# -- WAL confirmation --------------------------------------------------------------------------------------


def first_missing(needed: list[str], present: Callable[[str], bool]) -> str | None:
    """The first of `needed` (in WAL order) that `present` does not find."""
    for name in needed:
        if not present(name):
            return name
    return None


# -- verification ------------------------------------------------------------------------------------------


@dataclass
class TarVerification:
    members: int
    wal_files: int
    sha256: str | None
    seconds: float

    def detail(self) -> str:
        text = (
            f"tar listing read back: {self.members} members, backup_label, global/pg_control and "
            "backup_manifest present"
        )
        if self.wal_files:
            text += f", {self.wal_files} WAL file(s) in pg_wal"
        return text + (", sha256 re-checked over the whole object" if self.sha256 else "")


def verify_stored_base_backup(
    store: ObjectStore,
    key: str,
    *,
    full: bool,
    expected_sha256: str,
    expected_wal: list[str] | None = None,
) -> TarVerification:
    """Read the stored object back, decompress it and walk its tar listing to the end-of-archive marker.

    The whole object is read either way (a tar's listing is spread through it); `full` also compares the
    sha256 of the stored bytes with the upload's.
    """
    t0 = time.monotonic()
    digest = hashlib.sha256()
    scanner = TarScanner()
    try:
        for chunk in zstd_decompress(hashing(store.get_stream(key), digest, [0])):
            scanner.feed(chunk)
    except (BaseBackupFailed, ValueError) as exc:
        raise VerificationFailed(
            f"{key} does not read back as a zstd tar ({exc}); the base backup is not usable"
        ) from None
    except Exception as exc:
        if type(exc).__name__ == "ZstdError":
            raise VerificationFailed(
                f"{key} does not decompress ({exc}); the stored base backup is corrupt"
            ) from None
        raise
    try:
        facts_from(scanner)
    except BaseBackupFailed as exc:
        raise VerificationFailed(f"{key} read back: {exc}") from None
    missing = [w for w in expected_wal or [] if w not in scanner.wal_files]
    if missing:
        raise VerificationFailed(
            f"{key} was taken with its WAL but has no pg_wal/{missing[0]}; it cannot reach consistency "
            "on its own"
        )
    sha = digest.hexdigest()
    if full and sha != expected_sha256:
        raise VerificationFailed(
            f"{key} reads back with sha256 {sha}, not {expected_sha256} as uploaded; the object is corrupt"
        )
    return TarVerification(
        scanner.members, len(scanner.wal_files), sha if full else None, time.monotonic() - t0
    )
