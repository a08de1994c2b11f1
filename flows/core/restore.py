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

Choosing the backup is `restore_choice`, the database statements `database_admin`, running pg_restore
`pg_restore`; this module puts them together under a read lease and the target's guard.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg

from flows.core.catalog import Backup
from flows.core.database_admin import (
    create_database,
    database_exists,
    drop_database,
    rename_database,
    temporary_name,
)
from flows.core.errors import ConfigurationError, DatabaseMissing
from flows.core.identity import Guard, identify_database
from flows.core.leases import release_lease, take_lease
from flows.core.objectstore import ObjectStore
from flows.core.pg_restore import Mode, RestoreResult, file_restore, stream_restore
from flows.core.pgtools import PgTool
from flows.core.postgres import ConnParams, connect
from flows.core.restore_choice import RestoreRefused

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
