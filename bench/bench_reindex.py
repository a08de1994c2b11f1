"""What weekly_reindex costs the writers of the table it rebuilds.

    uv run python -m bench.bench_reindex [--rows 3000000] [--writers 4] [--rate 0] [--lock-timeout 2]

Builds a bloated table in a throwaway PostgreSQL cluster (bench_items: a primary key and two secondary
B-tree indexes, 75 % of the rows deleted and vacuumed, so every index is ~4x its packed size), starts a
Prefect API (prefect_test_harness) and a separate writer process (`--writers` threads, each one
transaction at a time: a non-HOT UPDATE of an existing row and an INSERT of a new one, both touching every
index), then:

  1. baseline    writers alone for --baseline seconds
  2. reindex     the weekly_reindex flow runs (REINDEX INDEX CONCURRENTLY, one index at a time)
  3. tail        writers alone for a few seconds more

and prints writer throughput during the reindex as a ratio to the baseline, the worst write latency
during the reindex, writer errors, and the size of each rebuilt index after/before; targets with
PASS/FAIL; bench/out/bench_reindex.json. `--rate N` throttles the writers to N transactions/s in total
(0: as fast as they can, which on a small machine measures CPU sharing more than locking).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.bench_dump import OUT_DIR, save_database_block

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

DBNAME = "reindexbench"
DB_BLOCK = "bench-reindex"

#: targets from the issue
MIN_THROUGHPUT_RATIO = 0.80
MAX_EXTRA_WAIT_S = 1.0  # no write waits longer than lock_timeout + this
MAX_WRITER_ERRORS = 0


def build_database(cluster: Any, rows: int) -> None:
    cluster.create_database(DBNAME)
    with cluster.connect(DBNAME) as conn:
        conn.execute("CREATE EXTENSION pgstattuple")
        conn.execute(
            "CREATE TABLE bench_items (id bigint PRIMARY KEY, account int NOT NULL, "
            "updated_at timestamptz NOT NULL, payload text)"
        )
        conn.execute("CREATE INDEX bench_items_account_idx ON bench_items (account, id)")
        conn.execute("CREATE INDEX bench_items_updated_idx ON bench_items (updated_at)")
        conn.execute(
            "INSERT INTO bench_items SELECT g, g %% 5000, now() - g * interval '1 second', md5(g::text) "
            "FROM generate_series(1, %s) g",
            (rows,),
        )
        conn.execute("DELETE FROM bench_items WHERE id % 4 <> 0")
        conn.execute("VACUUM ANALYZE bench_items")
        conn.execute("CREATE SEQUENCE bench_ids")
        conn.execute("SELECT setval('bench_ids', %s)", (rows + 1,))


def index_sizes(cluster: Any) -> dict[str, int]:
    rows = cluster.sql(
        "SELECT c.relname, pg_relation_size(c.oid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 'bench_items'::regclass",
        DBNAME,
    )
    return {name: int(size) for name, size in rows}


# -- the writers: their own process, so the flow's Python does not share their GIL ----------------------


def writer_process(
    conninfo: str, password: str, rows: int, threads: int, rate: float, stop: Any, out: str
) -> None:
    import psycopg

    records: list[tuple[float, float, str | None]] = []
    lock = threading.Lock()
    per_thread_interval = threads / rate if rate > 0 else 0.0

    def write(n: int) -> None:
        conn = psycopg.connect(conninfo, password=password, autocommit=True, application_name=f"writer-{n}")
        local: list[tuple[float, float, str | None]] = []
        next_at = time.perf_counter()
        i = n
        while not stop.is_set():
            if per_thread_interval:
                now = time.perf_counter()
                if now < next_at:
                    time.sleep(next_at - now)
                next_at += per_thread_interval
            i += threads
            key = 4 * (1 + (i * 7919) % (rows // 4))
            t0 = time.perf_counter()
            error = None
            try:
                with conn.transaction():
                    conn.execute(
                        "UPDATE bench_items SET account = account + 1, updated_at = now() WHERE id = %s",
                        (key,),
                    )
                    conn.execute(
                        "INSERT INTO bench_items VALUES (nextval('bench_ids'), %s, now(), 'new')",
                        (key % 5000,),
                    )
            except psycopg.Error as exc:
                error = str(exc).splitlines()[0]
                if conn.broken:
                    conn = psycopg.connect(conninfo, password=password, autocommit=True)
            local.append((time.time(), time.perf_counter() - t0, error))
        conn.close()
        with lock:
            records.extend(local)

    workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    Path(out).write_text(json.dumps(records))


def window(records: list[list[Any]], start: float, end: float) -> list[list[Any]]:
    return [r for r in records if start <= r[0] < end]


def summarise(records: list[list[Any]], start: float, end: float) -> dict[str, float]:
    rows = window(records, start, end)
    lat = sorted(r[1] for r in rows)
    return {
        "seconds": round(end - start, 2),
        "transactions": len(rows),
        "tps": round(len(rows) / (end - start), 1) if end > start else 0.0,
        "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else 0.0,
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 2) if lat else 0.0,
        "max_ms": round(lat[-1] * 1000, 2) if lat else 0.0,
        "errors": sum(1 for r in rows if r[2]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_reindex", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rows", type=int, default=3_000_000, help="rows inserted before 75 %% are deleted")
    parser.add_argument("--writers", type=int, default=4, help="writer threads (separate process)")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="total writer transactions/s; 0 = unthrottled"
    )
    parser.add_argument("--baseline", type=float, default=15.0, help="seconds of writers alone before")
    parser.add_argument("--tail", type=float, default=5.0, help="seconds of writers alone after")
    parser.add_argument("--lock-timeout", type=float, default=2.0, help="weekly_reindex lock_timeout")
    args = parser.parse_args(argv)

    from prefect.testing.utilities import prefect_test_harness

    from deployments.sandbox import pg_cluster, wait_until
    from flows.weekly_reindex import weekly_reindex

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with pg_cluster() as cluster, prefect_test_harness(server_startup_timeout=180):
        t0 = time.monotonic()
        build_database(cluster, args.rows)
        print(f"built {args.rows} rows (75 % deleted) in {time.monotonic() - t0:.1f} s")
        before = index_sizes(cluster)
        save_database_block(cluster, DB_BLOCK, DBNAME)

        conninfo = f"host={cluster.host} port={cluster.port} dbname={DBNAME} user={cluster.superuser}"
        records_file = OUT_DIR / "bench_reindex_writes.json"
        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        writer = ctx.Process(
            target=writer_process,
            args=(conninfo, cluster.password, args.rows, args.writers, args.rate, stop, str(records_file)),
        )
        writer.start()
        wait_until(
            lambda: (
                cluster.sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'writer-%'", DBNAME
                )[0][0]
                == args.writers
            ),
            timeout=60,
            what="all writers connected",
        )
        base_start = time.time()
        time.sleep(args.baseline)  # a measurement window, not synchronisation
        reindex_start = time.time()
        state = weekly_reindex(
            database=DB_BLOCK,
            min_index_size=1024 * 1024,
            lock_timeout=args.lock_timeout,
            retry_backoff=1.0,
            analyze=False,
            return_state=True,
        )
        reindex_end = time.time()
        time.sleep(args.tail)
        tail_end = time.time()
        stop.set()
        writer.join(120)
        report = state.result(raise_on_failure=False)
        after = index_sizes(cluster)

    records = json.loads(records_file.read_text())
    records_file.unlink()
    base = summarise(records, base_start, reindex_start)
    during = summarise(records, reindex_start, reindex_end)
    tail = summarise(records, reindex_end, tail_end)
    # a write that started during the reindex and ended just after it still counts for latency
    worst_ms = max(
        [r[1] * 1000 for r in records if reindex_start <= r[0] < reindex_end + args.lock_timeout + 5] or [0]
    )
    errors = sum(1 for r in records if r[2])
    ratio = during["tps"] / base["tps"] if base["tps"] else 0.0
    # sizes as the flow measured them right before and right after each rebuild (the writers keep
    # growing the indexes, so a catalog reading seconds later would blur the ratio)
    rebuilt = {i.index.split(".")[1]: i for i in getattr(report, "indexes", []) if i.action == "rebuilt"}
    size_ratio = {name: round((i.size_after or 0) / i.size_before, 3) for name, i in rebuilt.items()}
    total_ratio = (
        round(
            sum(i.size_after or 0 for i in rebuilt.values()) / sum(i.size_before for i in rebuilt.values()), 3
        )
        if rebuilt
        else 0.0
    )
    limit_ms = (args.lock_timeout + MAX_EXTRA_WAIT_S) * 1000
    checks = [
        (
            f"writer throughput during reindex >= {MIN_THROUGHPUT_RATIO:.0%} of baseline",
            ratio >= MIN_THROUGHPUT_RATIO,
        ),
        (
            f"worst write latency <= lock_timeout + {MAX_EXTRA_WAIT_S:.0f} s ({limit_ms:.0f} ms)",
            worst_ms <= limit_ms,
        ),
        ("zero writer errors", errors <= MAX_WRITER_ERRORS),
        ("every bloated index rebuilt", set(rebuilt) == set(before)),
    ]
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; writers: {args.writers} threads, "
        f"rate {'unthrottled' if not args.rate else f'{args.rate:.0f}/s'}; lock_timeout {args.lock_timeout} s"
    )
    print(
        f"{'window':<10} {'seconds':>8} {'tx':>8} {'tx/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>9} {'errors':>7}"
    )
    for label, s in (("baseline", base), ("reindex", during), ("after", tail)):
        print(
            f"{label:<10} {s['seconds']:>8} {s['transactions']:>8} {s['tps']:>9} {s['p50_ms']:>8} "
            f"{s['p99_ms']:>8} {s['max_ms']:>9} {s['errors']:>7}"
        )
    print()
    print(f"throughput during reindex / baseline: {ratio:.2f}")
    print(f"worst write latency during reindex: {worst_ms:.0f} ms")
    print(f"writer errors: {errors}")
    for name, i in sorted(rebuilt.items()):
        print(
            f"index {name}: {i.size_before / 2**20:.1f} MiB -> {(i.size_after or 0) / 2**20:.1f} MiB "
            f"(after/before {size_ratio[name]:.2f}; "
            f"wasted {i.bloat_before or 0:.0%} -> {i.bloat_after or 0:.0%}, "
            f"{i.seconds:.1f} s, {i.attempts} attempt(s))"
        )
    print(f"all indexes after/before: {total_ratio:.2f}; flow state {state.type.value}: {state.message}")
    print()
    for label, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")

    result = {
        "at": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "args": vars(args),
        "baseline": base,
        "reindex": during,
        "after": tail,
        "throughput_ratio": round(ratio, 3),
        "worst_write_ms": round(worst_ms, 1),
        "writer_errors": errors,
        "catalog_index_bytes_before_baseline": before,
        "catalog_index_bytes_at_end": after,
        "index_size_ratio": size_ratio,
        "total_index_size_ratio": total_ratio,
        "reindex_seconds": round(reindex_end - reindex_start, 2),
        "flow_state": state.type.value,
        "checks": dict(checks),
    }
    (OUT_DIR / "bench_reindex.json").write_text(json.dumps(result, indent=2))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
