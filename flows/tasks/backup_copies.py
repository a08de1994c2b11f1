"""The steps the nightly dump and the base backup share when `storage` lists copies (the 3-2-1 rule).

The order is the point: the primary backup is what matters most at 2 AM, so nothing about a copy may
stop it. A copy location that cannot take a write is recorded at preflight and skipped; copies are made
only after the primary's manifest is written; each location's retention runs with its own policy, but
never in a copy that did not get this run's backup; and a copy that failed ends the run Failed only
after all of that, with one sentence saying the primary is safe and which copy failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prefect import get_run_logger

from blocks.storage import Location, load_locations
from flows.core.copy_outcome import CopiesIncomplete, CopyFault, copies_failure
from flows.core.locations import StorageList, StorageLocation, slug_of
from flows.core.retention import RetentionPolicy
from flows.tasks.backup import check_storage
from flows.tasks.backup_report import LocationReport
from flows.tasks.common import failure_sentence, human_bytes
from flows.tasks.copies import copy_backup_to
from flows.tasks.retention import RetentionReport


def storage_text(storage: StorageList) -> str:
    """A storage parameter as a person wrote it, for a failure report's title (even when it is invalid)."""
    if isinstance(storage, str):
        return storage
    return ", ".join(slug_of(item) for item in storage)


def open_locations(storage: StorageList) -> tuple[StorageLocation, list[Location]]:
    """The primary's settings and the opened copies; refuses a place named twice, before anything is
    written (blocks.storage.load_locations compares what the places are, not what they are called)."""
    locations = load_locations(storage)
    return locations[0].settings, locations[1:]


def check_copies(copies: list[Location], prefix: str) -> list[LocationReport]:
    """Preflight of each copy location: one that cannot take a write is recorded and skipped, the
    primary backup goes on (an unreachable primary fails the run at its own check, as without copies)."""
    logger = get_run_logger()
    rows: list[LocationReport] = []
    for copy in copies:
        try:
            url = check_storage(copy.settings, prefix)
        except Exception as exc:  # any fault of a copy location: the primary backup comes first
            why = failure_sentence(exc)
            logger.warning(
                "copy location %s cannot take a write, the backup goes on without it: %s", copy.slug, why
            )
            rows.append(
                LocationReport(
                    location=copy.slug, url=copy.store.url, role="copy", status="failed", detail=why
                )
            )
            continue
        logger.info("copy location %s is writable", url)
        rows.append(LocationReport(location=copy.slug, url=url, role="copy", status="pending"))
    return rows


def make_copies(
    primary: StorageLocation,
    copies: list[Location],
    rows: list[LocationReport],
    manifest_key: str,
    primary_verified: bool,
) -> None:
    """Copy the backup whose manifest is `manifest_key` from the primary into each copy still pending.

    Only a verified backup is copied (flows.core.copies refuses others): with verify=none the copies are
    skipped and say so, as retention is. A copy is verified (its retention may run) once its sha256 was
    checked against the manifest, which copy_backup_to does before it writes the copy's manifest.
    """
    logger = get_run_logger()
    for copy, row in zip(copies, rows, strict=True):
        if row.status != "pending":
            continue
        if not primary_verified:
            row.status = "skipped"
            row.detail = "this backup was not verified (verify=none), so it is not copied"
            continue
        try:
            done = copy_backup_to(primary, copy.settings, manifest_key)
        except Exception as exc:  # the primary is safe: record the copy's sentence and go on
            row.status = "failed"
            row.detail = failure_sentence(exc)
            logger.error("copy to %s failed: %s", copy.slug, row.detail)
            continue
        row.status = "copied"
        row.verified = True
        row.detail = (
            "already there, verified"
            if done.skipped
            else f"{done.method}, {human_bytes(done.bytes)} in {done.seconds:.1f} s, sha256 checked"
        )


def primary_row(primary: StorageLocation, url: str, report: RetentionReport) -> LocationReport:
    """The primary's row, with the retention the run's own report says ran there."""
    return LocationReport(
        location=primary.block,
        url=url,
        role="primary",
        status="written",
        verified=report.verified,
        retention=report.retention,
        kept=list(report.kept),
        deleted=list(report.deleted),
        orphans_removed=list(report.orphans_removed),
        in_use=list(report.in_use),
        left_alone=list(report.left_alone),
    )


class CopiedReport(RetentionReport, Protocol):
    """What the two backup flows' reports share for steps 6 and 7 (BackupReport, BaseBackupReport)."""

    manifest_key: str
    locations: list[LocationReport]


RunRetention = Callable[[RetentionReport, StorageLocation, RetentionPolicy | None], None]


def copy_then_retain(
    report: CopiedReport,
    primary: StorageLocation,
    primary_url: str,
    copies: list[Location],
    retention: RetentionPolicy | None,
    run: RunRetention,
) -> None:
    """Steps 6 and 7 of both backup flows, in the order that makes copies safe: copies from the primary
    whose manifest is written, then the primary's retention (its own policy, else the flow's), then each
    copy's. `report.locations` is the primary's row followed by the copies' rows from `check_copies`."""
    rows = report.locations[1:]
    make_copies(primary, copies, rows, report.manifest_key, report.verified)
    run(report, primary, primary.retention or retention)
    report.locations[0] = primary_row(primary, primary_url, report)
    retention_in_copies(copies, rows, retention, run)


def retention_in_copies(
    copies: list[Location],
    rows: list[LocationReport],
    retention: RetentionPolicy | None,
    run: RunRetention,
) -> None:
    """Each copy's retention with its own policy (else the flow's), only where this run's copy landed: a
    copy that missed tonight's backup keeps its older ones until a sync brings it up to date. A failure
    here is recorded on the copy's row (the run ends Failed naming it), the other copies still run."""
    logger = get_run_logger()
    for copy, row in zip(copies, rows, strict=True):
        if row.status != "copied":
            row.retention = "skipped: this run's copy did not land here, so nothing is removed"
            continue
        try:
            run(row, copy.settings, copy.settings.retention or retention)
        except Exception as exc:  # the primary and the other copies are fine: say which one failed
            row.retention = f"failed: {failure_sentence(exc)}"
            logger.error("retention in %s failed: %s", copy.slug, row.retention)


def copies_outcome(primary_url: str, key: str, rows: list[LocationReport]) -> CopiesIncomplete | None:
    """The run's failure when a copy (or a copy's retention) did not succeed, else None."""
    faults = [CopyFault(r.location, "copy", r.detail) for r in rows if r.status == "failed"]
    faults += [
        CopyFault(r.location, "retention", r.retention.removeprefix("failed: "))
        for r in rows
        if r.retention.startswith("failed: ")
    ]
    return copies_failure(f"{primary_url}/{key}", faults)
