"""`dbops backups sync`: bring copy locations up to date with the primary from a terminal, without a
Prefect run. It plans and copies exactly as the copy-backups flow does (flows.core.copy_plan and
flows.core.copies), so both copy the same backups the same way.

    dbops backups sync --database imagemanager --storage s3-bucket/backups,s3-bucket/backups-eu \\
        [--prefix prod] [--retention '{"keep_daily": 7}'] [--kinds dumps|base|both] [--dry-run]

Exit codes: 0 every copy location is up to date (or, with --dry-run, was planned), 1 a location could
not be brought up to date (named on stderr; the others were still tried), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from datetime import UTC, datetime

from flows.core.errors import ConfigurationError


def backups_sync(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from blocks.storage import load_locations
    from flows.core.copies import CopyReport, copy_backup
    from flows.core.copy_plan import (
        LocationSync,
        check_synced,
        failed_location,
        plan_copy,
        read_primary,
        sync_location,
        sync_rows,
    )
    from flows.core.layout import check_location
    from flows.core.listing import format_table
    from flows.core.objectstore import ObjectStore
    from flows.core.retention import RetentionPolicy

    if not args.storage:
        print(
            "dbops: --storage is required (or set DBOPS_STORAGE), e.g. s3-bucket/a,s3-bucket/b",
            file=sys.stderr,
        )
        return 2
    check_location(args.prefix, args.database)
    try:
        retention = RetentionPolicy.model_validate_json(args.retention) if args.retention else None
    except ValidationError as exc:
        raise ConfigurationError(
            f"--retention is not a retention policy ({exc.errors()[0]['msg']})"
        ) from None
    locations = load_locations(args.storage)
    primary, copies = locations[0], locations[1:]
    if not copies:
        raise ConfigurationError(
            f"--storage names only the primary ({primary.slug}); add the copy locations after it, "
            "e.g. s3-bucket/backups,s3-bucket/backups-eu"
        )
    backups = read_primary(primary.store, args.prefix, args.database, args.kinds)
    now = datetime.now(UTC)
    reader = f"sync-{secrets.token_hex(6)}"  # names this sync's read leases on the primary
    results: list[LocationSync] = []
    for copy in copies:
        try:
            policy = copy.settings.retention or retention
            plan = plan_copy(
                backups, copy.store, args.prefix, args.database, args.kinds, policy, now, copy.slug
            )
        except Exception as exc:  # this location only: the others are still tried
            results.append(failed_location(copy.slug, exc))
            continue

        def copy_one(key: str, store: ObjectStore = copy.store, slug: str = copy.slug) -> CopyReport:
            report = copy_backup(primary.store, store, key, location=slug, reader=reader)
            print(f"{slug}: {'already there' if report.skipped else 'copied (' + report.method + ')'} {key}")
            return report

        results.append(sync_location(plan, copy_one, dry_run=args.dry_run))
    print(format_table(sync_rows(results), ["location", "copied", "already there", "failed"]))
    for result in results:
        for key in result.would_copy:
            print(f"{result.location}: would copy {key}")
    check_synced(results)  # raises the one sentence naming the locations behind: exit 1
    return 0


def register_sync(actions: argparse._SubParsersAction) -> None:
    sync = actions.add_parser(
        "sync", help="copy the primary's verified backups that copy locations lack (within their retention)"
    )
    sync.add_argument(
        "--database", required=True, help="database name in the object layout, e.g. imagemanager"
    )
    sync.add_argument(
        "--storage",
        default=os.environ.get("DBOPS_STORAGE"),
        help="the primary, then the copies: comma-separated block slugs (default: $DBOPS_STORAGE)",
    )
    sync.add_argument("--prefix", default=os.environ.get("DBOPS_PREFIX", ""), help="folder in the storage")
    sync.add_argument(
        "--retention",
        help="JSON retention policy for copies without their own, e.g. '{\"keep_daily\": 7}' (default: all)",
    )
    sync.add_argument("--kinds", choices=["dumps", "base", "both"], default="both", help="what to copy")
    sync.add_argument("--dry-run", action="store_true", help="say what would be copied, copy nothing")
    sync.set_defaults(func=backups_sync)
