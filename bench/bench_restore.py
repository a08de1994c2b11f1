"""Restore throughput: dbops' streamed restore (jobs=1) against its download-then-parallel one (jobs=2),
and against plain `pg_restore` from a local file (the floor).

    uv run python -m bench.bench_restore [--size 1GB] [--keep] [--workdir DIR]

Builds an imagemanager database (Alembic head, then examples/imagemanager/generate.py) in a throwaway
PostgreSQL cluster, dumps it once with the dbops pipeline (pg_dump -Z0 | zstd | sha256) into a local
object store, then measures one run each of:

  a. pg_restore -d NEW archive.dump     plain tool, uncompressed archive already on local disk
  b. dbops restore, jobs=1              streamed from the store: zstd + sha256 + pg_restore, temp db + rename
  c. dbops restore, jobs=2              download + sha256 to a temp file, then pg_restore --jobs=2

b and c run flows.core.restore.restore_backup (the code the restore flow's task calls) in their own Python
process, so os.wait4 reports that process's peak RSS (and pg_restore's, whichever is larger). Prints a
table and ratios, and writes bench/out/bench_restore.json. Passwords go through the environment of the
child and a 0600 passfile for pg_restore, never argv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
DBNAME = "imagemanager"
MiB = 1024 * 1024


def parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": MiB, "GB": 1024 * MiB}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def run_measured(argv: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in KiB (os.wait4: the process or a descendant it waited for), stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{argv[0]} failed: {err.read()[-3000:].decode(errors='replace')}")
        return wall, usage.ru_maxrss, out.read().decode()


def build_database(cluster: Any, workdir: Path, target_bytes: int) -> dict[str, Any]:
    from deployments.sample_app import alembic_upgrade
    from examples.imagemanager.generate import generate

    marker = workdir / "database.json"
    if marker.exists() and json.loads(marker.read_text()).get("target_bytes") == target_bytes:
        return {**json.loads(marker.read_text()), "reused": True}
    cluster.create_database(DBNAME)
    alembic_upgrade(cluster.host, cluster.port, cluster.superuser, cluster.password, DBNAME, quiet=True)
    t0 = time.monotonic()
    rows = generate(cluster.conninfo(DBNAME), target_bytes=target_bytes, seed=0)
    cluster.sql("VACUUM (FREEZE, ANALYZE)", dbname=DBNAME)
    size = cluster.sql("SELECT pg_database_size(%s)", params=[DBNAME])[0][0]
    info = {
        "target_bytes": target_bytes,
        "database_bytes": size,
        "rows": rows,
        "generate_s": time.monotonic() - t0,
    }
    marker.write_text(json.dumps(info))
    return {**info, "reused": False}


def params_of(cluster: Any, database: str):
    from flows.core.postgres import ConnParams

    return ConnParams(
        host=cluster.host,
        port=cluster.port,
        database=database,
        user=cluster.superuser,
        password=cluster.password,
    )


def dump_once(cluster: Any, store_root: Path) -> dict[str, Any]:
    """One backup in the local store, with a manifest (the restore reads it like any other)."""
    from flows.core.catalog import read_catalog
    from flows.core.compression import Compression
    from flows.core.dump import stream_dump
    from flows.core.layout import backup_stem, dump_key, manifest_key
    from flows.core.localstore import LocalObjectStore
    from flows.core.manifest import Manifest, Verification
    from flows.core.pgtools import find_tool

    store = LocalObjectStore(store_root)
    existing = read_catalog(store, "bench", DBNAME).newest(verified_only=False)
    if existing is not None:
        return {
            "key": existing.manifest.dump_key,
            "bytes": existing.manifest.bytes,
            "raw_bytes": existing.manifest.raw_bytes,
            "reused": True,
        }
    params = params_of(cluster, DBNAME)
    version = cluster.sql("SHOW server_version_num")[0][0]
    tool = find_tool("pg_dump", int(version))
    stem = backup_stem("bench", DBNAME, datetime.now(UTC))
    key = dump_key(stem, ".zst")
    result = stream_dump(params, store, key, tool=tool, compression=Compression.zstd, level=3)
    manifest = Manifest(
        database=DBNAME,
        server=f"{cluster.host}:{cluster.port}",
        server_version=str(version),
        pg_dump_version=tool.version,
        started_at=result.started_at,
        ended_at=result.ended_at,
        dump_key=key,
        bytes=result.bytes,
        raw_bytes=result.raw_bytes,
        sha256=result.sha256,
        compression=Compression.zstd,
        compression_level=3,
        dump_options=result.argv,
        verified=False,
        verification=Verification(method="none"),
    )
    store.put_bytes(manifest_key(stem), manifest.to_json())
    return {
        "key": key,
        "bytes": result.bytes,
        "raw_bytes": result.raw_bytes,
        "dump_s": result.seconds,
        "reused": False,
    }


def drop(cluster: Any, name: str) -> None:
    from flows.core.database_admin import drop_database

    with cluster.connect() as conn:
        drop_database(conn, name)


def child(args: argparse.Namespace) -> int:
    """One dbops restore in this process: flows.core.restore.restore_backup, as the flow's task runs it."""
    from flows.core.catalog import read_catalog
    from flows.core.localstore import LocalObjectStore
    from flows.core.pgtools import find_tool
    from flows.core.postgres import ConnParams, connect, server_version_num
    from flows.core.restore import RestoreRequest, restore_backup

    params = ConnParams(
        host="127.0.0.1",
        port=args.port,
        database=args.target,
        user="postgres",
        password=os.environ["DBOPS_BENCH_PASSWORD"],
    )
    with connect(params.with_database("postgres")) as conn:
        version = server_version_num(conn)
    store = LocalObjectStore(args.store)
    backup = read_catalog(store, "bench", DBNAME).newest(verified_only=False)
    assert backup is not None
    req = RestoreRequest(
        store=store,
        backup=backup,
        target=params,
        tool=find_tool("pg_restore", version),
        jobs=args.jobs,
        workdir=args.tmp,
        run_id=f"bench{args.jobs}",
    )
    result = restore_backup(req, log=lambda msg: print(msg, file=sys.stderr))
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    hwm_kb = int(status["VmHWM"].split()[0])
    print(
        json.dumps(
            {
                "seconds": result.seconds,
                "raw_bytes": result.raw_bytes,
                "method": result.method,
                "hwm_kb": hwm_kb,
            }
        )
    )
    return 0


