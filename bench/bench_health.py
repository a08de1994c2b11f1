"""What one db_health run costs on a database with many tables.

    uv run python -m bench.bench_health [--tables 10000] [--statement-timeout 10]

Builds a throwaway cluster with one database of `--tables` tables (each: a bigint identity primary key,
so a sequence too, an integer column with a secondary index, a few rows; created in batches of 200 per
transaction so the lock table is not exhausted), runs ANALYZE, then times one `inspect_database` call:
every check db_health runs, on one connection, exactly as the flow's task and `dbops health` run it
(the flow adds a Prefect API round trip for the history Variable and the artifact, not measured here).
Prints the time of the run and of each check group, the target (under 30 s) with PASS/FAIL, and writes
bench/out/bench_health.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
DBNAME = "healthbench"
TARGET_S = 30.0
BATCH = 200


def build(cluster: Any, tables: int) -> float:
    start = time.monotonic()
    cluster.create_database(DBNAME)
    with cluster.connect(DBNAME) as conn:
        conn.execute(
            "CREATE FUNCTION make_tables(a int, b int) RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
            "FOR i IN a..b LOOP "
            "EXECUTE format('CREATE TABLE t_%s (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "v integer, note text)', i); "
            "EXECUTE format('CREATE INDEX t_%s_v ON t_%s (v)', i, i); "
            "EXECUTE format('INSERT INTO t_%s (v, note) SELECT g, md5(g::text) "
            "FROM generate_series(1, 5) g', i); "
            "END LOOP; END $$"
        )
        for first in range(0, tables, BATCH):  # one transaction per batch: the lock table has room
            conn.execute("SELECT make_tables(%s, %s)", (first, min(first + BATCH, tables) - 1))
        conn.execute("DROP FUNCTION make_tables(int, int)")
        conn.execute("ANALYZE")
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=10_000)
    parser.add_argument("--statement-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)

    from deployments.sandbox import pg_cluster
    from flows.core.health.database import inspect_database

    with pg_cluster(settings={"max_locks_per_transaction": "256"}) as cluster:
        print(f"building {args.tables} tables (+ {args.tables} indexes and sequences) ...", flush=True)
        built = build(cluster, args.tables)
        count = cluster.sql(
            "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relname LIKE 't_%%'", DBNAME
        )
        print(f"built in {built:.0f} s: {count[0][0]} tables", flush=True)
        with psycopg.connect(cluster.conninfo(DBNAME), autocommit=True) as conn:
            start = time.monotonic()
            report = inspect_database(
                conn,
                database=DBNAME,
                where=f"{cluster.host}:{cluster.port}/{DBNAME}",
                statement_timeout=args.statement_timeout,
                local_host=True,
            )
            elapsed = time.monotonic() - start
    failed = [c for c in report.checks if "did not finish" in c.message or "query failed" in c.figure]
    ok = elapsed < TARGET_S and not failed
    print(
        f"db_health checks over {args.tables} tables: {elapsed:.2f} s, {len(report.checks)} checks, "
        f"status {report.status}; target < {TARGET_S:.0f} s: {'PASS' if ok else 'FAIL'}"
    )
    print("  seconds per group: " + ", ".join(f"{g} {t:.2f}" for g, t in report.seconds.items()))
    for c in failed:
        print(f"  check failed: {c.name}: {c.message}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "bench_health.json").write_text(
        json.dumps(
            {
                "tables": args.tables,
                "build_seconds": round(built, 1),
                "run_seconds": round(elapsed, 2),
                "checks": len(report.checks),
                "group_seconds": report.seconds,
                "status": report.status,
                "target_seconds": TARGET_S,
                "pass": ok,
                "problems": [c.row() for c in report.problems],
            },
            indent=2,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
