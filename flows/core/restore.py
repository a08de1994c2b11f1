"""Restoring a backup: which one, where it goes, and never committing bytes that fail their sha256.

Selection: only backups with a manifest are candidates (`latest`, `latest before <timestamp>`, or an
explicit key). The stored object streams from storage through sha256 (of the stored bytes), then zstd,
into `pg_restore`. The decompressed stream is fed one chunk behind: the last chunk is written only after
the whole object was read and its sha256 compared with the manifest's, so pg_restore cannot reach the end
of its archive (and COMMIT) before the comparison; on a mismatch it is killed first.

Where it goes:
- `create`: into a temporary database `<name>_restoring_<id>`, renamed to `<name>` only when pg_restore
  exited 0 (dropped on any failure): the target name never holds a half-restored database.
- `replace`: `pg_restore --clean --if-exists --single-transaction` into the existing database: a failure
  or a killed pg_restore rolls the whole restore back, the database keeps its previous contents.

`jobs > 1` needs a seekable archive: the object is downloaded (decompressed) into a temporary file after
a free-space check, its sha256 compared, and only then does `pg_restore --jobs` start.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import sql

from flows.core.catalog import Backup, Catalog
from flows.core.errors import ConfigurationError, DatabaseMissing, DbopsError, TransientError, is_transient
from flows.core.identity import DatabaseIdentity, Guard, identify_database
from flows.core.layout import MANIFEST_SUFFIX
from flows.core.leases import release_lease, take_lease
from flows.core.listing import (  # noqa: F401 - moved to flows.core.listing, still importable from here
    age_hours,
    format_table,
    is_stale,
    stale_message,
    staleness_hours,
)
from flows.core.manifest import Manifest
from flows.core.objectstore import ObjectStore
from flows.core.pgtools import MAX_IDENTIFIER, PgTool, StderrCollector, classify_pg_failure, error_summary
from flows.core.postgres import ConnParams, connect, libpq_environment, scrub
from flows.core.streams import DecompressionError, decompress_stream, hashing

Mode = Literal["create", "replace"]
#: free space wanted beyond the archive itself when downloading for `jobs > 1`
DISK_MARGIN = 1.10
DISK_SLACK = 256 * 1024 * 1024


class RestoreFailed(DbopsError):
    """pg_restore failed; the target was left as it was (create: temp dropped, replace: rolled back)."""


class RestoreInterrupted(TransientError):
    """pg_restore lost its connection: nothing was committed, a new attempt may succeed."""


class ChecksumMismatch(RestoreFailed):
    """The stored object is not the one the manifest describes."""


class BackupNotFound(ConfigurationError):
    pass


class RestoreRefused(ConfigurationError):
    """Protected target without the matching confirm, or a target that must (not) exist."""


class NotEnoughSpace(DbopsError):
    pass


# -- choosing the backup -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    kind: Literal["latest", "before", "key"]
    before: datetime | None = None
    key: str | None = None

    def describe(self) -> str:
        if self.kind == "before":
            return f"latest before {self.before:%Y-%m-%dT%H:%M:%SZ}"
        return self.kind if self.kind == "latest" else f"key {self.key}"


_BEFORE_RE = re.compile(r"^\s*latest\s+before\s+(?P<ts>.+?)\s*$", re.IGNORECASE)


def parse_timestamp(text: str) -> datetime:
    """ISO 8601 (`2026-03-01T14:00:00Z`, `2026-03-01 14:00`, `20260301T140000Z`); naive means UTC."""
    text = text.strip()
    compact = re.fullmatch(r"(\d{8})T(\d{6})Z?", text)
    try:
        when = (
            datetime.strptime("".join(compact.groups()), "%Y%m%d%H%M%S")
            if compact
            else datetime.fromisoformat(text.replace("Z", "+00:00"))
        )
    except ValueError:
        raise ConfigurationError(
            f"{text!r} is not a timestamp; use ISO 8601 such as 2026-03-01T14:00:00Z"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def parse_selector(text: str) -> Selector:
    """`latest`, `latest before <timestamp>`, or a key (dump key, manifest key, stem or file name)."""
    text = (text or "latest").strip()
    if text.lower() == "latest":
        return Selector("latest")
    m = _BEFORE_RE.match(text)
    if m:
        return Selector("before", before=parse_timestamp(m.group("ts")))
    return Selector("key", key=text)


def _names_of(backup: Backup) -> set[str]:
    stem = backup.stem
    name = stem.rsplit("/", 1)[-1]
    dump = backup.manifest.dump_key
    return {stem, name, dump, dump.rsplit("/", 1)[-1], stem + MANIFEST_SUFFIX, name + MANIFEST_SUFFIX}


def select_backup(catalog: Catalog, selector: Selector, database: str) -> Backup:
    """The backup a selector names; only backups with a manifest are candidates."""
    if not catalog.backups:
        orphans = len(catalog.orphans)
        note = f" ({orphans} dump(s) without a manifest are not backups)" if orphans else ""
        raise BackupNotFound(
            f"no backups of {database!r} in this storage and prefix{note}; check source_database, storage "
            "and prefix (`dbops backups list` shows what exists)"
        )
    if selector.kind == "latest":
        return catalog.backups[0]
    if selector.kind == "before":
        assert selector.before is not None
        # A pg_dump archive holds the database as of the dump's start (its snapshot).
        older = [b for b in catalog.backups if b.manifest.started_at < selector.before]
        if not older:
            oldest = min(b.manifest.started_at for b in catalog.backups)
            raise BackupNotFound(
                f"no backup of {database!r} was started before {selector.before:%Y-%m-%d %H:%M:%S} UTC; the "
                f"oldest one started at {oldest:%Y-%m-%d %H:%M:%S} UTC"
            )
        return max(older, key=lambda b: (b.manifest.started_at, b.stem))
    key = (selector.key or "").strip("/")
    for backup in catalog.backups:
        if key in _names_of(backup) or key.rstrip("/").endswith("/" + backup.manifest.dump_key):
            return backup
    raise BackupNotFound(
        f"{key!r} is not a backup of {database!r} with a manifest; pick a key from `dbops backups list`"
    )


# -- where it goes -----------------------------------------------------------------------------------------


def require_confirmation(protected: bool, database: str, confirm: str | None) -> None:
    """A protected database is only restored into when `confirm` is its exact name."""
    if protected and (confirm or "") != database:
        raise RestoreRefused(
            f"database {database!r} is protected; restoring into it replaces production data, so the run "
            f"needs confirm={database!r} (nothing was touched)"
        )


def require_globals_confirmation(apply_globals: bool, params: ConnParams, confirm: str | None) -> None:
    """Roles are server-wide: applying a roles file is only done when `confirm` is the target's name,
    protected or not, because it can create roles every database on that server sees."""
    if apply_globals and (confirm or "") != params.database:
        raise RestoreRefused(
            f"globals=true creates roles and tablespaces on the whole server {params.host}:{params.port}, "
            f"not only in {params.database!r}, so the run needs confirm={params.database!r} (nothing was "
            "touched)"
        )


def temporary_name(target: str, run_id: str | None = None) -> str:
    """`<target>_restoring_<id>`, shortened so PostgreSQL does not truncate it (63 bytes)."""
    suffix = f"_restoring_{run_id or secrets.token_hex(4)}"
    head = target.encode()[: MAX_IDENTIFIER - len(suffix.encode())].decode(errors="ignore")
    return head + suffix


def database_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def create_database(conn: psycopg.Connection, name: str) -> None:
    """An empty database from template0 (what pg_restore of a custom archive expects)."""
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))


def drop_database(conn: psycopg.Connection, name: str) -> None:
    """Drop it even when a session is still connected (WITH (FORCE), PostgreSQL 13+)."""
    force = conn.info.server_version >= 130000
    query = sql.SQL("DROP DATABASE IF EXISTS {}" + (" WITH (FORCE)" if force else "")).format(
        sql.Identifier(name)
    )
    conn.execute(query)


def rename_database(conn: psycopg.Connection, old: str, new: str) -> None:
    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))


# -- disk space --------------------------------------------------------------------------------------------


def space_needed(raw_bytes: int, margin: float = DISK_MARGIN) -> int:
    return int(raw_bytes * margin) + DISK_SLACK


def check_disk_space(directory: str | os.PathLike[str], raw_bytes: int, margin: float = DISK_MARGIN) -> int:
    """Free bytes in `directory`; raises when the decompressed archive (plus margin) would not fit."""
    free = shutil.disk_usage(directory).free
    needed = space_needed(raw_bytes, margin)
    if free < needed:
        raise NotEnoughSpace(
            f"{directory} has {free / 2**30:.1f} GiB free, the archive needs {needed / 2**30:.1f} GiB "
            f"({raw_bytes} bytes + margin) for jobs > 1; free space, point options.workdir elsewhere, "
            "or use jobs=1 (streams, needs no disk)"
        )
    return free


# -- running pg_restore ------------------------------------------------------------------------------------


@dataclass
class RestoreResult:
    key: str
    database: str  # where it ended up
    mode: Mode
    jobs: int
    method: Literal["stream", "file"]
    bytes: int  # stored bytes read
    raw_bytes: int  # archive bytes pg_restore read
    sha256: str
    started_at: datetime
    ended_at: datetime
    argv: list[str] = field(default_factory=list)
    warnings: str = ""
    identity: DatabaseIdentity | None = None  # create: the database as renamed, read on that connection

    @property
    def seconds(self) -> float:
        return max((self.ended_at - self.started_at).total_seconds(), 1e-6)


def pg_restore_argv(
    tool: PgTool,
    params: ConnParams,
    *,
    jobs: int = 1,
    clean: bool = False,
    single_transaction: bool = False,
    no_owner: bool = False,
    archive: str | None = None,
) -> list[str]:
    """Connection details in --dbname without the password (that comes from the passfile)."""
    argv = [str(tool.path), "--no-password", "--exit-on-error", f"--dbname={params.conninfo()}"]
    if clean:
        argv += ["--clean", "--if-exists"]
    if single_transaction:
        argv.append("--single-transaction")
    if jobs > 1:
        argv.append(f"--jobs={jobs}")
    if no_owner:
        argv += ["--no-owner", "--no-privileges"]
    if archive:
        argv.append(archive)
    return argv


def session_options(lock_timeout_s: int | None) -> dict[str, str]:
    """PGOPTIONS for pg_restore's session: a lock wait ends (and is retried) instead of queueing forever."""
    return {"PGOPTIONS": f"-c lock_timeout={int(lock_timeout_s * 1000)}"} if lock_timeout_s else {}