def measure_plain(cluster: Any, store_root: Path, tmp: Path, key: str) -> dict[str, Any]:
    """a. decompress once (not timed), then plain pg_restore from the local file into a new database."""
    import zstandard

    from flows.core.pgtools import find_tool
    from flows.core.postgres import libpq_environment

    archive = tmp / "plain.dump"
    with open(store_root / key, "rb") as src, open(archive, "wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(src, dst)
    cluster.create_database("plain_restore")
    version = int(cluster.sql("SHOW server_version_num")[0][0])
    tool = find_tool("pg_restore", version)
    params = params_of(cluster, "plain_restore")
    with libpq_environment(params) as env:
        wall, rss, _ = run_measured(
            [str(tool.path), "--no-password", "--exit-on-error", "-d", "plain_restore", str(archive)], env
        )
    archive.unlink()
    drop(cluster, "plain_restore")
    return {"label": "a. pg_restore -d from local file (floor)", "wall": wall, "rss_mb": rss / 1024}


def measure_dbops(cluster: Any, store_root: Path, tmp: Path, jobs: int) -> dict[str, Any]:
    target = f"restored_j{jobs}"
    drop(cluster, target)
    env = {**os.environ, "DBOPS_BENCH_PASSWORD": cluster.password}
    argv = [
        sys.executable,
        "-m",
        "bench.bench_restore",
        "--child",
        "--port",
        str(cluster.port),
        "--target",
        target,
        "--jobs",
        str(jobs),
        "--store",
        str(store_root),
        "--tmp",
        str(tmp),
    ]
    wall, rss, out = run_measured(argv, env)
    detail = json.loads(out.strip().splitlines()[-1])
    drop(cluster, target)
    label = (
        "b. dbops restore jobs=1 (stream)" if jobs == 1 else f"c. dbops restore jobs={jobs} (download + -j)"
    )
    return {
        "label": label,
        "wall": wall,
        "restore_s": detail["seconds"],
        "rss_mb": detail["hwm_kb"] / 1024,
        "wait4_rss_mb": rss / 1024,
        "raw_bytes": detail["raw_bytes"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GB")
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dbops-bench-restore-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(workdir, 0o755)
    from deployments.sandbox import persistent_cluster

    cluster = persistent_cluster(workdir / "pg", settings={"max_wal_size": "'4GB'"})
    try:
        print(f"== database in {workdir} (target {args.size})")
        db = build_database(cluster, workdir, parse_size(args.size))
        print(
            f"   {db['database_bytes'] / MiB:.0f} MiB, rows {db['rows']}"
            + (" (reused)" if db["reused"] else "")
        )
        store_root = workdir / "store"
        store_root.mkdir(exist_ok=True)
        tmp = workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        dumped = dump_once(cluster, store_root)
        print(
            f"   backup {dumped['key']}: {dumped['bytes'] / MiB:.0f} MiB stored, "
            f"{dumped['raw_bytes'] / MiB:.0f} MiB archive"
        )
        rows = [measure_plain(cluster, store_root, tmp, dumped["key"])]
        print(f"   {rows[-1]['label']}: {rows[-1]['wall']:.1f} s")
        for jobs in (1, 2):
            rows.append(measure_dbops(cluster, store_root, tmp, jobs))
            print(f"   {rows[-1]['label']}: {rows[-1]['wall']:.1f} s")
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    raw = dumped["raw_bytes"]
    floor, j1, j2 = rows[0]["wall"], rows[1]["wall"], rows[2]["wall"]
    print()
    print(f"{'run':44} {'wall s':>8} {'MiB/s':>8} {'peak RSS MiB':>13}")
    for row in rows:
        print(f"{row['label']:44} {row['wall']:8.1f} {raw / MiB / row['wall']:8.1f} {row['rss_mb']:13.0f}")
    ratios = {"jobs2_over_jobs1": j2 / j1, "jobs1_over_plain": j1 / floor, "jobs2_over_plain": j2 / floor}
    print()
    print(f"jobs=2 / jobs=1 wall time:          {ratios['jobs2_over_jobs1']:.2f}")
    print(f"jobs=1 (dbops) / plain pg_restore:  {ratios['jobs1_over_plain']:.2f}")
    print(f"jobs=2 (dbops) / plain pg_restore:  {ratios['jobs2_over_plain']:.2f}")
    print(
        f"(one run each, {os.cpu_count()} cores; archive {raw / MiB:.0f} MiB, "
        f"database {db['database_bytes'] / MiB:.0f} MiB; RSS: dbops rows = the Python process's own peak "
        "(VmHWM), plain row = os.wait4 (an upper bound: includes the parent's RSS at spawn))"
    )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "bench_restore.json").write_text(
        json.dumps(
            {
                "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                "database": db,
                "backup": dumped,
                "rows": rows,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
