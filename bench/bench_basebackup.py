"""bench_basebackup: the base_backup flow against pgBackRest and the pg_basebackup floor (bench/README.md).

    uv run python -m bench.bench_basebackup                 # ~1 GB cluster
    uv run python -m bench.bench_basebackup --size 200MB
    uv run python -m bench.bench_basebackup --workdir DIR   # reuse a kept cluster (--keep)

Same cluster (archiving with `cp %p DIR/%f`), same local disk, one run each:
  a. pg_basebackup -D - -Ft -X none --checkpoint=fast > /dev/null   the floor: read and send, nothing kept
  b. pgbackrest backup --type=full (posix repo, compress-type=zst, process-max=2)
  c. dbops base_backup flow into a local-file-system block (verify=list, WAL confirmed in the archive)
  d. the same flow with verify=none: the stream alone, which is all pgBackRest's backup does
Targets: c ≤ 1.1x b's wall time, c's output ≤ 1.05x b's, c's peak RSS < 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_dump import (
    DBNAME,
    ChildPeaks,
    Measured,
    MiB,
    build_database,
    kb,
    proc_status,
    run_measured,
    save_database_block,
)

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
MAX_WALL_VS_PGBACKREST = 1.1
MAX_BYTES_VS_PGBACKREST = 1.05
MAX_FLOW_RSS_MB = 300
DB_BLOCK = "bench-base-imagemanager"
STORE_BLOCK = "bench-base-local"
STANZA = "bench"


def as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres", str(path)], check=True)


def open_archiving_cluster(workdir: Path) -> Any:
    from deployments.sandbox import PgCluster, free_port

    archive = workdir / "wal_archive"
    archive.mkdir(exist_ok=True)
    chown_postgres(archive)
    settings = {"wal_level": "replica", "archive_mode": "on", "archive_command": f"'cp %p {archive}/%f'"}
    meta = workdir / "cluster.json"
    if meta.exists():
        saved = json.loads(meta.read_text())
        cluster = PgCluster(base_dir=workdir / "pg", port=free_port(), password=saved["password"])
        with (cluster.data_dir / "postgresql.auto.conf").open("a") as f:
            f.write(f"port = {cluster.port}\n")
    else:
        cluster = PgCluster(base_dir=workdir / "pg", port=free_port(), settings=settings)
        cluster.init()
        fd = os.open(meta, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"password": cluster.password}, f)
    cluster.start()
    return cluster


def pgbackrest_config(cluster: Any, workdir: Path) -> tuple[Path, Path]:
    repo = workdir / "pgbackrest-repo"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir()
    (workdir / "pgbackrest-log").mkdir(exist_ok=True)
    conf = workdir / "pgbackrest.conf"
    conf.write_text(
        f"""[global]
repo1-path={repo}
repo1-retention-full=10
compress-type=zst
process-max=2
start-fast=y
archive-check=n
log-path={workdir / "pgbackrest-log"}
lock-path={workdir / "pgbackrest-log"}
log-level-console=warn

