"""Point-in-time recovery RTO, dbops against `pgbackrest restore --type=time`, from the same data.

    uv run python -m bench.bench_pitr                          # ~300 MiB cluster + ~150 MiB of WAL, 2-4 min
    uv run python -m bench.bench_pitr --scale 66 --wal-mb 1024 # issue 13's ~1 GB + ~1 GB of WAL

One throwaway archiving cluster (1 MiB WAL segments, tests/harness/basebackup.py) whose archive_command
feeds both tools: `cp %p DIR/%f && pgbackrest --config=... --stanza=bench archive-push %p` (posix repo,
compress-type=zst, the config of bench/bench_basebackup.py, pgBackRest as the postgres OS user with its
config file passed by --config). `pgbench -i -s SCALE` (about 15 MiB per scale unit), then both base
backups at the same moment (pgbackrest backup --type=full running while the dbops base backup is taken
the way the tests take it), then `pgbench -n -c 2` in 10 s rounds (no vacuum, history kept) until WAL_MB
of WAL were written after both, then a commit after the target time, and every segment archived. Then
each tool recovers to that target time into its own data directory on its own port:
  dbops      flows.core.pitr.recovery.recover_cluster in a separate Python process (its own VmHWM)
  pgBackRest `pgbackrest restore --type=time --target=T --target-action=promote --archive-mode=off`
             under GNU time, then the server is started and watched exactly like dbops watches its own
Both copies must hold the same pgbench_history and not the commit after the target.

Columns: download/restore (dbops: fetch + sha256 + extract + pg_verifybackup; pgBackRest: its restore
command), replay (server start until the log says recovery stopped), start (until promoted and accepting
a connection), total. Peak RSS: the recovering tool's own processes (the dbops process, which also
prefetches WAL during replay; pgBackRest's restore and the largest of its archive-get processes), not the
PostgreSQL server, which is the same for both. Target: dbops total RTO ≤ 1.2x pgBackRest's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MAX_RTO_VS_PGBACKREST = 1.2
CHECK_SQL = "SELECT count(*), to_regclass('bench_after_target') IS NULL FROM pgbench_history"


class ProcPeaks(threading.Thread):
    """Peak VmHWM of every process whose command line contains `marker` (pgBackRest's short-lived
    archive-get processes are children of the recovering server, not of this process)."""

    def __init__(self, marker: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="proc-peaks")
        self.marker = marker.encode()
        self.interval = interval
        self.peak_kb = 0
        self.seen = 0
        self.done = threading.Event()

    def run(self) -> None:
        from bench.bench_dump import kb, proc_status

        pids: set[str] = set()
        while not self.done.wait(self.interval):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if self.marker not in (entry / "cmdline").read_bytes():
                        continue
                except OSError:
                    continue
                pids.add(entry.name)
                self.peak_kb = max(self.peak_kb, kb(proc_status(entry.name).get("VmHWM")))
        self.seen = len(pids)

    def stop(self) -> int:
        self.done.set()
        self.join(timeout=5)
        return self.peak_kb


def wal_since(cluster: Any, lsn: str) -> int:
    return int(cluster.sql(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn}')")[0][0])


def dbops_child(args_path: str) -> int:
    """In the child process: recover with dbops, check the copy, report the split and its own VmHWM."""
    from bench.bench_dump import ChildPeaks, kb, proc_status
    from flows.core.base_layout import BaseBackupManifest
    from flows.core.localstore import LocalObjectStore
    from flows.core.pitr.extract import server_user
    from flows.core.pitr.recovery import recover_cluster
    from flows.core.pitr.selection import choose_base_backup
    from flows.core.pitr.targets import parse_target
    from flows.core.wal_archive import WalArchive
    from tests.harness.basebackup import catalog_of

    a = json.loads(Path(args_path).read_text())
    sampler = ChildPeaks()
    sampler.start()
    archive = WalArchive(LocalObjectStore(Path(a["archive"])))
    target = parse_target(time=datetime.fromisoformat(a["target"]))
    manifest = BaseBackupManifest.model_validate_json(a["manifest"])
    choice = choose_base_backup(catalog_of(manifest), target, archive)
    before_kb = kb(proc_status("self").get("VmRSS"))
    report, server = recover_cluster(
        database="postgres",
        store=LocalObjectStore(Path(a["store"])),
        archive=archive,
        choice=choice,
        target=target,
        data_directory=Path(a["data_directory"]),
        port=a["port"],
        login_user=a["login_user"],
        login_database="postgres",
        user=server_user(),
        keep_running=True,
        ahead=16,
    )
    try:
        with server.connect(report.superuser, "postgres") as conn:
            row = conn.execute(CHECK_SQL).fetchone()
    finally:
        server.stop()
    Path(a["result"]).write_text(
        json.dumps(
            {
                "report": report.model_dump(mode="json"),
                "self_maxrss_kb": kb(proc_status("self").get("VmHWM")),
                "rss_before_kb": before_kb,
                "children_peak_kb": sampler.stop(),
                "check": list(row) if row else None,
            }
        )
    )
    return 0


def watch_recovery(server: Any, login_user: str, timeout: float = 3600) -> tuple[float, float, list[Any]]:
    """Start the server and time it the way flows.core.pitr.recovery.replay does: replay ends when the log
    says recovery stopped (or redo is done), start when it is promoted and accepts a connection."""
    import psycopg

    from flows.core.pitr.server import parse_log

    started = time.monotonic()
    server.start()
    replayed_at: float | None = None
    while time.monotonic() - started < timeout:
        now = time.monotonic()
        facts = parse_log(server.log())
        if facts.fatal:
            raise RuntimeError(f"the pgBackRest copy failed: {facts.fatal}; see {server.log_file}")
        if replayed_at is None and (facts.stopping or facts.redo_done_lsn):
            replayed_at = now
        if facts.consistent or facts.ready:
            try:
                with server.connect(login_user, "postgres") as conn:
                    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                    if row is not None and not row[0]:
                        reached = replayed_at or now
                        check = conn.execute(CHECK_SQL).fetchone()
                        return reached - started, time.monotonic() - reached, list(check or [])
            except psycopg.OperationalError:
                pass
        time.sleep(0.25)
    raise RuntimeError(f"the pgBackRest copy did not finish recovery within {timeout:.0f} s")


def restore_pgbackrest(
    conf: Path, passfile: Path, root: Path, target_time: datetime, port: int, superuser: str, version: int
) -> dict[str, Any]:
    from bench.bench_basebackup import chown_postgres, pgbackrest_argv
    from bench.bench_dump import run_measured
    from flows.core.pgtools import find_tool
    from flows.core.pitr.extract import server_user
    from flows.core.pitr.server import PgServer

    data, work = root / "pgbackrest-data", root / "pgbackrest-work"
    data.mkdir(mode=0o700)
    (work / "sock").mkdir(parents=True)
    chown_postgres(data)
    chown_postgres(work)
    (work / "sock").chmod(0o700)
    when = target_time.strftime("%Y-%m-%d %H:%M:%S.%f+00")
    argv = pgbackrest_argv(
        conf,
        passfile,
        f"--pg1-path={data}",
        "restore",
        "--type=time",
        f"--target={when}",
        "--target-action=promote",
        "--archive-mode=off",
    )
    peaks = ProcPeaks(str(conf))
    peaks.start()
    restored = run_measured(argv, env={"PATH": os.environ["PATH"], "HOME": str(root)})
    # the bench's part, as an operator would: its own port, a private socket with trust, logs to stderr
    hba = work / "pg_hba.conf"
    hba.write_text("local all all trust\n")
    chown_postgres(hba)
    with (data / "postgresql.auto.conf").open("a") as f:
        f.write(
            f"port = {port}\nunix_socket_directories = '{work / 'sock'}'\nlisten_addresses = 'localhost'\n"
            f"hba_file = '{hba}'\ncluster_name = 'bench-pgbackrest'\nlogging_collector = off\n"
            "log_destination = 'stderr'\nlc_messages = 'C'\nhot_standby = on\n"
        )
    restore_command = next(
        (
            line
            for line in (data / "postgresql.auto.conf").read_text().splitlines()
            if "restore_command" in line
        ),
        "",
    )
    server = PgServer(
        data_directory=data,
        pg_ctl=find_tool("pg_ctl", version).path,
        log_file=work / "server.log",
        socket_dir=work / "sock",
        port=port,
        user=server_user(),
    )
    try:
        replay, start, check = watch_recovery(server, superuser)
    finally:
        server.stop()
        peak_kb = peaks.stop()
    return {
        "restore": restored.wall,
        "replay": replay,
        "start": start,
        "restore_rss_mb": restored.rss_mb,
        "archive_get_rss_mb": peak_kb / 1024,
        "processes": peaks.seen,
        "check": check,
        "restore_command": restore_command,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scale", type=int, default=20, help="pgbench scale (about 15 MiB each)")
    parser.add_argument("--wal-mb", type=int, default=150, help="MiB of WAL to write after the base backups")
    parser.add_argument("--dbops-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dbops_child:
        return dbops_child(args.dbops_child)
    if shutil.which("pgbackrest") is None:
        print("pgbackrest is not installed: apt-get install pgbackrest", file=sys.stderr)
        return 2

    from bench.bench_basebackup import chown_postgres, dir_bytes, pgbackrest_argv, pgbackrest_config
    from bench.bench_basebackup import pgbackrest_passfile as make_passfile
    from flows.core.localstore import LocalObjectStore
    from flows.core.pgtools import find_tool
    from flows.core.pitr.workdir import free_local_port
    from flows.core.postgres import libpq_environment
    from tests.harness.basebackup import archiving_cluster, switch_and_archive, take_base_backup
    from tests.harness.factories import conn_params

    with archiving_cluster() as (cluster, archive_dir):
        root = cluster.base_dir.parent
        version = int(cluster.sql("SHOW server_version_num")[0][0])
        pgbench = str(find_tool("pgbench", version).path)
        conf, repo = pgbackrest_config(cluster, root)
        passfile = make_passfile(cluster, root)
        subprocess.run(pgbackrest_argv(conf, passfile, "stanza-create"), check=True)
        push = f"pgbackrest --config={conf} --stanza=bench archive-push %p"
        cluster.sql(f"ALTER SYSTEM SET archive_command = 'cp %p {archive_dir}/%f && {push}'")
        cluster.sql("SELECT pg_reload_conf()")
        switch_and_archive(cluster)  # the new archive_command works before anything is measured
        with libpq_environment(conn_params(cluster, "postgres")) as env:
            t = time.monotonic()
            subprocess.run(
                [pgbench, "-i", "-q", "-s", str(args.scale)], env=env, check=True, capture_output=True
            )
            print(f"pgbench -i -s {args.scale}: {time.monotonic() - t:.0f} s")
            (root / "store").mkdir()
            store = LocalObjectStore(root / "store")
            t = time.monotonic()
            pgbr_backup = subprocess.Popen(
                pgbackrest_argv(conf, passfile, "backup", "--type=full"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            manifest = take_base_backup(cluster, store, "bench", "postgres")
            out, _ = pgbr_backup.communicate()
            if pgbr_backup.returncode != 0:
                raise RuntimeError(f"pgbackrest backup failed: {out.decode(errors='replace')[-2000:]}")
            print(
                f"base backups (both at once) {time.monotonic() - t:.0f} s: "
                f"dbops {manifest.bytes / 2**20:.0f} MiB "
                f"stored ({manifest.raw_bytes / 2**20:.0f} MiB tar), pgBackRest "
                f"{dir_bytes(repo / 'backup') / 2**20:.0f} MiB"
            )
            t = time.monotonic()
            while wal_since(cluster, manifest.start_lsn) < args.wal_mb * 2**20:
                subprocess.run(
                    [pgbench, "-n", "-T", "10", "-c", "2"], env=env, check=True, capture_output=True
                )
        target_time = datetime.now(UTC)
        cluster.sql(
            "CREATE TABLE bench_after_target (t timestamptz DEFAULT now())"
        )  # a commit past the target
        switch_and_archive(cluster)
        wal = wal_since(cluster, manifest.start_lsn)
        print(
            f"WAL from the backups' start to the end: {wal / 2**20:.0f} MiB ({time.monotonic() - t:.0f} s of "
            f"pgbench); archives in all: directory {dir_bytes(archive_dir) / 2**20:.0f} MiB, pgBackRest's "
            f"{dir_bytes(repo / 'archive') / 2**20:.0f} MiB (zst); target {target_time.isoformat()}"
        )
        cluster.stop()  # neither recovery competes with the source server

        scratch = Path(tempfile.mkdtemp(prefix="dbops-bench-pitr-", dir=root))
        os.chmod(scratch, 0o755)
        result = scratch / "dbops.json"
        child_args = scratch / "args.json"
        child_args.write_text(
            json.dumps(
                {
                    "archive": str(archive_dir),
                    "store": str(root / "store"),
                    "manifest": manifest.to_json().decode(),
                    "target": target_time.isoformat(),
                    "data_directory": str(scratch / "dbops-data"),
                    "port": free_local_port(),
                    "login_user": cluster.superuser,
                    "result": str(result),
                }
            )
        )
        t = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "bench.bench_pitr", "--dbops-child", str(child_args)], check=True
        )
        dbops_process = time.monotonic() - t
        got = json.loads(result.read_text())
        chown_postgres(scratch)
        pgbr = restore_pgbackrest(
            conf, passfile, scratch, target_time, free_local_port(), cluster.superuser, version
        )
    report = got["report"]
    dbops = {
        "restore": report["download_seconds"],
        "replay": report["replay_seconds"],
        "start": report["start_seconds"],
        "rss": got["self_maxrss_kb"] / 1024,
    }
    dbops["total"] = dbops["restore"] + dbops["replay"] + dbops["start"]
    pb = {
        "restore": pgbr["restore"],
        "replay": pgbr["replay"],
        "start": pgbr["start"],
        "rss": max(pgbr["restore_rss_mb"], pgbr["archive_get_rss_mb"]),
    }
    pb["total"] = pb["restore"] + pb["replay"] + pb["start"]
    children = {k: round(v / 1024) for k, v in got["children_peak_kb"].items()}
    print(
        f"\ndbops: {report['segments_replayed']} segments replayed, "
        f"{report['bytes_downloaded'] / 2**20:.0f} MiB downloaded, reached {report['reached_lsn']} "
        f"({report['stopped_by']}); RSS {got['rss_before_kb'] / 1024:.0f} MB before recovery "
        f"(interpreter and imports); child process {dbops_process:.1f} s with interpreter and imports; "
        f"children's peak MB {children}"
    )
    print(
        f"pgBackRest: restore peak {pgbr['restore_rss_mb']:.0f} MB, archive-get peak "
        f"{pgbr['archive_get_rss_mb']:.0f} MB ({pgbr['processes']} processes seen); {pgbr['restore_command']}"
    )
    print(
        f"copies agree: dbops {got['check']}, pgBackRest {pgbr['check']} (history rows, no post-target table)"
    )
    print(
        f"\n{os.cpu_count()} cores, scale {args.scale}, {wal / 2**20:.0f} MiB of WAL after the backups, "
        "one run each\n"
    )
    print("| | download/restore s | replay s | start s | total RTO s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("dbops recover_cluster", dbops), ("pgbackrest restore --type=time", pb)):
        print(
            f"| {name} | {r['restore']:.1f} | {r['replay']:.1f} | {r['start']:.1f} | {r['total']:.1f} | "
            f"{r['rss']:.0f} |"
        )
    ratio = {k: dbops[k] / pb[k] if pb[k] else float("inf") for k in dbops}
    print(
        f"| dbops / pgBackRest | {ratio['restore']:.2f} | {ratio['replay']:.2f} | {ratio['start']:.2f} | "
        f"{ratio['total']:.2f} | {ratio['rss']:.2f} |"
    )
    same = got["check"] == pgbr["check"] and bool(got["check"]) and got["check"][1] is True
    ok = ratio["total"] <= MAX_RTO_VS_PGBACKREST and same
    print(
        f"\n{'PASS' if ok else 'FAIL'}: dbops total RTO {dbops['total']:.1f} s = {ratio['total']:.2f}x "
        f"pgBackRest's {pb['total']:.1f} s (target ≤ {MAX_RTO_VS_PGBACKREST}x)"
        + ("" if same else "; the two copies differ")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
