"""Copying a backup to another location: the one task the nightly dump, the base backup and the
copy-backups flow share, so every copy is made, checked and recorded the same way (flows.core.copies)."""

from __future__ import annotations

from prefect import get_run_logger

from blocks.storage import load_store
from flows.core.copies import CopyReport, copy_backup
from flows.core.locations import StorageRef, slug_of
from flows.tasks.common import dbops_task, human_bytes


@dbops_task("copy_backup_to")
def copy_backup_to(primary: StorageRef, copy: StorageRef, manifest_key: str) -> CopyReport:
    """Copy one verified backup (dump or base backup, named by its manifest key) from the primary to a
    copy location, its manifest last. Transient storage faults are retried; copying what is already there
    is a no-op, so a retry after a half-done attempt is safe."""
    report = copy_backup(load_store(primary), load_store(copy), manifest_key, location=slug_of(copy))
    logger = get_run_logger()
    if report.skipped:
        logger.info("%s is already in %s (verified); nothing copied", manifest_key, report.location)
    else:
        logger.info(
            "copied %s to %s (%s, %s in %.1f s, sha256 checked)",
            manifest_key,
            report.location,
            report.method,
            human_bytes(report.bytes),
            report.seconds,
        )
    return report
