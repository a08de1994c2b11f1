"""Tasks of the backup runbook: each does one thing to the world and owns its retry policy."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prefect import get_run_logger
from prefect.runtime import flow_run

from blocks.postgres import load_database
from blocks.storage import load_store
from flows.core.catalog import Catalog, read_catalog
from flows.core.compression import SUFFIX, Compression
from flows.core.dump import DumpResult, ListVerification, dump_globals, stream_dump, verify_stored_dump
from flows.core.errors import (
    DumpFailed,
    ObjectExists,
    PermissionDenied,
    StemTaken,
)
from flows.core.expiry import Cleanup, carry_out, plan_cleanup
from flows.core.layout import backup_stem, check_database_name, dump_key, globals_key, manifest_key
from flows.core.locations import StorageRef
from flows.core.manifest import Manifest, Verification, VerifyMethod, read_manifest
from flows.core.objectstore import part_size_for
from flows.core.pgtools import PgTool, find_tool
from flows.core.postgres import (
    ConnParams,
    ExportedSnapshot,
    alembic_revision,
    database_size,
    dumpable_tables,
    scalar,
    server_version_num,
    table_row_estimates,
    unreadable_tables,
)
from flows.core.retention import RetentionPlan
from flows.tasks.common import Progress, dbops_task, human_bytes
from flows.tasks.session import direct_session


@dataclass
class Preflight:
    """What the dump needs to know before it starts.

    It holds the password: `params` is the block's ConnParams, password included, because pg_dump,
    pg_dumpall and the verification connect with it. Only the repr hides it (ConnParams.__repr__), so a
    Preflight may appear whole in a log line or a traceback, but `params.password` must never be written
    anywhere (log, artifact, manifest), and pickling a Preflight (a persisted result) would store it too.
    """

    block: str
    params: ConnParams
    database: str
    server: str
    server_version: str
    server_version_num: int
    pg_dump: PgTool
    pg_restore: PgTool
    database_bytes: int
    alembic_revision: str | None
    row_estimates: dict[str, int]
    planner_estimates: dict[str, int]
    tables: list[str]


@dbops_task("check_database")
def check_database(database: str, pg_bindir: str | None = None) -> Preflight:
    """Connect, and make sure this machine's pg_dump can dump this server."""
    logger = get_run_logger()
    block = load_database(database)
    params = block.params()
    with direct_session(block) as conn:  # refuses a connection pooler before anything else
        denied = unreadable_tables(conn)
        if denied:
            raise PermissionDenied(
                f"role {params.user!r} cannot read {len(denied)} tables or sequences in "
                f"{params.database} (first: "
                f"{denied[0]}); grant it pg_read_all_data or SELECT on them, or use another role"
            )
        version_num = server_version_num(conn)
        version = str(scalar(conn, "SHOW server_version"))
        size = database_size(conn)
        revision = alembic_revision(conn)
        estimates, planner = table_row_estimates(conn)
        tables = dumpable_tables(conn)
    check_database_name(params.database)  # it names the backup folder: no `..`, no slash
    pg_dump = find_tool("pg_dump", version_num, pg_bindir)
    pg_restore = find_tool("pg_restore", version_num, pg_bindir)
    logger.info(
        "%s: PostgreSQL %s, %s, %d tables, alembic revision %s; using %s %s",
        params.where,
        version,
        human_bytes(size),
        len(tables),
        revision or "none",
        pg_dump.path,
        pg_dump.version,
    )
    return Preflight(
        block=database,
        params=params,
        database=params.database,
        server=f"{params.host}:{params.port}",
        server_version=version,
        server_version_num=version_num,
        pg_dump=pg_dump,
        pg_restore=pg_restore,
        database_bytes=size,
        alembic_revision=revision,
        row_estimates=estimates,
        planner_estimates=planner,
        tables=tables,
    )


@dbops_task("check_storage")
def check_storage(storage: StorageRef, prefix: str) -> str:
    """Write, read back and delete a marker: a dump must not discover at 3 AM that the bucket is gone."""
    store = load_store(storage)
    store.check_writable(prefix or "dbops")
    return store.url


