"""`dbops migrate`: the pre-deploy gate. A deploy pipeline starts the migrate deployment through the
Prefect API, follows its state and logs, and rolls out only when this exits 0.

    dbops migrate --deployment migrate/migrate --param target=head --wait --timeout 3600

Exit codes (deployments.trigger): 0 Completed, 1 any other final state (or nothing could be started),
2 still running at --timeout (not cancelled: a migration half-way must finish on its own), 3 the Prefect
API cannot be reached. Parameters are for the flow; passwords live in blocks, never in --param.
"""

from __future__ import annotations

import argparse
import os
import sys

from deployments.trigger import (
    EXIT_COMPLETED,
    EXIT_FAILED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    parse_params,
    trigger_and_wait,
)
from flows.core.errors import ConfigurationError

DEFAULT_DEPLOYMENT = "migrate/migrate"
EXIT_MEANING = {
    EXIT_COMPLETED: "Completed",
    EXIT_FAILED: "the run did not complete",
    EXIT_TIMEOUT: "still running at --timeout",
    EXIT_UNREACHABLE: "Prefect API unreachable",
}


def run_migrate(args: argparse.Namespace) -> int:
    """Start the deployment (tagged trigger:api, so the run's report says who started it) and wait."""
    try:
        parameters = parse_params(args.param or [])
    except ConfigurationError as exc:
        print(f"dbops migrate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.timeout is not None and args.timeout <= 0:
        print("dbops migrate: --timeout must be a positive number of seconds", file=sys.stderr)
        return EXIT_FAILED
    from prefect.exceptions import PrefectHTTPStatusError

    deployment = args.deployment if "/" in args.deployment else f"{args.deployment}/{args.deployment}"
    try:
        code = trigger_and_wait(
            deployment,
            parameters,
            wait=args.wait,
            timeout=args.timeout,
            poll_interval=args.poll_interval,
            tags=("trigger:api", *args.tag),
            verbose=getattr(args, "verbose", False),
        )
        if args.wait:
            print(f"exit code {code} ({EXIT_MEANING.get(code, 'unknown')})")
        return code
    except PrefectHTTPStatusError as exc:  # e.g. 409: the server refused the parameters; nothing started
        try:
            detail = exc.response.json().get("detail", "")
        except ValueError:
            detail = exc.response.text[:300]
        print(f"dbops: the Prefect API refused to start {deployment}: {detail}", file=sys.stderr)
        return EXIT_FAILED


def register(sub: argparse._SubParsersAction) -> None:
    """Add `dbops migrate` to the dbops parser (deployments/cli.py lists it in COMMANDS)."""
    parser = sub.add_parser(
        "migrate",
        help="start the migrate deployment and (with --wait) exit 0 only when it Completed",
        description="Start the migrate deployment through the Prefect API. With --wait, follow its logs "
        "and exit 0 when it Completed, 1 when it ended otherwise, 2 on --timeout, 3 when the API is "
        "unreachable.",
    )
    parser.add_argument(
        "--deployment",
        default=os.environ.get("DBOPS_MIGRATE_DEPLOYMENT", DEFAULT_DEPLOYMENT),
        help=f"FLOW/DEPLOYMENT name (default: $DBOPS_MIGRATE_DEPLOYMENT or {DEFAULT_DEPLOYMENT})",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="flow parameter, repeatable; JSON values are parsed (--param dry_run=true --param "
        "'waivers=[\"drop-column@0007_x\"]')",
    )
    parser.add_argument("--wait", action="store_true", help="follow the run to its final state")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait with --wait (default: no limit)"
    )
    add_wait_options(parser)
    parser.set_defaults(func=run_migrate)


def add_wait_options(parser: argparse.ArgumentParser) -> None:
    """--param, --wait, --timeout, --tag, --verbose: shared by `dbops migrate` and `dbops run`."""
    parser.add_argument("--tag", action="append", default=[], help="extra flow run tag, repeatable")
    parser.add_argument(
        "--verbose", action="store_true", help="print the run's log messages in full, tracebacks included"
    )
    parser.add_argument("--poll-interval", type=float, default=2.0, help=argparse.SUPPRESS)


def register_run(sub: argparse._SubParsersAction) -> None:
    """`dbops run DEPLOYMENT`: start any deployment (e.g. a dump now) the way `dbops migrate` does."""
    parser = sub.add_parser(
        "run",
        help="start a deployment (e.g. nightly-dump) and, with --wait, exit 0 only when it Completed",
        description="Start a deployment through the Prefect API; the exit codes are those of dbops migrate.",
    )
    parser.add_argument("deployment", help="FLOW/DEPLOYMENT, or DEPLOYMENT when both names are the same")
    parser.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="flow parameter, repeatable"
    )
    parser.add_argument("--wait", action="store_true", help="follow the run to its final state")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait with --wait")
    add_wait_options(parser)
    parser.set_defaults(func=run_migrate)
