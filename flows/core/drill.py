"""The weekly restore drill's checks: a backup counts only once dbops has restored and checked it.

Each check is a function with one sentence when it fails (pgBackRest's shape): the tables the manifest
lists exist, row counts agree with the manifest's estimates (exactly for small tables), the Alembic
revision is the manifest's, and `pg_amcheck` finds no corruption. The result goes into the backup's
sidecar `<stem>.drill.json`, which `dbops backups list` shows as "restored and checked at ...".
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass

import psycopg
from pydantic import AwareDatetime, BaseModel, Field

from flows.core.manifest import Manifest
from flows.core.pgtools import MAX_IDENTIFIER, PgTool, error_summary
from flows.core.postgres import ConnParams, alembic_revision, libpq_environment, scalar, scrub
from flows.core.tablenames import TableName, resolve_key

DRILL_FORMAT_VERSION = 1


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


class DrillCheck(BaseModel):
    name: str
    ok: bool
    detail: str


class DrillRecord(BaseModel):
    """`<stem>.drill.json`: when the backup was last restored and checked, how long it took, the result."""

    format_version: int = DRILL_FORMAT_VERSION
    dump_key: str
    drilled_at: AwareDatetime
    passed: bool
    rto_seconds: float = Field(description="Seconds from the start of the restore until it was usable.")
    restored_bytes: int = 0
    scratch_database: str
    server: str
    checks: list[DrillCheck] = Field(default_factory=list)
    flow_run_id: str | None = None
    summary: str = ""

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> DrillRecord:
        return cls.model_validate(json.loads(data))

    def describe(self) -> str:
        when = f"{self.drilled_at:%Y-%m-%d %H:%M}Z"
        if self.passed:
            return f"restored and checked at {when} (RTO {self.rto_seconds:.0f} s)"
        summary = self.summary if len(self.summary) <= 100 else self.summary[:99] + "…"
        return f"FAILED at {when}: {summary}"


def scratch_name(database: str, run_id: str) -> str:
    """`drill_<database>_<run id>`: derived from the run, so concurrent drills never share one."""
    token = re.sub(r"[^a-z0-9]", "", run_id.lower())[:12] or "run"
    suffix = f"_{token}"
    head = f"drill_{database}".encode()[: MAX_IDENTIFIER - len(suffix) - len("_restoring_xxxxxxxx")]
    return head.decode(errors="ignore") + suffix


# -- checks ------------------------------------------------------------------------------------------------

_TABLES = """
    SELECT n.nspname, c.relname, c.relkind
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'm')
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
"""


def restored_tables(conn: psycopg.Connection) -> dict[TableName, str]:
    """(schema, table) -> relkind: pairs, because either name may hold a dot (see flows.core.tablenames)."""
    return {TableName(schema, table): kind for schema, table, kind in conn.execute(_TABLES).fetchall()}


def check_tables(manifest: Manifest, tables: dict[TableName, str]) -> CheckResult:
    expected = sorted(manifest.row_estimates)
    missing = [t for t in expected if resolve_key(t, tables) is None]
    if missing:
        return CheckResult(
            "tables",
            False,
            f"{len(missing)} of {len(expected)} tables in the manifest are missing after the restore "
            f"(first: {missing[0]}); the dump does not contain what was backed up",
        )
    return CheckResult("tables", True, f"all {len(expected)} tables in the manifest exist")


def count_rows(conn: psycopg.Connection, table: TableName) -> int:
    query = psycopg.sql.SQL("SELECT count(*) FROM {}.{}").format(
        psycopg.sql.Identifier(table.schema), psycopg.sql.Identifier(table.table)
    )
    return int(scalar(conn, query))


def row_count_ok(estimate: int, actual: int, tolerance: float, exact_below: int) -> bool:
    """Exact for tables the manifest estimated below `exact_below` rows, else within `tolerance`."""
    if estimate < exact_below:
        return actual == estimate
    return abs(actual - estimate) <= tolerance * estimate


def check_row_counts(
    conn: psycopg.Connection,
    manifest: Manifest,
    tables: dict[TableName, str],
    tolerance: float = 0.1,
    exact_below: int = 1000,
) -> CheckResult:
    """count(*) of every table the manifest counted or estimated.

    Tables the dump counted in its own snapshot (`exact_row_counts`) must match exactly, whatever their
    size. The others are compared with the planner's estimate: within `tolerance`, and exactly below
    `exact_below` rows only for manifests without exact counts (older dbops). Estimates < 0 (never
    analysed) are not compared.
    """
    off: list[str] = []
    compared = 0
    skipped = 0
    names = sorted(set(manifest.row_estimates) | set(manifest.exact_row_counts))
    for name in names:
        table = resolve_key(name, tables)
        if table is None or tables[table] not in ("r", "m"):
            skipped += 1  # partitioned parent, or missing (the tables check says so)
            continue
        if name in manifest.exact_row_counts:
            expected = manifest.exact_row_counts[name]
            actual = count_rows(conn, table)
            compared += 1
            if actual != expected:
                off.append(f"{name}: {actual} rows, the dump's snapshot had {expected}")
            continue
        # Two estimates, each wrong in its own way (see flows.core.postgres): the count must agree with one.
        candidates = (manifest.row_estimates.get(name, -1), manifest.planner_estimates.get(name, -1))
        estimates = [e for e in candidates if e >= 0]
        if not estimates:
            skipped += 1
            continue
        actual = count_rows(conn, table)
        compared += 1
        small = 0 if manifest.exact_row_counts else exact_below
        if not any(row_count_ok(e, actual, tolerance, small) for e in estimates):
            off.append(f"{name}: {actual} rows, manifest estimated {' or '.join(str(e) for e in estimates)}")
    if off:
        return CheckResult(
            "row counts",
            False,
            f"{len(off)} table(s) have row counts outside tolerance ({off[0]}); "
            "the backup lost or gained rows",
        )
    note = f", {skipped} not compared (never analysed or partitioned)" if skipped else ""
    return CheckResult(
        "row counts",
        True,
        f"{compared} tables match ({len(manifest.exact_row_counts)} counted exactly in the dump's snapshot, "
        f"the others within {tolerance:.0%} of the estimate){note}",
    )


def check_alembic(conn: psycopg.Connection, manifest: Manifest) -> CheckResult:
    found = alembic_revision(conn)
    if found != manifest.alembic_revision:
        return CheckResult(
            "alembic revision",
            False,
            f"restored database is at Alembic revision {found or 'none'}, the manifest says "
            f"{manifest.alembic_revision or 'none'}",
        )
    return CheckResult("alembic revision", True, f"{found or 'no Alembic'} as in the manifest")


def check_amcheck(params: ConnParams, tool: PgTool, timeout_s: float = 3600) -> CheckResult:
    """`pg_amcheck --install-missing`: heap and B-tree checks of the whole scratch database."""
    argv = [str(tool.path), "--no-password", "--install-missing", params.conninfo()]
    with libpq_environment(params) as env:
        try:
            proc = subprocess.run(argv, capture_output=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return CheckResult("amcheck", False, f"pg_amcheck did not finish in {timeout_s:.0f} s")
    out = scrub((proc.stdout + proc.stderr).decode(errors="replace"), params.password).strip()
    if proc.returncode != 0:
        first = error_summary(out) or (out.splitlines()[0] if out else f"exit {proc.returncode}")
        return CheckResult("amcheck", False, f"pg_amcheck found problems ({first})")
    return CheckResult("amcheck", True, "pg_amcheck: heap and B-tree indexes are consistent")


def failed_summary(checks: list[CheckResult]) -> str:
    bad = [c for c in checks if not c.ok]
    return "; ".join(f"{c.name}: {c.detail}" for c in bad)