@dbops_task("upload_dump")
def upload_dump(
    pre: Preflight,
    storage: StorageRef,
    prefix: str,
    compression: Compression,
    level: int,
    lock_wait_timeout_s: int,
    min_bytes: int,
    expected_bytes: int | None = None,
    zstd_threads: int = 1,
) -> tuple[str, DumpResult]:
    """Stream pg_dump into storage under a fresh key; a failed attempt leaves nothing behind.

    `expected_bytes` (the previous backup's pg_dump output) only feeds the progress ETA: a dump's size is
    not known until it ends, and last night's is the best guess a person watching has.

    The key is created conditionally (S3 If-None-Match, a hard link locally): of two dumps that started in
    the same second, one wins the name and the other is discarded and retried under the next free name.
    """
    store = load_store(storage)
    when = datetime.now(UTC).replace(microsecond=0)
    stem = backup_stem(prefix, pre.database, when)
    while store.head(manifest_key(stem)) or any(store.head(dump_key(stem, s)) for s in set(SUFFIX.values())):
        when += timedelta(seconds=1)  # taken: the conditional create below settles any race that is left
        stem = backup_stem(prefix, pre.database, when)
    key = dump_key(stem, SUFFIX[compression])
    # Our zstd output is usually a fifth to a third of the database size; part sizes are chosen
    # for the whole database so even an incompressible one stays under S3's 10,000 parts.
    part_size = part_size_for(pre.database_bytes)
    logger = get_run_logger()
    logger.info(
        "dumping %s to %s/%s (part size %s)", pre.params.where, store.url, key, human_bytes(part_size)
    )
    progress = Progress(f"dump of {pre.database}", total=expected_bytes)
    # pg_dump dumps the snapshot in which exact counts of the small tables and the Alembic revision were
    # read, so the manifest says exactly what the dump holds (the restore drill compares against it).
    with ExportedSnapshot(pre.params) as snapshot:

        def on_progress(raw: int, stored: int) -> None:
            if raw:
                snapshot.release()  # pg_dump imported the snapshot before it wrote its first byte
            progress(raw, stored)

        try:
            result = stream_dump(
                pre.params,
                store,
                key,
                tool=pre.pg_dump,
                compression=compression,
                level=level,
                part_size=part_size,
                lock_wait_timeout_s=lock_wait_timeout_s,
                extra_args=[f"--snapshot={snapshot.facts.snapshot}"],
                zstd_threads=zstd_threads,
                progress=on_progress,
                min_bytes=min_bytes,
                if_absent=True,
            )
        except ObjectExists as exc:
            raise StemTaken(
                f"another dump of {pre.database} created {key} first (same second); this copy was discarded "
                "without replacing it, and the task retries under the next free name"
            ) from exc
    result.facts = snapshot.facts
    logger.info(
        "stored %s (%s from %s of pg_dump output) in %.1f s, %s/s",
        key,
        human_bytes(result.bytes),
        human_bytes(result.raw_bytes),
        result.seconds,
        human_bytes(result.raw_bytes / result.seconds),
    )
    return stem, result


@dbops_task("discard_if_implausible")
def discard_if_implausible(
    storage: StorageRef, result: DumpResult, previous_raw_bytes: int, previous_stem: str, min_ratio: float
) -> None:
    """A dump far smaller than the last one is more likely a mistake than a backup: no manifest for it."""
    if min_ratio <= 0 or previous_raw_bytes <= 0:
        return
    ratio = result.raw_bytes / previous_raw_bytes
    if ratio >= min_ratio:
        return
    load_store(storage).delete([result.key])
    raise DumpFailed(
        f"this dump is {human_bytes(result.raw_bytes)}, only {ratio:.0%} of the previous backup "
        f"({human_bytes(previous_raw_bytes)}, {previous_stem.rsplit('/', 1)[-1]}), so it was discarded and "
        "retention did not run; check whether data was deleted or the wrong database is configured, and "
        "lower options.min_ratio_of_previous if the shrink is expected"
    )


@dbops_task("upload_globals")
def upload_globals(pre: Preflight, storage: StorageRef, stem: str) -> str:
    """Roles and tablespaces (no password hashes): needed to restore onto a new server."""
    tool = find_tool("pg_dumpall", pre.server_version_num, str(pre.pg_dump.path.parent))
    data = dump_globals(pre.params, tool)
    key = globals_key(stem)
    load_store(storage).put_bytes(key, data)
    return key


