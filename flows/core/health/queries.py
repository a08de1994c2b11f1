"""Top queries from pg_stat_statements, when it is installed in this database: the ten with the most
total execution time, with calls and mean. When it is not, one line says how to enable it (it needs
shared_preload_libraries, hence a restart, then CREATE EXTENSION)."""

from __future__ import annotations

from flows.core.health import Check
from flows.core.health.probe import Probe

ENABLE = (
    "add pg_stat_statements to shared_preload_libraries, restart PostgreSQL, then "
    "CREATE EXTENSION pg_stat_statements in this database"
)


def statements_schema(probe: Probe) -> str | None:
    rows = probe.rows(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'pg_stat_statements'"
    )
    return str(rows[0][0]) if rows else None


def read_top_queries(probe: Probe, schema: str, limit: int = 10) -> list[dict[str, object]]:
    from psycopg import sql

    query = sql.SQL(
        "SELECT calls, total_exec_time, mean_exec_time, rows, "
        "left(regexp_replace(query, '\\s+', ' ', 'g'), 200) FROM {}.pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "ORDER BY total_exec_time DESC LIMIT {}"
    ).format(sql.Identifier(schema), sql.Literal(limit))
    return [
        {
            "calls": int(r[0]),
            "total_ms": float(r[1]),
            "mean_ms": float(r[2]),
            "rows": int(r[3]),
            "query": str(r[4]),
        }
        for r in probe.rows(query.as_string(probe.conn).replace("%", "%%"))
    ]


def top_query_checks(probe: Probe) -> list[Check]:
    name = "top queries"
    schema = statements_schema(probe)
    if schema is None:
        return [
            Check(name=name, status="skipped", figure="pg_stat_statements is not installed", action=ENABLE)
        ]
    try:
        top = read_top_queries(probe, schema)
    except Exception as exc:  # psycopg.errors.ObjectNotInPrerequisiteState: not preloaded
        if "shared_preload_libraries" not in str(exc):
            raise
        return [Check(name=name, status="skipped", figure="pg_stat_statements is not loaded", action=ENABLE)]
    probe.findings.top_queries = top
    figure = "; ".join(
        f"{q['total_ms']:.0f} ms in {q['calls']} calls (mean {q['mean_ms']:.1f} ms): {q['query']}"
        for q in top[:3]
    )
    return [Check(name=name, status="ok", figure=figure or "no statement recorded yet")]
