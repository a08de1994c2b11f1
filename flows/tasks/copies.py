"""Copying a backup to another location: the one task the nightly dump, the base backup and the
copy-backups flow share, so every copy is made, checked and recorded the same way (flows.core.copies)."""

from __future__ import annotations

import secrets
from datetime import datetime

from prefect import get_run_logger
from prefect.runtime import task_run

from blocks.storage import load_store
from flows.core.copies import CopyReport, copy_backup
from flows.core.copy_plan import CopyPlan, Kinds, PrimaryBackups, plan_copy, read_primary
from flows.core.locations import StorageRef, slug_of
from flows.core.retention import RetentionPolicy
from flows.tasks.common import dbops_task, human_bytes


@dbops_task("copy_backup_to")
def copy_backup_to(primary: StorageRef, copy: StorageRef, manifest_key: str) -> CopyReport:
    """Copy one verified backup (dump or base backup, named by its manifest key) from the primary to a
    copy location, its manifest last. Transient storage faults are retried; copying what is already there
    is a no-op, so a retry after a half-done attempt is safe."""
    reader = f"copy-{task_run.id or secrets.token_hex(8)}"
    report = copy_backup(
        load_store(primary), load_store(copy), manifest_key, location=slug_of(copy), reader=reader
    )
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


@dbops_task("read_primary_backups")
def read_primary_backups(primary: StorageRef, prefix: str, database: str, kinds: Kinds) -> PrimaryBackups:
    """The primary's catalogs (dumps, base backups or both), read once for every copy location."""
    return read_primary(load_store(primary), prefix, database, kinds)


@dbops_task("plan_copy_to")
def plan_copy_to(
    primary: PrimaryBackups,
    copy: StorageRef,
    prefix: str,
    database: str,
    kinds: Kinds,
    policy: RetentionPolicy | None,
    now: datetime,
) -> CopyPlan:
    """What this copy location lacks of the primary backups its retention keeps."""
    plan = plan_copy(primary, load_store(copy), prefix, database, kinds, policy, now, slug_of(copy))
    get_run_logger().info(
        "%s: %d backup(s) to copy, %d already there (retention: %s)",
        plan.location,
        len(plan.missing),
        len(plan.present),
        plan.policy,
    )
    return plan