def _failure(rc: int, stderr: str, params: ConnParams, where: str) -> Exception:
    text = scrub(stderr, params.password).strip()
    summary = error_summary(text) if text else ""
    if rc < 0 or is_transient(classify_pg_failure("pg_restore", rc, stderr, params)):
        return RestoreInterrupted(
            f"pg_restore into {where} was interrupted (exit {rc}{': ' + summary if summary else ''}); "
            "nothing was committed, it will be retried"
        )
    return RestoreFailed(
        f"pg_restore into {where} failed (exit {rc}: {summary or 'no message'}); nothing was committed, "
        "see the log for pg_restore's output"
    )


def _mismatch(key: str, manifest: Manifest, sha: str, size: int, why: str = "") -> ChecksumMismatch:
    return ChecksumMismatch(
        f"{key} does not match its manifest ({why or f'sha256 {sha[:16]}…, {size} bytes'}; the manifest says "
        f"sha256 {manifest.sha256[:16]}…, {manifest.bytes} bytes): the stored object is corrupt, "
        "pg_restore was stopped before it committed anything; restore an older backup"
    )


def stream_restore(
    store: ObjectStore,
    manifest: Manifest,
    params: ConnParams,
    tool: PgTool,
    *,
    clean: bool = False,
    single_transaction: bool = False,
    no_owner: bool = False,
    mode: Mode = "create",
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    timeout_s: float | None = None,
    lock_timeout_s: int | None = None,
) -> RestoreResult:
    """Stream the stored object into pg_restore (jobs=1); the last chunk waits for the sha256 check."""
    key = manifest.dump_key
    argv = pg_restore_argv(
        tool, params, clean=clean, single_transaction=single_transaction, no_owner=no_owner
    )
    started = datetime.now(UTC)
    digest = hashlib.sha256()
    stored = [0]
    fed = 0
    with libpq_environment(params) as env:
        env.update(session_options(lock_timeout_s))
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        errors = StderrCollector(proc.stderr)
        errors.start()
        if on_start:
            on_start(proc)
        assert proc.stdin is not None
        feeding = True
        decode_error = ""
        try:
            pending: bytes | None = None
            chunks = decompress_stream(manifest.compression, hashing(store.get_stream(key), digest, stored))
            try:
                for chunk in chunks:
                    if feeding and pending is not None:
                        try:
                            proc.stdin.write(pending)
                            fed += len(pending)
                        except BrokenPipeError:
                            feeding = False  # pg_restore stopped: keep reading to finish the sha256
                        if progress:
                            progress(fed)
                    pending = chunk
            except Exception as exc:  # zstd could not decode: the object is corrupt
                if isinstance(exc, DecompressionError):
                    decode_error = f"zstd cannot decompress it: {exc}"
                    for _ in hashing(store.get_stream(key), hashlib.sha256(), [0]):
                        pass  # the object is readable, the failure is in its bytes
                else:
                    raise
            sha = digest.hexdigest()
            if decode_error or sha != manifest.sha256 or stored[0] != manifest.bytes:
                proc.kill()  # before the last chunk, so before pg_restore can commit
                proc.wait()
                raise _mismatch(key, manifest, sha, stored[0], decode_error)
            if feeding and pending is not None:
                try:
                    proc.stdin.write(pending)
                    fed += len(pending)
                except BrokenPipeError:
                    pass
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            rc = proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = scrub(errors.text(), params.password)
    if rc != 0:
        raise _failure(rc, stderr, params, params.database)
    return RestoreResult(
        key=key,
        database=params.database,
        mode=mode,
        jobs=1,
        method="stream",
        bytes=stored[0],
        raw_bytes=fed,
        sha256=sha,
        started_at=started,
        ended_at=datetime.now(UTC),
        argv=argv[1:],
        warnings=stderr.strip(),
    )