@dbops_task("verify_backup")
def verify_backup(
    pre: Preflight, storage: StorageRef, result: DumpResult, compression: Compression, method: VerifyMethod
) -> ListVerification:
    """Read the stored object back through pg_restore: a dump counts only if it can be read.

    "No tables" is decided from the catalog in the dump's own snapshot (preflight's list otherwise): only
    then is an archive without entries a backup.
    """
    store = load_store(storage)
    head = store.head(result.key)
    if head is None or head.size != result.bytes:
        raise DumpFailed(
            f"{result.key} is {head.size if head else 'missing'} bytes in storage, expected {result.bytes}; "
            "the upload did not land intact"
        )
    verification = verify_stored_dump(
        store,
        result.key,
        compression,
        pre.pg_restore,
        full=(method == "full"),
        expected_sha256=result.sha256,
        expected_tables=pre.tables,
        empty_database=not _tables_at_dump(pre, result),
    )
    get_run_logger().info("verified %s: %s", result.key, verification.detail())
    return verification


def _tables_at_dump(pre: Preflight, result: DumpResult) -> list[str]:
    facts = result.facts
    return facts.tables if facts is not None and facts.tables is not None else pre.tables


@dbops_task("write_manifest")
def write_manifest(
    pre: Preflight,
    storage: StorageRef,
    stem: str,
    result: DumpResult,
    compression: Compression,
    level: int,
    method: VerifyMethod,
    verification: ListVerification | None,
    globals_object: str | None,
) -> Manifest:
    """The manifest goes up last: from this moment the dump is a backup."""
    from flows import __version__

    manifest = Manifest(
        database=pre.database,
        server=pre.server,
        server_version=pre.server_version,
        pg_dump_version=pre.pg_dump.version,
        started_at=result.started_at,
        ended_at=result.ended_at,
        dump_key=result.key,
        bytes=result.bytes,
        raw_bytes=result.raw_bytes,
        sha256=result.sha256,
        compression=compression,
        compression_level=level,
        dump_options=result.argv,
        alembic_revision=result.facts.alembic_revision if result.facts else pre.alembic_revision,
        row_estimates=pre.row_estimates,
        planner_estimates=pre.planner_estimates,
        exact_row_counts=result.facts.exact_row_counts if result.facts else {},
        globals_key=globals_object,
        flow_run_id=str(flow_run.get_id()) if flow_run.get_id() else None,
        verified=verification is not None,
        verification=Verification(
            method=method,
            verified_at=datetime.now(UTC) if verification else None,
            detail=verification.detail() if verification else "not verified (verify=none)",
        ),
        dbops_version=__version__,
    )
    store = load_store(storage)
    try:
        store.put_bytes(manifest_key(stem), manifest.to_json(), if_absent=True)
    except ObjectExists:
        # Ours if an earlier attempt of this task wrote it and only the answer was lost; never replaced.
        existing = read_manifest(store, manifest_key(stem))
        if (existing.dump_key, existing.sha256) != (result.key, result.sha256):
            raise DumpFailed(
                f"another dump already wrote {manifest_key(stem)} (same second); it was not replaced, and "
                f"this dump {result.key} has no manifest (an orphan retention removes); run the dump again"
            ) from None
        return existing
    return manifest


@dbops_task("read_backup_catalog")
def read_backup_catalog(storage: StorageRef, prefix: str, database: str) -> Catalog:
    return read_catalog(load_store(storage), prefix, database)


@dbops_task("plan_cleanup")
def plan_backup_cleanup(
    storage: StorageRef, catalog: Catalog, plan: RetentionPlan, now: datetime, prefix: str, database: str
) -> Cleanup:
    """What retention will delete (expired backups, leftovers, old incomplete uploads) and leave alone."""
    return plan_cleanup(load_store(storage), catalog, plan, now=now, prefix=prefix, database=database)


@dbops_task("delete_expired_backups")
def delete_expired_backups(storage: StorageRef, cleanup: Cleanup, prefix: str, database: str) -> Cleanup:
    """Delete what the cleanup plan found: manifests first, leases looked for again, then the rest."""
    return carry_out(load_store(storage), cleanup, prefix, database)
