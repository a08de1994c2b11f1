"""copy_backups: bring every copy location up to date with the primary (a new copy location, or after an
outage), as a flow. `dbops backups sync` runs the same steps from a terminal.

1. locations  open the primary and its copies; the same place under two names is refused
2. primary    read the primary's catalog once: its verified dumps and base backups
3. plan       per copy: the primary backups its retention keeps (its own policy, else the flow's, else all),
              minus those it already holds verified (flows.core.copy_plan)
4. copy       oldest first, each with its sha256 checked and its manifest written last
              (flows.tasks.copies.copy_backup_to); a dry run copies nothing
5. report     a table per location (copied, already there, failed); a location that could not be brought
              up to date fails the run, naming it, after every other location was tried
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from blocks.storage import load_locations
from flows.core.copies import CopyReport
from flows.core.copy_plan import (
    CopiesBehind,
    Kinds,
    LocationSync,
    check_synced,
    failed_location,
    sync_location,
    sync_rows,
)
from flows.core.layout import check_location
from flows.core.locations import StorageList, StorageLocation
from flows.core.retention import RetentionPolicy
from flows.tasks.common import (
    artifact_key,
    failed_state,
    failure_sentence,
    judged_description,
    publish_failure,
)
from flows.tasks.copies import copy_backup_to, plan_copy_to, read_primary_backups


class CopyBackupsReport(BaseModel):
    database: str = Field(description="The database name in the object layout.")
    primary: str = Field(description="The primary location's block slug.")
    dry_run: bool = Field(description="Planned only, nothing copied.")
    locations: list[LocationSync] = Field(description="One entry per copy location.")


@flow(name="copy-backups", log_prints=True)
def copy_backups(
    database: str,
    storage: StorageList,
    prefix: str = "",
    retention: RetentionPolicy | None = None,
    kinds: Kinds = "both",
    dry_run: bool = False,
) -> CopyBackupsReport:
    """Copy the primary's verified backups that each copy location lacks, within its retention.

    Args:
        database: The database name in the object layout (the folder under the prefix), e.g.
            imagemanager, as restore's source_database.
        storage: The primary first, then the copies: one block slug, a comma-separated string of slugs,
            or a list of slugs and locations with their own retention, storage class and encryption.
        prefix: Folder inside the storage for this environment's backups (e.g. prod); may be empty.
        retention: Retention for copy locations without their own: only the primary backups it keeps are
            copied; empty: every verified backup.
        kinds: dumps, base (base backups) or both (default).
        dry_run: Plan and report what would be copied; copy nothing.
    """
    try:
        check_location(prefix, database)
        # 1. locations
        locations = load_locations(storage)
        primary, copies = locations[0], locations[1:]
        if not copies:  # an installation with one location: nothing to bring up to date, not a fault
            get_run_logger().warning(
                "storage names only the primary (%s): there is no copy location to fill; add copies after "
                "it, e.g. s3-bucket/backups,s3-bucket/backups-eu",
                primary.slug,
            )
        # 2. primary
        backups = read_primary_backups(primary.settings, prefix, database, kinds)
        now = datetime.now(UTC)
        results: list[LocationSync] = []
        for copy in copies:
            try:
                # 3. plan
                policy = copy.settings.retention or retention
                plan = plan_copy_to(backups, copy.settings, prefix, database, kinds, policy, now)
            except Exception as exc:  # this location only: the others are still tried
                results.append(failed_location(copy.slug, exc))
                continue

            # 4. copy
            def copy_one(key: str, target: StorageLocation = copy.settings) -> CopyReport:
                return copy_backup_to(primary.settings, target, key)

            results.append(sync_location(plan, copy_one, dry_run=dry_run))
        # 5. report
        return _report(
            CopyBackupsReport(database=database, primary=primary.slug, dry_run=dry_run, locations=results)
        )
    except Exception as exc:
        return publish_failure(artifact_key("copy-backups", database), f"Copying {database}'s backups", exc)


def _report(report: CopyBackupsReport) -> CopyBackupsReport:
    """The table artifact; a location left behind makes the run Failed with its sentence on top."""
    behind: CopiesBehind | None = None
    try:
        check_synced(report.locations)
    except CopiesBehind as exc:
        behind = exc
    summary = f"Copies of {report.database}'s backups from {report.primary}" + (
        " (dry run: nothing copied)" if report.dry_run else ""
    )
    create_table_artifact(
        key=artifact_key("copy-backups", report.database),
        table=sync_rows(report.locations),
        description=judged_description(summary, failure_sentence(behind) if behind else None),
    )
    if behind is not None:
        return failed_state(behind)
    return report
