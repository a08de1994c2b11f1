"""How db_health runs its checks: one connection, every query under its own statement_timeout.

A check whose query is cancelled by statement_timeout (a lock held on what it reads, a huge catalog) is
that check's failure, said as a critical `Check`; the other checks still run. A query refused for lack
of privilege is a skipped check that names the GRANT which enables it. A connection that breaks (the
server went away) ends the whole run with one sentence: nothing after it can be read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors

from flows.core.errors import DatabaseUnreachable
from flows.core.health import Check
from flows.core.health.thresholds import HealthThresholds


class HealthInterrupted(DatabaseUnreachable):
    """The connection broke while the checks ran (server restarted, backend terminated): transient."""


@dataclass
class Findings:
    """What checks learn beyond their `Check`s, for the report, the history and the vacuum step."""

    database_bytes: int | None = None
    free_bytes: int | None = None
    disk_bytes: int | None = None
    largest_tables: list[tuple[str, int]] = field(default_factory=list)
    largest_indexes: list[tuple[str, int]] = field(default_factory=list)
    vacuum_tables: list[tuple[str, str]] = field(default_factory=list)
    top_queries: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # group -> time its queries took
    notes: list[str] = field(default_factory=list)


@dataclass
class Probe:
    """The connection the checks read through, with what they all need to know."""

    conn: psycopg.Connection
    thresholds: HealthThresholds
    statement_timeout: float
    where: str
    database: str
    role: str = ""
    has_monitor: bool = True
    local_host: bool = False
    findings: Findings = field(default_factory=Findings)

    def rows(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[tuple]:
        """One query under this run's statement_timeout (set per statement, so each has its own budget)."""
        self.conn.execute(
            "SELECT set_config('statement_timeout', %s, false)",
            (f"{max(int(self.statement_timeout * 1000), 1)}ms",),
        )
        # always with parameters (empty when none), so every query escapes a literal % the same way: %%
        cur = self.conn.execute(query, params if params is not None else ())
        return cur.fetchall() if cur.description else []

    @property
    def grant_monitor(self) -> str:
        return f"GRANT pg_monitor TO {_ident(self.role)}"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 table`, `3 tables`: a report read in ten seconds should not stumble on "1 tables"."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def _ident(name: str) -> str:
    return name if name.isidentifier() and name == name.lower() else '"' + name.replace('"', '""') + '"'


GroupFn = Callable[[Probe], list[Check]]


def run_group(probe: Probe, group: str, fn: GroupFn) -> list[Check]:
    """Run one group of checks; its timeout or missing privilege becomes its own Check, not the run's end."""
    start = time.monotonic()
    try:
        return _run(probe, group, fn)
    finally:
        probe.findings.seconds[group] = round(time.monotonic() - start, 3)


def _run(probe: Probe, group: str, fn: GroupFn) -> list[Check]:
    try:
        return fn(probe)
    except errors.QueryCanceled:
        _recover(probe)
        return [
            Check(
                name=group,
                status="critical",
                figure=f"query cancelled after statement_timeout {probe.statement_timeout:g} s",
                message=f"the {group} check on {probe.where} did not finish within "
                f"{probe.statement_timeout:g} s",
                action="look for a session holding a lock on what it reads (pg_locks, pg_blocking_pids) or "
                "raise the flow's statement_timeout",
            )
        ]
    except errors.InsufficientPrivilege as exc:
        _recover(probe)
        first = (str(exc).strip().splitlines() or ["permission denied"])[0]
        return [
            Check(
                name=group,
                status="skipped",
                figure=f"not readable as {probe.role} ({first})",
                message=f"the {group} check needs more rights than {probe.role} has",
                action=f"{probe.grant_monitor}",
            )
        ]
    except psycopg.Error as exc:
        gone = (
            errors.AdminShutdown,
            errors.CrashShutdown,
            errors.CannotConnectNow,
            errors.ConnectionException,
        )
        if probe.conn.broken or probe.conn.closed or isinstance(exc, gone):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HealthInterrupted(
                f"lost the connection to {probe.where} during the {group} check ({first}); check that "
                "PostgreSQL is up, then run db_health again"
            ) from None
        _recover(probe)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return [
            Check(
                name=group,
                status="critical",
                figure=f"query failed: {first}",
                message=f"the {group} check on {probe.where} failed ({first})",
                action="read the server log for the query; the other checks ran",
            )
        ]


def _recover(probe: Probe) -> None:
    """After an error an autocommit connection is usable again; a broken one is the run's end."""
    if probe.conn.broken or probe.conn.closed:
        raise HealthInterrupted(
            f"lost the connection to {probe.where} during the checks; check that PostgreSQL is up, then run "
            "db_health again"
        )