[{STANZA}]
pg1-path={cluster.data_dir}
pg1-port={cluster.port}
pg1-socket-path={cluster.socket_dir}
pg1-user={cluster.superuser}
"""
    )
    chown_postgres(repo)
    chown_postgres(workdir / "pgbackrest-log")
    chown_postgres(conf)
    return conf, repo


def pgbackrest_passfile(cluster: Any, workdir: Path) -> Path:
    """The superuser's password for pgBackRest's own libpq connections (backup, stanza-create), mode 0600."""
    passfile = workdir / "pgpass"
    passfile.write_text(f"*:*:*:{cluster.superuser}:{cluster.password}\n")
    passfile.chmod(0o600)
    chown_postgres(passfile)
    return passfile


def pgbackrest_argv(conf: Path, passfile: Path, *args: str) -> list[str]:
    """pgbackrest as the postgres OS user with this bench's config file and stanza (no system config)."""
    base = ["pgbackrest", f"--config={conf}", f"--stanza={STANZA}", *args]
    return as_postgres(["env", f"PGPASSFILE={passfile}", *base])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def flow_child(database: str, storage: str, archive: str, result_path: str, verify: str) -> int:
    """In the child process: run the flow, report its own wall time and peak RSS (VmHWM)."""
    from flows.base_backup import base_backup
    from flows.core.wal_archive import ArchiveLocation

    sampler = ChildPeaks()
    sampler.start()
    t1 = time.monotonic()
    state = base_backup(
        database=database,
        storage=storage,
        archive=ArchiveLocation(directory=archive),
        verify=verify,  # list or none, from the parent
        return_state=True,
    )
    t2 = time.monotonic()
    peaks = sampler.stop()
    report = state.result()
    me = resource.getrusage(resource.RUSAGE_SELF)
    Path(result_path).write_text(
        json.dumps(
            {
                "flow_seconds": t2 - t1,
                "self_maxrss_kb": kb(proc_status("self").get("VmHWM")),
                "self_cpu": me.ru_utime + me.ru_stime,
                "children_peak_kb": peaks,
                "report": report.model_dump(mode="json"),
            },
            indent=2,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_basebackup")
    parser.add_argument("--size", default="1GB")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--flow-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flow_child:
        return flow_child(*args.flow_child)
    if shutil.which("pgbackrest") is None:
        print("pgbackrest is not installed: apt-get install pgbackrest", file=sys.stderr)
        return 2

    from examples.imagemanager.generate import parse_size

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="dbops-bench-base-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    keep = args.keep or args.workdir is not None
    os.chmod(workdir, 0o755)
    cluster = None
    try:
        cluster = open_archiving_cluster(workdir)
        print(f"== cluster in {workdir}; imagemanager ~{args.size}")
        db = build_database(cluster, workdir, parse_size(args.size))
        cluster_bytes = int(cluster.sql("SELECT sum(pg_database_size(oid)) FROM pg_database")[0][0])
        print(f"   cluster {cluster_bytes / MiB:.0f} MiB")
        results = run_all(cluster, workdir)
        results["cluster_bytes"] = cluster_bytes
        results["database"] = db
    finally:
        if cluster is not None:
            cluster.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    (OUT_DIR / "bench_basebackup.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0 if all(t["pass"] for t in results["targets"]) else 1


def run_all(cluster: Any, workdir: Path) -> dict[str, Any]:
    from prefect.filesystems import LocalFileSystem
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.core.pgtools import find_tool
    from flows.core.postgres import ConnParams, libpq_environment
    from tests.harness.basebackup import tar_to_stdout_argv

    version = int(cluster.sql("SHOW server_version_num")[0][0])
    pg_basebackup = find_tool("pg_basebackup", version).path
    params = ConnParams(cluster.host, cluster.port, DBNAME, cluster.superuser, cluster.password)
    rows: dict[str, dict[str, Any]] = {}
    with libpq_environment(params) as env:
        floor_argv = tar_to_stdout_argv(pg_basebackup, "--no-password")
        print("== warm-up pg_basebackup > /dev/null (not measured)")
        run_measured(floor_argv, env=env)
        print("== a. pg_basebackup -D - -Ft > /dev/null")
        floor = run_measured(floor_argv, env=env)
        rows["a. pg_basebackup -Ft -D - > /dev/null (floor)"] = _row(floor, None)

    print("== b. pgbackrest backup --type=full (zst, process-max=2)")
    conf, repo = pgbackrest_config(cluster, workdir)
    passfile = pgbackrest_passfile(cluster, workdir)
    pb_env = {"PATH": os.environ["PATH"], "PGPASSFILE": str(passfile), "HOME": str(workdir)}
    subprocess.run(pgbackrest_argv(conf, passfile, "stanza-create"), check=True)
    pgbr = run_measured(pgbackrest_argv(conf, passfile, "backup", "--type=full"), env=pb_env)
    pgbr_bytes = dir_bytes(repo / "backup")
    rows["b. pgbackrest backup --type=full"] = _row(pgbr, pgbr_bytes)

    print("== c. dbops base_backup flow (separate Python process)")
    store_dir = workdir / "dbops-store"
    shutil.rmtree(store_dir, ignore_errors=True)
    store_dir.mkdir()
    with prefect_test_harness(server_startup_timeout=120):
        save_database_block(cluster, DB_BLOCK, DBNAME)
        LocalFileSystem(basepath=str(store_dir)).save(STORE_BLOCK, overwrite=True)
        env = {
            **os.environ,
            "PREFECT_API_URL": str(PREFECT_API_URL.value()),
            "PREFECT_HOME": str(workdir / "prefect-home"),
            "DBOPS_TASK_RETRIES": "0",
        }
        runs: dict[str, tuple[Measured, dict[str, Any]]] = {}
        for verify in ("list", "none"):  # none: the stream alone, what pgBackRest's backup does
            result_path = workdir / f"flow-result-{verify}.json"
            argv = [
                sys.executable,
                "-m",
                "bench.bench_basebackup",
                "--flow-child",
                DB_BLOCK,
                f"local-file-system/{STORE_BLOCK}",
                str(workdir / "wal_archive"),
                str(result_path),
                verify,
            ]
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            m = run_measured(argv, env=env, log=OUT_DIR / f"basebackup-flow-{verify}.log")
            runs[verify] = (m, json.loads(result_path.read_text()))
    proc, child = runs["list"]
    report = child["report"]
    flow_rss = child["self_maxrss_kb"] / 1024
    for verify, (m, got) in runs.items():
        name = "c. dbops base_backup (flow run)" if verify == "list" else "d. dbops base_backup, verify=none"
        rows[name] = {
            "wall": got["flow_seconds"],
            "cpu": m.cpu,
            "server_cpu": m.server_cpu,
            "bytes": got["report"]["bytes"],
            "rss_mb": got["self_maxrss_kb"] / 1024,
            "note": "flow process VmHWM; children: "
            + ", ".join(f"{k} {v / 1024:.0f}" for k, v in sorted(got["children_peak_kb"].items())),
        }
    rows["   c: whole process (interpreter, imports, flow)"] = _row(proc, None)
    c, b = rows["c. dbops base_backup (flow run)"], rows["b. pgbackrest backup --type=full"]
    targets = [
        {
            "what": f"wall ≤ {MAX_WALL_VS_PGBACKREST}x pgBackRest",
            "value": c["wall"] / b["wall"],
            "pass": c["wall"] / b["wall"] <= MAX_WALL_VS_PGBACKREST,
        },
        {
            "what": f"output ≤ {MAX_BYTES_VS_PGBACKREST}x pgBackRest",
            "value": c["bytes"] / b["bytes"],
            "pass": c["bytes"] / b["bytes"] <= MAX_BYTES_VS_PGBACKREST,
        },
        {
            "what": f"flow peak RSS < {MAX_FLOW_RSS_MB} MB",
            "value": flow_rss,
            "pass": flow_rss < MAX_FLOW_RSS_MB,
        },
    ]
    return {"rows": rows, "targets": targets, "raw_bytes": report["raw_bytes"], "cores": os.cpu_count()}


def _row(m: Measured, nbytes: int | None) -> dict[str, Any]:
    return {
        "wall": m.wall,
        "cpu": m.cpu,
        "server_cpu": m.server_cpu,
        "bytes": nbytes,
        "rss_mb": m.rss_mb,
        "note": "",
    }


def print_table(results: dict[str, Any]) -> None:
    rows = results["rows"]
    floor = rows["a. pg_basebackup -Ft -D - > /dev/null (floor)"]["wall"]
    pgbr = rows["b. pgbackrest backup --type=full"]["wall"]
    print(
        f"\ncluster {results['cluster_bytes'] / MiB:.0f} MiB, tar {results['raw_bytes'] / MiB:.0f} MiB, "
        f"{results['cores']} cores, one run each\n"
    )
    print("| line | wall s | x floor | x pgBackRest | CPU s own | output MiB | peak RSS MB | |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        out = f"{r['bytes'] / MiB:.1f}" if r["bytes"] else ""
        print(
            f"| {name} | {r['wall']:.1f} | {r['wall'] / floor:.2f} | {r['wall'] / pgbr:.2f} "
            f"| {r['cpu']:.1f} | {out} | {r['rss_mb']:.0f} | {r['note']} |"
        )
    print()
    for t in results["targets"]:
        print(f"- {t['what']}: {t['value']:.2f} {'pass' if t['pass'] else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