def download_archive(
    store: ObjectStore,
    manifest: Manifest,
    path: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Write the decompressed archive to `path`, checking the stored bytes' sha256; (stored, raw) bytes."""
    key = manifest.dump_key
    digest = hashlib.sha256()
    stored = [0]
    raw = 0
    try:
        with open(path, "wb") as f:
            hashed = hashing(store.get_stream(key), digest, stored)
            for chunk in decompress_stream(manifest.compression, hashed):
                f.write(chunk)
                raw += len(chunk)
                if progress:
                    progress(raw)
    except Exception as exc:
        if isinstance(exc, DecompressionError):
            raise _mismatch(key, manifest, "", stored[0], f"zstd cannot decompress it: {exc}") from None
        raise
    sha = digest.hexdigest()
    if sha != manifest.sha256 or stored[0] != manifest.bytes:
        raise _mismatch(key, manifest, sha, stored[0])
    return stored[0], raw


def file_restore(
    store: ObjectStore,
    manifest: Manifest,
    params: ConnParams,
    tool: PgTool,
    *,
    jobs: int,
    workdir: str | None = None,
    no_owner: bool = False,
    mode: Mode = "create",
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
    timeout_s: float | None = None,
    lock_timeout_s: int | None = None,
) -> RestoreResult:
    """Download (sha256 checked) to a temporary file, then `pg_restore --jobs` from it."""
    directory = workdir or tempfile.gettempdir()
    free = check_disk_space(directory, manifest.raw_bytes)
    log(
        f"jobs={jobs} needs a seekable archive: downloading {manifest.raw_bytes / 2**20:.1f} MiB to "
        f"{directory} ({free / 2**30:.1f} GiB free) before pg_restore starts"
    )
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="dbops-restore-", dir=directory) as tmp:
        path = Path(tmp) / "archive.dump"
        t0 = time.monotonic()
        stored, raw = download_archive(store, manifest, path, progress=progress)
        log(f"downloaded and sha256-checked in {time.monotonic() - t0:.1f} s; pg_restore --jobs={jobs} runs")
        argv = pg_restore_argv(tool, params, jobs=jobs, no_owner=no_owner, archive=str(path))
        with libpq_environment(params) as env:
            env.update(session_options(lock_timeout_s))
            try:
                proc = subprocess.run(argv, capture_output=True, env=env, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise RestoreFailed(
                    f"pg_restore into {params.database} did not finish in {timeout_s:.0f} s; it was stopped"
                ) from None
    stderr = scrub(proc.stderr.decode(errors="replace"), params.password)
    if proc.returncode != 0:
        raise _failure(proc.returncode, stderr, params, params.database)
    return RestoreResult(
        key=manifest.dump_key,
        database=params.database,
        mode=mode,
        jobs=jobs,
        method="file",
        bytes=stored,
        raw_bytes=raw,
        sha256=manifest.sha256,
        started_at=started,
        ended_at=datetime.now(UTC),
        argv=argv[1:-1],
        warnings=stderr.strip(),
    )


# -- the whole restore -------------------------------------------------------------------------------------


@dataclass
class RestoreRequest:
    """Everything `restore_backup` needs; holds no Prefect object."""

    store: ObjectStore
    backup: Backup
    target: ConnParams  # its .database is the database to create or replace
    tool: PgTool
    mode: Mode = "create"
    jobs: int = 1
    no_owner: bool = False
    maintenance_database: str = "postgres"
    workdir: str | None = None
    run_id: str | None = None
    timeout_s: float | None = None
    lock_timeout_s: int | None = None
    #: re-checked on the maintenance connection before every DROP, rename and replace (None: unchecked)
    guard: Guard | None = None


#: how long a reader's lease outlives its own time limit (a reader that died holds the backup until then)
LEASE_MARGIN = timedelta(hours=1)
LEASE_WITHOUT_TIMEOUT = timedelta(hours=24)


def restore_backup(
    req: RestoreRequest,
    *,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> RestoreResult:
    """create: temporary database, renamed on success, dropped on failure; replace: one transaction.

    With a guard, the target is re-identified on the maintenance connection right before each step that
    drops, renames onto or replaces it: a block that now leads to another server, or a database that was
    recreated since the plan, or a protected one, is refused before anything happens to it.

    The backup is leased while it is read (`<stem>.reading-<run>.json`), so retention never deletes it
    under the restore; the lease is removed afterwards, whatever happened.
    """
    ttl = (timedelta(seconds=req.timeout_s) if req.timeout_s else LEASE_WITHOUT_TIMEOUT) + LEASE_MARGIN
    reader = f"{req.run_id or 'manual'}-{secrets.token_hex(4)}"
    lease = take_lease(req.store, req.backup.stem, reader, f"restore into {req.target.database}", ttl)
    try:
        return _restore_backup(req, progress=progress, log=log, on_start=on_start)
    finally:
        try:
            release_lease(req.store, lease)
        except Exception as exc:  # it expires on its own; the restore's outcome matters more
            log(f"could not remove the read lease {lease} ({exc}); it expires by itself")


def _restore_backup(
    req: RestoreRequest,
    *,
    progress: Callable[[int], None] | None,
    log: Callable[[str], None],
    on_start: Callable[[subprocess.Popen[bytes]], None] | None,
) -> RestoreResult:
    name = req.target.database

    def guard(conn: psycopg.Connection) -> None:
        if req.guard is not None:
            req.guard.check(conn)

    admin = req.target.with_database(req.maintenance_database)
    manifest = req.backup.manifest
    if req.mode == "replace":
        if req.jobs > 1:
            raise ConfigurationError(
                "mode=replace runs pg_restore in one transaction so a failure rolls back, and pg_restore "
                "cannot combine --single-transaction with --jobs; use jobs=1, or mode=create into a new name"
            )
        with connect(admin) as conn:
            guard(conn)
            if not database_exists(conn, name):
                raise DatabaseMissing(
                    f"database {name!r} does not exist on {admin.host}:{admin.port}, so there is nothing to "
                    "replace; use mode=create"
                )
        log(f"replacing the contents of {name} in one transaction (pg_restore --clean --if-exists)")
        return stream_restore(
            req.store,
            manifest,
            req.target,
            req.tool,
            clean=True,
            single_transaction=True,
            no_owner=req.no_owner,
            mode="replace",
            progress=progress,
            on_start=on_start,
            timeout_s=req.timeout_s,
            lock_timeout_s=req.lock_timeout_s,
        )

    temp = temporary_name(name, req.run_id)
    with connect(admin) as conn:
        guard(conn)
        if database_exists(conn, name):
            raise RestoreRefused(
                f"database {name!r} already exists on {admin.host}:{admin.port}; mode=create only restores "
                "into a new database: pick another target, or use mode=replace"
            )
        drop_database(conn, temp)  # a leftover of an earlier attempt with the same run id
        create_database(conn, temp)
    log(f"restoring into temporary database {temp}; it becomes {name} only when pg_restore succeeds")
    ok = False
    try:
        into = req.target.with_database(temp)
        if req.jobs > 1:
            result = file_restore(
                req.store,
                manifest,
                into,
                req.tool,
                jobs=req.jobs,
                workdir=req.workdir,
                no_owner=req.no_owner,
                progress=progress,
                log=log,
                timeout_s=req.timeout_s,
            )
        else:
            result = stream_restore(
                req.store,
                manifest,
                into,
                req.tool,
                no_owner=req.no_owner,
                progress=progress,
                on_start=on_start,
                timeout_s=req.timeout_s,
            )
        with connect(admin) as conn:
            guard(conn)
            rename_database(conn, temp, name)
            identity = identify_database(conn, name) if req.guard is not None else None
        ok = True
    finally:
        if not ok:
            try:
                with connect(admin) as conn:
                    guard(conn)
                    drop_database(conn, temp)
            except Exception as exc:  # the restore's own error matters more; say what is left behind
                log(f"could not drop temporary database {temp} ({exc}); drop it by hand")
    result.database = name
    result.identity = identity
    result.ended_at = datetime.now(UTC)
    return result
