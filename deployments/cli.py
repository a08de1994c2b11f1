"""`dbops`: the command line of dbops.

    dbops setup [--config FILE] [--notify SLUG] [--alert-window NAME=DURATION ...]
                                                      blocks, work pool, limits, variables, alerts
    dbops deploy [--file prefect.yaml]                check prefect.yaml against the server, then deploy
    dbops migrate --deployment NAME [--param k=v ...] --wait [--timeout S] [--verbose]
    dbops run DEPLOYMENT [--param k=v ...] --wait [--timeout S] [--verbose]
    dbops backups list [--database NAME] [--storage SLUG] [--prefix P] [--json]
                       [--archive-dir DIR | --archive-storage SLUG [--archive-prefix P]]
    dbops health --database NAME [--statement-timeout S] [--no-prescribed]
    dbops backups sync --database NAME --storage PRIMARY,COPY[,COPY] [--prefix P] [--dry-run]
                                                      fill copy locations (deployments/sync_cli.py)

Each command group registers itself in COMMANDS with a function that adds its subparser; the parsed
arguments carry the handler in `func`, which returns the exit code. `dbops setup` and
`dbops migrate --wait` plug in the same way. Before any command runs, `main` settles which Prefect server
it talks to (PREFECT_API_URL, else the local stack's; deployments/apiurl.py) and says so on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flows.core.errors import ConfigurationError, DbopsError

if TYPE_CHECKING:
    from flows.core.objectstore import ObjectStore
    from flows.core.wal_archive import WalArchive

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

Register = Callable[[argparse._SubParsersAction], None]
COMMANDS: list[Register] = []


def command(register: Register) -> Register:
    COMMANDS.append(register)
    return register


# -- dbops backups -----------------------------------------------------------------------------------------


def databases_under(store: ObjectStore, prefix: str) -> list[str]:
    """Database names with a dumps or base-backup folder under the prefix (from the object layout)."""
    from flows.core.base_layout import parse_base_key
    from flows.core.layout import DUMP_RE

    root = prefix.strip("/")
    names = set()
    for info in store.list(f"{root}/" if root else ""):
        m = DUMP_RE.match(info.key)
        rel = info.key[len(root) + 1 :] if root else info.key
        parts = rel.split("/", 2)
        is_base = parts[1:2] == ["base"] and parse_base_key(info.key, root, parts[0]) is not None
        if (m and parts[1:2] == ["dumps"]) or is_base:
            names.add(parts[0])
    return sorted(names)


def archive_of(args: argparse.Namespace) -> WalArchive | None:
    """The WAL archive the recoverable window is read from: a directory, or a storage block + prefix."""
    from blocks.storage import open_archive
    from flows.core.wal_archive import ArchiveLocation

    if args.archive_dir and args.archive_storage:
        raise ConfigurationError("give the WAL archive as --archive-dir or --archive-storage, not both")
    if not args.archive_dir and not args.archive_storage:
        return None
    return open_archive(
        ArchiveLocation(
            directory=args.archive_dir, storage=args.archive_storage, prefix=args.archive_prefix or ""
        )
    )


def backups_list(args: argparse.Namespace) -> int:
    """The same listing as the list-backups flow (flows.core.listing), read through the storage block."""
    from blocks.storage import load_store
    from flows.core.layout import check_location, check_prefix
    from flows.core.listing import BASE_COLUMNS, COLUMNS, BackupListing, format_table, list_backups

    if not args.storage:
        print("dbops: --storage is required (or set DBOPS_STORAGE), e.g. s3-bucket/backups", file=sys.stderr)
        return 2
    check_prefix(args.prefix)
    if args.database:
        check_location(args.prefix, args.database)
    store = load_store(args.storage)
    archive = archive_of(args)
    databases = [args.database] if args.database else databases_under(store, args.prefix)
    if not databases:
        print(f"no backups under {args.storage} prefix {args.prefix!r}")
        return 0
    everything: dict[str, BackupListing] = {
        db: list_backups(store, args.prefix, db, archive=archive) for db in databases
    }
    if args.json:
        rows = {
            db: listing.rows
            + listing.base_rows
            + ([{"recoverable": listing.window_line}] if listing.base_rows or archive else [])
            + listing.left_alone
            for db, listing in everything.items()
        }
        print(json.dumps(rows if not args.database else rows[args.database], indent=2))
        return 0
    for database, listing in everything.items():
        where = f"{args.storage}" + (f" prefix {args.prefix}" if args.prefix else "")
        print(f"{database}: {listing.describe()} in {where}")
        if listing.rows:
            print(format_table(listing.rows, COLUMNS))
        if listing.base_rows:
            print("base backups:")
            print(format_table(listing.base_rows, BASE_COLUMNS))
        print(listing.window_line)
        if listing.left_alone:
            print("left alone (no flow reads or deletes these):")
            print(format_table(listing.left_alone, ["key", "problem"]))
        print()
    return 0


@command
def _backups(sub: argparse._SubParsersAction) -> None:
    backups = sub.add_parser("backups", help="what backups exist, and whether they were verified and drilled")
    actions = backups.add_subparsers(dest="action", required=True, metavar="ACTION")
    from deployments.sync_cli import register_sync

    register_sync(actions)
    lst = actions.add_parser(
        "list", help="backups with time, size, compression, verified, drilled and Alembic revision"
    )
    lst.add_argument("--database", help="database name in the object layout (default: every database)")
    lst.add_argument(
        "--storage",
        default=os.environ.get("DBOPS_STORAGE"),
        help="storage block slug, e.g. s3-bucket/imagemanager-backups (default: $DBOPS_STORAGE)",
    )
    lst.add_argument("--prefix", default=os.environ.get("DBOPS_PREFIX", ""), help="folder in the storage")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.add_argument(
        "--archive-dir", help="the WAL archive directory (archive_command = 'cp %%p DIR/%%f'), for the window"
    )
    lst.add_argument("--archive-storage", help="or: the storage block slug holding the WAL archive")
    lst.add_argument("--archive-prefix", default="", help="folder of the WAL files in --archive-storage")
    lst.set_defaults(func=backups_list)


# -- dbops setup / deploy -----------------------------------------------------------------------------------


def setup_command(args: argparse.Namespace) -> int:
    from deployments.setup import load_config, run_setup

    config = load_config(args.config)
    if args.notify:
        config.notify = args.notify
    for item in args.alert_window or []:
        name, sep, duration = item.partition("=")
        if not sep or not name or not duration:
            print(
                f"dbops setup: --alert-window {item!r} is not NAME=DURATION (e.g. nightly-dump=26h)",
                file=sys.stderr,
            )
            return 2
        config.alerts.windows[name] = duration
    if not config.databases and not config.storage:
        print(
            "dbops setup: no databases or storage configured; pass --config FILE or set "
            "DBOPS_DATABASE_<NAME> and DBOPS_STORAGE_<NAME>",
            file=sys.stderr,
        )
        return 2
    report = run_setup(config)
    print(report.render())
    print("dbops setup: " + ("changes made" if report.changed else "nothing to change"))
    return 0


@command
def _setup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("setup", help="create blocks, work pool, concurrency limits, variables (idempotent)")
    p.add_argument("--config", type=Path, default=None, help="TOML config (see deployments/setup.py)")
    p.add_argument(
        "--notify", default=None, help="notification block slug: alerts on failed, missing and resolved runs"
    )
    p.add_argument(
        "--alert-window",
        action="append",
        metavar="NAME=DURATION",
        help="'nothing ran' window for a flow or deployment, e.g. nightly-dump=26h (repeatable)",
    )
    p.set_defaults(func=setup_command)


def deploy_command(args: argparse.Namespace) -> int:
    from deployments.deploy import deploy

    return deploy(args.file)


@command
def _deploy(sub: argparse._SubParsersAction) -> None:
    from deployments.deploy import ROOT

    p = sub.add_parser("deploy", help="check prefect.yaml (blocks, variables, cron, work pool), then deploy")
    p.add_argument("--file", type=Path, default=ROOT / "prefect.yaml", help="the prefect.yaml to deploy")
    p.set_defaults(func=deploy_command)


# -- dbops health -------------------------------------------------------------------------------------------


def health_command(args: argparse.Namespace) -> int:
    """The db_health report in the terminal, without a Prefect run: same checks, same renderer. The size
    history is read for the trend but not written (the hourly flow keeps one point a day)."""
    from flows.core.health.report import render
    from flows.core.health.thresholds import HealthThresholds
    from flows.tasks.health import inspect_block

    report = inspect_block(
        args.database,
        HealthThresholds(),
        [] if args.no_prescribed else None,
        args.statement_timeout,
        keep_history=False,
    )
    print(render(report))
    return 1 if report.first_critical() is not None else 0


@command
def _health(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("health", help="db_health report of a database in the terminal (exit 1 on critical)")
    p.add_argument("--database", required=True, help="PostgresDatabase block name, e.g. imagemanager-prod")
    p.add_argument(
        "--statement-timeout", type=float, default=10.0, help="seconds per check query (default 10)"
    )
    p.add_argument(
        "--no-prescribed", action="store_true", help="do not check the image manager's prescribed indexes"
    )
    p.set_defaults(func=health_command)


# -- dbops migrate (the pre-deploy gate) -------------------------------------------------------------------


@command
def _migrate(sub: argparse._SubParsersAction) -> None:
    from deployments.migrate_cli import register

    register(sub)


@command
def _run(sub: argparse._SubParsersAction) -> None:
    from deployments.migrate_cli import register_run

    register_run(sub)


# -- entry point -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbops", description="dbops: keep a PostgreSQL database safe.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from deployments.apiurl import find_api, quiet_prefect_at_exit

    quiet_prefect_at_exit()
    try:
        with find_api() as found:
            if isinstance(found, int):
                return found
            return int(args.func(args))
    except DbopsError as exc:
        print(f"dbops: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
