"""The decisions of the migrate runbook, without Prefect: durations, waivers, the plan's refusals, the
INVALID-index check, the trigger of a run, retry backoff inside a budget, and the report rows.

Kept here so they are tested without an API server and so `flows/migrate.py` reads like the runbook.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psycopg

from flows.core.alembic_errors import AlembicConfigMissing
from flows.core.alembic_runner import AlembicApp
from flows.core.ddl_rules import Finding
from flows.core.errors import (  # noqa: F401 - defined in flows.core.errors, still importable from here
    ApprovalRejected,
    ConfigurationError,
    DbopsError,
    InvalidIndexes,
    LintBlocked,
    LockBudgetExhausted,
    PreBackupFailed,
    ProductionFailed,
    StagingFailed,
)
from flows.core.identity import DatabaseIdentity

REPO_ROOT = Path(__file__).resolve().parents[2]


# -- parameters --------------------------------------------------------------------------------------------

_UNITS_MS = {"ms": 1, "s": 1000, "sec": 1000, "min": 60_000, "m": 60_000, "h": 3_600_000}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h)?\s*$", re.IGNORECASE)


def duration_ms(value: str | float | int, what: str = "duration") -> int:
    """PostgreSQL-style durations: `5s`, `500ms`, `2min`, `1h`; a bare number is seconds; 0 = no limit.

    A bare number means seconds (not PostgreSQL's milliseconds) because every other dbops parameter is
    in seconds; the unit is there to make it explicit.
    """
    if isinstance(value, bool):
        raise ConfigurationError(f"{what} {value!r} is not a duration; use e.g. 5s, 500ms or 2min")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigurationError(f"{what} {value!r} is negative; use 0 for no limit")
        return round(float(value) * 1000)
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ConfigurationError(f"{what} {value!r} is not a duration; use e.g. 5s, 500ms or 2min")
    number, unit = float(m.group(1)), (m.group(2) or "s").lower()
    return round(number * _UNITS_MS[unit])


def normalise_waivers(waivers: Iterable[str]) -> list[str]:
    """`rule`, `rule@revision` or `revision:rule` → the lint's `rule` / `revision:rule` form."""
    out = []
    for waiver in waivers:
        waiver = waiver.strip()
        if not waiver:
            continue
        if "@" in waiver:
            rule, _, revision = waiver.partition("@")
            waiver = f"{revision.strip()}:{rule.strip()}"
        out.append(waiver)
    return out


def resolve_alembic_ini(path: str, base: Path | None = None) -> Path:
    """`alembic.ini`, the folder holding it, or the script directory (its parent holds alembic.ini).

    Relative paths are tried from the working directory first, then from the dbops checkout, so the
    default `examples/imagemanager` works wherever the worker starts.
    """
    raw = Path(path).expanduser()
    candidates = [raw] if raw.is_absolute() else [Path.cwd() / raw, (base or REPO_ROOT) / raw]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
        if candidate.is_dir():
            for ini in (candidate / "alembic.ini", candidate.parent / "alembic.ini"):
                if ini.is_file():
                    return ini.resolve()
    raise AlembicConfigMissing(
        f"no alembic.ini at or beside {path!r}; set the `alembic` parameter to the application's alembic.ini "
        "or its folder"
    )


# -- plan --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Where production is and what would bring it to the target."""

    start: list[str]
    target: str  # the resolved revision id
    pending: list[str]
    downgradable: bool = False  # every pending revision has a real downgrade()
    docs: dict[str, str] = field(default_factory=dict)
    production: DatabaseIdentity | None = None  # which databases the plan saw: staging's is re-checked
    staging: DatabaseIdentity | None = None  # on the connection that drops it

    @property
    def start_label(self) -> str:
        return ",".join(self.start) or "base"


def make_plan(app: AlembicApp, start: list[str], target: str) -> Plan:
    """The pending revisions, or a named refusal (multiple heads, unknown target, target behind)."""
    pending = app.pending(start, target)  # raises MultipleHeads, UnknownRevision, UnknownTarget, behind
    goal = pending[-1] if pending else (",".join(start) or "base")
    by_id = {r.id: r for r in app.history()}
    return Plan(
        start=list(start),
        target=goal,
        pending=pending,
        downgradable=bool(pending) and all(by_id[r].has_downgrade for r in pending),
        docs={r: by_id[r].doc.strip().splitlines()[0] if by_id[r].doc.strip() else "" for r in pending},
    )


def invalid_indexes(conn: psycopg.Connection) -> list[str]:
    """User indexes with indisvalid = false ("schema.index"), e.g. the leftover of a failed CONCURRENTLY."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT i.indisvalid AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg_toast%'
        ORDER BY 1, 2
        """
    ).fetchall()
    return [f"{s}.{n}" for s, n in rows]


