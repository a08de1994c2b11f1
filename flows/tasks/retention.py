"""Carrying out a retention plan inside a flow, the same way for dumps and base backups: only after a
verified backup, a dry run deletes nothing, and what was kept, deleted, kept in use and left alone goes
into the run's report and log."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from prefect import get_run_logger

from flows.core.retention import RetentionPlan, RetentionPolicy


class RetentionReport(Protocol):
    """The fields of a flow's report that retention fills in (BackupReport, BaseBackupReport)."""

    verified: bool
    retention: str
    kept: list[str]
    deleted: list[str]
    orphans_removed: list[str]
    in_use: list[str]
    left_alone: list[str]


class CleanupResult(Protocol):
    """What a cleanup plan says (flows.core.expiry.Cleanup, flows.core.base_catalog.BaseCleanup)."""

    expired: dict[str, list[str]]
    in_use: dict[str, str]
    orphans: dict[str, list[str]]
    foreign: list[tuple[str, str]]
    unreadable: list[tuple[str, str]]
    deleted_objects: int
    kept_after_recheck: list[str]

    def summary(self) -> str: ...


C = TypeVar("C", bound=CleanupResult)


def apply_retention(
    report: RetentionReport,
    retention: RetentionPolicy | None,
    dry_run: bool,
    *,
    noun: str,
    plan: Callable[[RetentionPolicy, datetime], tuple[RetentionPlan, C]],
    delete: Callable[[C], C],
) -> None:
    """Only a verified `noun` may replace old ones. `plan(policy, now)` reads the catalog and plans the
    cleanup, `delete(cleanup)` carries it out (a reader's lease keeps what it reads, also one taken
    meanwhile); one function for both kinds, so their reports and logs say the same things."""
    logger = get_run_logger()
    if retention is None:
        report.retention = f"no retention policy: every {noun} is kept"
        return
    if not report.verified:
        report.retention = f"skipped: this {noun} was not verified, so nothing old is removed"
        logger.warning(report.retention)
        return
    retention_plan, cleanup = plan(retention, datetime.now(UTC))
    report.kept = [k.record.stem for k in retention_plan.keep]
    report.in_use = sorted(cleanup.in_use)
    report.left_alone = [f"{key} ({why})" for key, why in cleanup.unreadable + cleanup.foreign]
    if dry_run:
        report.deleted = [r.stem for r in retention_plan.delete if r.stem in cleanup.expired]
        report.retention = f"dry run: {retention_plan.summary()}; would remove {cleanup.summary()}"
    else:
        cleanup = delete(cleanup)
        report.in_use += cleanup.kept_after_recheck
        report.deleted = [
            r.stem for r in retention_plan.delete if r.stem in cleanup.expired and r.stem not in report.in_use
        ]
        report.orphans_removed = sorted(cleanup.orphans)
        report.retention = (
            f"{retention_plan.summary()}; removed {cleanup.deleted_objects} objects ({cleanup.summary()})"
        )
    for stem, who in cleanup.in_use.items():
        logger.info("kept while in use: %s (%s)", stem, who)
    for line in report.left_alone:
        logger.warning("left alone: %s", line)
    logger.info("retention: %s", report.retention)
