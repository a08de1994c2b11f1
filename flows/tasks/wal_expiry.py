"""The WAL expiry step of the base_backup flow, run after base-backup retention decided what is kept in
every location (the primary and its copies share one WAL archive)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from prefect import get_run_logger

from flows.core.base_layout import BaseBackupManifest
from flows.core.locations import StorageRef, slug_of
from flows.core.wal_archive import ArchiveLocation
from flows.core.wal_expiry import (
    KeptEverywhere,
    LocationCatalog,
    WalExpiryReport,
    expire_directory,
    expire_store,
    kept_in_any_location,
    plan_expiry,
)
from flows.tasks.base_backup import read_base_backup_catalog
from flows.tasks.common import dbops_task, failure_sentence
from flows.tasks.wal import open_archive


@dbops_task("expire_wal")
def expire_wal(
    archive: ArchiveLocation,
    kept: list[BaseBackupManifest],
    wal_keep_days: int = 2,
    wal_max_age_days: int | None = None,
    dry_run: bool = False,
) -> WalExpiryReport:
    """Remove the WAL no kept base backup needs; `dry_run` returns the plan and removes nothing.

    `kept` is every base backup retention keeps (usable or not: a kept one's WAL is never removed). A
    blocked plan (listing failed half way, another tool's layout) is returned with its reason, not
    raised: the base backup itself succeeded, and the next run tries again. The caller decides whether a
    blocked expiry fails its run.
    """
    logger = get_run_logger()
    wal = open_archive(archive)
    plan = plan_expiry(
        wal, kept, datetime.now(UTC), wal_keep_days, wal_max_age_days, where=archive.describe()
    )
    plan = plan.model_copy(update={"dry_run": dry_run})
    if plan.status != "planned" or dry_run:
        log = logger.warning if plan.blocked else logger.info
        log("WAL expiry of %s: %s: %s", archive.describe(), plan.status, plan.reason)
        return plan
    if archive.directory:
        server = kept[0].server_version_num if kept else 0
        done = expire_directory(plan, Path(archive.directory), server)
    else:
        done = expire_store(plan, wal)
    logger.info(
        "WAL expiry of %s: %s %d segment(s) %s..%s (%d bytes) by %s, keeping from %s",
        archive.describe(),
        done.status,
        done.deleted,
        done.first,
        done.last,
        done.bytes,
        done.method,
        done.cut,
    )
    return done


def kept_base_backups(
    locations: Sequence[tuple[StorageRef, frozenset[str]]], prefix: str, database: str
) -> KeptEverywhere:
    """The base backups kept in any location after retention (each with the stems a dry run would remove
    there): the primary's and every copy's, read afresh. A location that cannot be read blocks expiry."""
    catalogs: list[LocationCatalog] = []
    for where, gone in locations:
        try:
            catalog = read_base_backup_catalog(where, prefix, database)
        except Exception as exc:  # unreachable, no bucket, a listing that broke off: fail closed
            catalogs.append(LocationCatalog(slug_of(where), None, error=failure_sentence(exc)))
            continue
        catalogs.append(LocationCatalog(slug_of(where), catalog, gone=gone))
    return kept_in_any_location(catalogs)