def refuse_invalid_indexes(database: str, names: Sequence[str]) -> None:
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise InvalidIndexes(
            f"production database {database!r} has {len(names)} INVALID index(es) ({shown}), the leftover of "
            "a failed CREATE INDEX CONCURRENTLY; drop them (DROP INDEX CONCURRENTLY) or rebuild them with "
            "the weekly-reindex flow, then migrate"
        )


def existing_tables(conn: psycopg.Connection) -> list[str]:
    """Tables that exist before the migration ("schema.table"): the lint treats only these as live."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
        """
    ).fetchall()
    return [f"{s}.{t}" for s, t in rows]


# -- lint --------------------------------------------------------------------------------------------------


def sql_sha256(sql_by_revision: Mapping[str, str]) -> str:
    """One hash over the rendered SQL in migration order: what was reviewed is what the report names."""
    digest = hashlib.sha256()
    for revision, sql in sql_by_revision.items():
        digest.update(f"-- revision {revision}\n".encode())
        digest.update(sql.encode())
    return digest.hexdigest()


def lint_message(blocked: Sequence[Finding]) -> str:
    first = blocked[0]
    rules = sorted({f"{f.revision}:{f.rule}" for f in blocked})
    return (
        f"the DDL lint found {len(blocked)} blocking statement(s) ({', '.join(rules[:6])}"
        f"{' ...' if len(rules) > 6 else ''}); first: revision {first.revision}: {first.why} Safe pattern: "
        f"{first.safe} Rewrite the revision, or waive the finding with "
        f"waivers=['{first.rule}@{first.revision}']"
    )


# -- production --------------------------------------------------------------------------------------------


def backoff_delays(
    budget_s: float, first_s: float = 1.0, factor: float = 2.0, cap_s: float = 60.0
) -> list[float]:
    """Delays before each retry, doubling, that fit together inside `budget_s` (the last one trimmed)."""
    delays: list[float] = []
    spent, delay = 0.0, max(first_s, 0.01)
    while spent < budget_s and len(delays) < 50:
        step = min(delay, cap_s, budget_s - spent)
        if step <= 0:
            break
        delays.append(step)
        spent += step
        delay *= factor
    return delays


# -- report ------------------------------------------------------------------------------------------------


def trigger_of(
    tags: Iterable[str], auto_scheduled: bool, deployment_id: object | None, created_by: str | None
) -> str:
    """UI, API or schedule: a `trigger:<x>` tag wins (dbops migrate sets trigger:api), then Prefect's
    own markers; a run without a deployment was called from Python."""
    for tag in tags:
        if tag.startswith("trigger:"):
            return tag.split(":", 1)[1] or "unknown"
    if auto_scheduled:
        return "schedule"
    if created_by:
        return f"UI ({created_by})"
    if deployment_id is not None:
        return "UI or API (deployment run without a trigger tag)"
    return "python (direct flow call)"


class TimedStep(Protocol):
    """What `timings` reads of a step (alembic_runner.StepResult); its `direction` defaults to upgrade."""

    revision: str
    seconds: float


def timings(steps: Iterable[TimedStep]) -> dict[str, float]:
    """{revision: seconds} of a RunResult's upgrade steps (a retried revision keeps its last time)."""
    out: dict[str, float] = {}
    for step in steps:
        if getattr(step, "direction", "upgrade") == "upgrade":
            out[step.revision] = round(float(step.seconds), 3)
    return out
