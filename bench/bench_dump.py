"""How nightly_dump compares with pg_dump alone and with the usual backup shell script.

    uv run python -m bench.bench_dump [--size 1GB] [--keep] [--workdir DIR] [--level N]

Builds an imagemanager database (Alembic head, then examples/imagemanager/generate.py, then VACUUM FREEZE)
in a throwaway PostgreSQL cluster, starts the moto S3 server and a Prefect API (prefect_test_harness), then
measures one run each of:

  a. pg_dump -Fc > /dev/null        pg_dump with its own zlib compression, nothing stored
  b. pg_dump -Fc -Z0 > /dev/null    the extraction floor: no compression, nothing stored
  c. the shell-script way           pg_dump -Fc -f FILE; tar -czf FILE.tar.gz FILE; upload the tarball
  d. the dbops flow                 nightly_dump(verify="list") into the same S3 endpoint, in its own
                                    Python process so that process's peak RSS can be read

and prints a table, the targets with PASS/FAIL, and writes bench/out/bench_dump.json.

Everything runs on this machine: the PostgreSQL server, moto (the S3 endpoint) and the Prefect API take
CPU from the same cores as the thing being measured, so the table also shows their CPU seconds, and the
CPU seconds of unrelated processes during each measurement (each one waits for a quiet machine first).
Passwords reach pg_dump through a 0600 passfile (flows.core.postgres.libpq_environment), never argv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
DBNAME = "imagemanager"
BUCKET = "bench-backups"
DB_BLOCK = "bench-imagemanager"
S3_BLOCK = "bench-s3"
MiB = 1024 * 1024
TIME = Path("/usr/bin/time")
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: the targets: flow vs the shell script, vs the extraction floor, output size, memory
MIN_SPEEDUP_VS_SHELL = 1.8
MAX_RATIO_VS_FLOOR = 1.2
MAX_FLOW_RSS_MB = 300

#: a measurement starts once the machine has been this quiet (busy cores, 1 s samples) twice in a row,
#: or after waiting QUIET_MAX_WAIT_S (QUIET_TOTAL_WAIT_S over the whole bench) for that
QUIET_BUSY_CORES = 0.3
QUIET_MAX_WAIT_S = 20.0
QUIET_TOTAL_WAIT_S = 120.0


# -- CPU accounting ----------------------------------------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def process_cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """utime + stime of a process; with `reaped_children`, plus that of the children it has waited for."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(stat[11]) + int(stat[12])  # fields 14 and 15 of proc(5)
    if reaped_children:
        ticks += int(stat[13]) + int(stat[14])  # cutime, cstime
    return ticks / CLK_TCK


@dataclass
class Watch:
    """Where else CPU goes during a measurement: PostgreSQL, moto, the Prefect API and everything else.

    The server's backends are children of the postmaster: their CPU shows in its cutime once reaped.
    """

    postmaster: int
    moto: int
    api: int | None
    waited: float = 0.0

    def sample(self) -> dict[str, float]:
        return {
            "machine": machine_busy_seconds(),
            "server": process_cpu_seconds(self.postmaster, reaped_children=True),
            "moto": process_cpu_seconds(self.moto),
            "api": process_cpu_seconds(self.api) if self.api else 0.0,
        }

    def wait_quiet(self) -> float:
        """Wait (within the budgets) until nothing else keeps the cores busy; returns seconds waited."""
        t0 = time.monotonic()
        limit = min(QUIET_MAX_WAIT_S, QUIET_TOTAL_WAIT_S - self.waited)
        calm = 0
        while time.monotonic() - t0 < limit and calm < 2:
            before = machine_busy_seconds()
            time.sleep(1.0)
            calm = calm + 1 if machine_busy_seconds() - before < QUIET_BUSY_CORES else 0
        waited = time.monotonic() - t0
        self.waited += waited
        return waited


WATCH: Watch | None = None


@dataclass
class Measured:
    """A finished process: wall time, peak RSS and CPU time of it and of the children it waited for."""

    wall: float
    maxrss_kb: int  # the process and the descendants it waited for (e.g. tar's gzip)
    cpu: float  # user + system seconds, same scope
    wait4_maxrss_kb: int  # what os.wait4 said; see run_measured for why it is not used when TIME exists
    server_cpu: float = 0.0  # PostgreSQL backends during the run
    s3_api_cpu: float = 0.0  # moto and the Prefect API server during the run
    other_cpu: float = 0.0  # every other process on the machine during the run
    waited_for_quiet: float = 0.0

    @property
    def rss_mb(self) -> float:
        return self.maxrss_kb / 1024


def run_measured(argv: list[str], *, env: dict[str, str], log: Path | None = None) -> Measured:
    """Run argv to completion, reaped with os.wait4: its wall time, peak RSS and CPU time.

    Linux carries a process's RSS high-water mark across fork/vfork and exec into the child's rusage, so
    os.wait4 on a child of this (~200 MB, Prefect imported) process reports at least ~200 MB for a pg_dump
    that used 13. GNU time is a ~1 MB process in between: the rusage it gets from wait4 for *its* child
    is the child's own. Without /usr/bin/time the wait4 figure is used, and is an upper bound.
    stdout is discarded unless `log` is given (then stdout and stderr both go there).
    """
    waited = WATCH.wait_quiet() if WATCH else 0.0
    fd, timing = tempfile.mkstemp(prefix="dbops-bench-time-")
    os.close(fd)
    full = [str(TIME), "-f", "%M %U %S", "-o", timing, *argv] if TIME.exists() else argv
    with tempfile.TemporaryFile() if log is None else open(log, "w+b") as err:
        out = subprocess.DEVNULL if log is None else err
        before = WATCH.sample() if WATCH else None
        t0 = time.monotonic()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if WATCH:
            time.sleep(0.3)  # let the postmaster reap the backend, so its CPU is counted
        after = WATCH.sample() if WATCH else None
        err.seek(0)
        tail = err.read()[-4000:].decode(errors="replace")
    timed = Path(timing).read_text().split()
    os.unlink(timing)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited with {proc.returncode}:\n{tail}")
    if TIME.exists() and len(timed) >= 3:
        rss, cpu = int(timed[-3]), float(timed[-2]) + float(timed[-1])
    else:
        rss, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    m = Measured(wall, rss, cpu, usage.ru_maxrss, waited_for_quiet=round(waited, 1))
    if before and after:
        d = {k: after[k] - before[k] for k in after}
        m.server_cpu = d["server"]
        m.s3_api_cpu = d["moto"] + d["api"]
        m.other_cpu = max(0.0, d["machine"] - cpu - d["server"] - m.s3_api_cpu)
    return m


# -- setup: cluster, database, S3, Prefect -----------------------------------------------------------------


def build_database(cluster: Any, workdir: Path, target_bytes: int) -> dict[str, Any]:
    """imagemanager at Alembic head with ~target_bytes of data, vacuumed; skipped when a kept one matches."""
    import psycopg.sql

    from deployments.sample_app import alembic_upgrade
    from examples.imagemanager.generate import generate

    marker = workdir / "database.json"
    if marker.exists() and json.loads(marker.read_text()).get("target_bytes") == target_bytes:
        info = json.loads(marker.read_text())
        info["reused"] = True
        return info
    if cluster.sql("SELECT 1 FROM pg_database WHERE datname = %s", params=[DBNAME]):
        with cluster.connect() as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE {}").format(psycopg.sql.Identifier(DBNAME)))
    t0 = time.monotonic()
    cluster.create_database(DBNAME)
    alembic_upgrade(cluster.host, cluster.port, cluster.superuser, cluster.password, DBNAME, quiet=True)
    t1 = time.monotonic()
    counts = generate(cluster.conninfo(DBNAME), target_bytes=target_bytes, seed=0)
    t2 = time.monotonic()
    # Set hint bits and the visibility map now, so the first measured pg_dump does not pay for them.
    cluster.sql("VACUUM (FREEZE, ANALYZE)", dbname=DBNAME)
    cluster.sql("CHECKPOINT")
    t3 = time.monotonic()
    size = cluster.sql("SELECT pg_database_size(%s)", params=[DBNAME])[0][0]
    info = {
        "target_bytes": target_bytes,
        "database_bytes": int(size),
        "rows": counts,
        "alembic_seconds": round(t1 - t0, 1),
        "generate_seconds": round(t2 - t1, 1),
        "vacuum_seconds": round(t3 - t2, 1),
    }
    marker.write_text(json.dumps(info, indent=2))
    info["reused"] = False
    return info


def save_database_block(cluster: Any, block: str, dbname: str, **fields: Any) -> None:
    """The PostgresDatabase block a flow takes: the bench cluster's superuser on `dbname` (every bench
    makes it this way; `fields` adds the others, such as application_name)."""
    from blocks import PostgresDatabase

    PostgresDatabase(
        host=cluster.host,
        port=cluster.port,
        database=dbname,
        user=cluster.superuser,
        password=cluster.password,
        **fields,
    ).save(block, overwrite=True)


def save_blocks(cluster: Any, s3_url: str) -> tuple[str, str]:
    """The two blocks the flow takes, as tests/conftest.py makes them."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY

    save_database_block(cluster, DB_BLOCK, DBNAME, application_name="dbops-bench")
    creds = AwsCredentials(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_url),
    )
    S3Bucket(bucket_name=BUCKET, credentials=creds, bucket_folder="").save(S3_BLOCK, overwrite=True)
    return DB_BLOCK, f"s3-bucket/{S3_BLOCK}"


# -- the measurements --------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    wall: float
    cpu: float | None = None
    server_cpu: float | None = None
    s3_api_cpu: float | None = None
    other_cpu: float | None = None
    bytes: int | None = None
    rss_mb: float | None = None
    rss_note: str = ""
    steps: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, label: str, m: Measured, nbytes: int | None = None, rss_note: str = "") -> Row:
        return cls(label, m.wall, m.cpu, m.server_cpu, m.s3_api_cpu, m.other_cpu, nbytes, m.rss_mb, rss_note)


def measure_pg_dump(pg_dump: Path, env: dict[str, str], label: str, *args: str) -> Row:
    m = run_measured([str(pg_dump), "--no-password", *args, DBNAME], env=env)
    return Row.of(label, m, rss_note="pg_dump")


def measure_shell_way(pg_dump: Path, env: dict[str, str], workdir: Path, s3_url: str) -> Row:
    """pg_dump -Fc -f FILE && tar -czf FILE.tar.gz FILE && upload: what a cron job usually does."""
    from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY

    dump = workdir / f"{DBNAME}.dump"
    tarball = workdir / f"{DBNAME}.dump.tar.gz"
    for path in (dump, tarball):
        path.unlink(missing_ok=True)
    dumped = run_measured([str(pg_dump), "--no-password", "-Fc", "-f", str(dump), DBNAME], env=env)
    tarred = run_measured(["tar", "-czf", str(tarball), "-C", str(workdir), dump.name], env=dict(os.environ))
    upload_env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }
    # what `aws s3 cp` does (the AWS CLI is not installed here): s3transfer's multipart upload_file
    code = (
        "import sys, boto3; boto3.client('s3', endpoint_url=sys.argv[1])"
        ".upload_file(sys.argv[2], sys.argv[3], sys.argv[4])"
    )
    uploaded = run_measured(
        [sys.executable, "-c", code, s3_url, str(tarball), BUCKET, f"shell/{tarball.name}"], env=upload_env
    )
    parts = {
        "pg_dump -Fc -f file": (dumped, dump.stat().st_size, "pg_dump"),
        "tar -czf": (tarred, tarball.stat().st_size, "tar + gzip"),
        "upload (boto3 upload_file)": (uploaded, None, "python uploader"),
    }
    peak = max(parts.values(), key=lambda p: p[0].maxrss_kb)
    steps = {name: asdict(m) | {"bytes": n, "what": what} for name, (m, n, what) in parts.items()}
    ms = [m for m, _, _ in parts.values()]
    return Row(
        "c. shell script: pg_dump -Fc -f, tar -czf, upload",
        sum(m.wall for m in ms),
        sum(m.cpu for m in ms),
        sum(m.server_cpu for m in ms),
        sum(m.s3_api_cpu for m in ms),
        sum(m.other_cpu for m in ms),
        tarball.stat().st_size,
        peak[0].rss_mb,
        peak[2],
        steps,
    )


def measure_flow(
    database: str, storage: str, api_url: str, workdir: Path, level: int | None
) -> tuple[Measured, dict[str, Any]]:
    """nightly_dump in a child Python process: os.wait4 on it, and what the child reports about itself."""
    result_path = workdir / "flow-result.json"
    result_path.unlink(missing_ok=True)
    log = OUT_DIR / "flow.log"
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(workdir / "prefect-home"),
        "DBOPS_TASK_RETRIES": "0",  # a failure should show, not be retried into the timing
    }
    argv = [sys.executable, "-m", "bench.bench_dump", "--flow-child", database, storage, str(result_path)]
    if level is not None:
        argv += ["--level", str(level)]
    try:
        m = run_measured(argv, env=env, log=log)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n(flow output in {log})") from None
    return m, json.loads(result_path.read_text())


def proc_status(pid: str) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def kb(value: str | None) -> int:
    return int(value.split()[0]) if value else 0


class ChildPeaks(threading.Thread):
    """Samples the VmHWM (the kernel's own peak RSS of that process) of our children, by command name.

    getrusage(RUSAGE_CHILDREN) would report this ~200 MB process's RSS for every child (see
    run_measured); VmHWM belongs to the child's own address space since its exec. A child that lives
    less than one interval may be missed.
    """

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="child-peaks")
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            for task in Path("/proc/self/task").iterdir():
                try:
                    pids = (task / "children").read_text().split()
                except OSError:
                    continue
                for pid in pids:
                    status = proc_status(pid)
                    name, hwm = status.get("Name", "?").strip(), kb(status.get("VmHWM"))
                    self.peaks[name] = max(self.peaks.get(name, 0), hwm)

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.join(timeout=5)
        return self.peaks


def instrument_dump() -> dict[str, float]:
    """Observe (not change) the dump: when pg_dump's output ended, how long S3 took to complete the upload."""
    from flows.core.pgtools import ToolRun
    from flows.core.s3store import S3ObjectStore

    marks: dict[str, float] = {}
    chunks, call = ToolRun.chunks, S3ObjectStore._call

    def timed_chunks(self: ToolRun) -> Iterator[bytes]:
        marks.setdefault("pg_dump_started", time.monotonic())
        yield from chunks(self)
        marks["pg_dump_eof"] = time.monotonic()

    def timed_call(self: S3ObjectStore, action: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        t0 = time.monotonic()
        try:
            return call(self, action, fn, **kwargs)
        finally:
            if action == "complete multipart upload":
                marks["complete_started"] = t0
                marks["complete_ended"] = time.monotonic()

    # the bench wraps two methods to time them, in its own child process only
    ToolRun.chunks = timed_chunks  # type: ignore[method-assign]
    S3ObjectStore._call = timed_call  # type: ignore[method-assign]
    return marks


def flow_child(database: str, storage: str, result_path: str, level: int | None) -> int:
    """Runs in the child process: import, run the flow, report timings and our own peak RSS."""
    t0 = time.monotonic()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.nightly_dump import nightly_dump

    marks = instrument_dump()
    sampler = ChildPeaks()
    sampler.start()
    t1 = time.monotonic()
    state = nightly_dump(
        database=database, storage=storage, verify="list", compression_level=level, return_state=True
    )
    t2 = time.monotonic()
    child_peaks = sampler.stop()
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = state.result()
    flow_run_id = state.state_details.flow_run_id
    tasks: dict[str, float] = {}
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        for run in runs:
            if run.start_time and run.end_time:
                name = run.name.rsplit("-", 1)[0]
                tasks[name] = tasks.get(name, 0.0) + (run.end_time - run.start_time).total_seconds()
    dump = {}
    if {"pg_dump_started", "pg_dump_eof", "complete_started", "complete_ended"} <= marks.keys():
        start = marks["pg_dump_started"]
        dump = {
            "pg_dump_output_ended_s": marks["pg_dump_eof"] - start,
            "complete_multipart_started_s": marks["complete_started"] - start,
            "complete_multipart_s": marks["complete_ended"] - marks["complete_started"],
            "upload_done_s": marks["complete_ended"] - start,
        }
    out = {
        "import_seconds": t1 - t0,
        "flow_seconds": t2 - t1,
        # VmHWM: this process's own peak since exec (ru_maxrss also holds the parent's RSS at spawn time)
        "self_maxrss_kb": kb(proc_status("self").get("VmHWM")),
        "self_ru_maxrss_kb": me.ru_maxrss,
        "self_cpu": me.ru_utime + me.ru_stime,
        "children_peak_kb": child_peaks,
        "children_ru_maxrss_kb": kids.ru_maxrss,
        "children_cpu": kids.ru_utime + kids.ru_stime,
        "report": report.model_dump(mode="json"),
        "tasks": tasks,
        "dump": dump,
    }
    Path(result_path).write_text(json.dumps(out, indent=2))
    return 0


# -- reporting ---------------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_table(rows: list[Row], floor: float, fc: float, shell: float) -> None:
    cols = [
        ("wall s", 7),
        ("x floor", 7),
        ("x -Fc", 6),
        ("shell/", 6),
        ("CPU s", 6),
        ("pg CPU", 6),
        ("S3+API", 6),
        ("others", 6),
        ("output bytes", 13),
        ("peak RSS MB", 11),
    ]
    print(f"{'':50} " + " ".join(f"{name:>{w}}" for name, w in cols))
    print(
        f"{'':50} "
        + " ".join(
            f"{sub:>{w}}"
            for sub, (_, w) in zip(
                ["", "", "", "this", "own", "server", "CPU s", "CPU s", "", ""], cols, strict=True
            )
        )
    )
    print("-" * (51 + sum(w + 1 for _, w in cols)))
    for r in rows:
        main = not r.label.startswith("   ")
        cells = [
            fmt(r.wall, ".1f"),
            fmt(r.wall / floor if main else None, ".2f"),
            fmt(r.wall / fc if main else None, ".2f"),
            fmt(shell / r.wall if main else None, ".2f"),
            fmt(r.cpu, ".1f"),
            fmt(r.server_cpu, ".1f"),
            fmt(r.s3_api_cpu, ".1f"),
            fmt(r.other_cpu, ".1f"),
            fmt(r.bytes, ",d"),
            fmt(r.rss_mb, ".0f"),
        ]
        line = f"{r.label:50} " + " ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, cols, strict=True))
        print(f"{line} {r.rss_note}".rstrip())


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem / 1024**3, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_dump", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GB", help="approximate size of the generated data (default 1GB)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (cluster, dump files)")
    parser.add_argument("--workdir", type=Path, help="work directory; one kept by --keep is reused as is")
    parser.add_argument("--level", type=int, help="compression_level for the flow (default: the flow's)")
    parser.add_argument("--flow-child", nargs=3, metavar=("DB", "STORAGE", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flow_child:
        database, storage, result_path = args.flow_child
        return flow_child(database, storage, result_path, level=args.level)

    from examples.imagemanager.generate import parse_size

    target = parse_size(args.size)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if args.workdir:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        keep = True
    else:
        workdir = Path(tempfile.mkdtemp(prefix="dbops-bench-"))
        keep = args.keep
    os.chmod(workdir, 0o755)  # the server may run as the postgres user and must reach its data directory
    started = datetime.now(UTC)
    t_start = time.monotonic()
    cluster = None
    try:
        print(f"== cluster in {workdir}")
        from deployments.sandbox import persistent_cluster

        cluster = persistent_cluster(workdir / "pg")  # a kept WORKDIR reuses it (same port and password)
        print(f"== imagemanager database, ~{args.size} (Alembic head + generate.py, then VACUUM FREEZE)")
        db = build_database(cluster, workdir, target)
        print(
            "   "
            + ("reused from an earlier run; " if db["reused"] else "")
            + f"{db['database_bytes'] / MiB:.0f} MiB on disk, rows: {db['rows']}"
        )
        results = run_all(cluster, workdir, db, args.level)
    finally:
        if cluster is not None:
            cluster.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"\nkept {workdir} (reuse it with --workdir {workdir})")
    results["started_at"] = started.isoformat(timespec="seconds")
    results["bench_seconds"] = round(time.monotonic() - t_start, 1)
    out = OUT_DIR / "bench_dump.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out.relative_to(ROOT)} (whole bench: {results['bench_seconds']:.0f} s)")
    return 0 if all(t["pass"] for t in results["targets"]) else 1


def run_all(cluster: Any, workdir: Path, db: dict[str, Any], level: int | None) -> dict[str, Any]:
    global WATCH
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.core.pgtools import find_tool
    from flows.core.postgres import ConnParams, libpq_environment
    from tests.harness.s3 import s3_endpoint

    version_num = int(cluster.sql("SHOW server_version_num")[0][0])
    server_version = cluster.sql("SHOW server_version")[0][0]
    pg_dump = find_tool("pg_dump", version_num).path
    params = ConnParams(
        host=cluster.host,
        port=cluster.port,
        database=DBNAME,
        user=cluster.superuser,
        password=cluster.password,
        application_name="bench",
    )
    print("== moto S3 server and Prefect API")
    with (
        s3_endpoint() as s3,
        prefect_test_harness(server_startup_timeout=120),
        libpq_environment(params) as env,
    ):
        s3.create_bucket(BUCKET)
        database, storage = save_blocks(cluster, s3.url)
        api_url = str(PREFECT_API_URL.value())
        api_server = SubprocessASGIServer._instances.get(None)
        api_process = getattr(api_server, "server_process", None)
        postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
        WATCH = Watch(postmaster, s3.process.pid, api_process.pid if api_process else None)
        try:
            print("== warm-up: pg_dump -Fc -Z0 > /dev/null (not measured)")
            warm = run_measured([str(pg_dump), "--no-password", "-Fc", "-Z0", DBNAME], env=env)
            print(f"   {warm.wall:.1f} s")
            print("== b. pg_dump -Fc -Z0 > /dev/null")
            floor = measure_pg_dump(pg_dump, env, "b. pg_dump -Fc -Z0 > /dev/null (floor)", "-Fc", "-Z0")
            print(f"   {floor.wall:.1f} s")
            print("== a. pg_dump -Fc > /dev/null")
            fc = measure_pg_dump(pg_dump, env, "a. pg_dump -Fc > /dev/null", "-Fc")
            print(f"   {fc.wall:.1f} s")
            print("== c. shell script: pg_dump -Fc -f file; tar -czf; upload")
            shell = measure_shell_way(pg_dump, env, workdir, s3.url)
            print(f"   {shell.wall:.1f} s")
            print("== d. nightly_dump flow (separate Python process)")
            proc, child = measure_flow(database, storage, api_url, workdir, level)
            print(f"   flow run {child['flow_seconds']:.1f} s, process {proc.wall:.1f} s")
        finally:
            WATCH = None
        report = child["report"]
        stored = int(s3.client().head_object(Bucket=BUCKET, Key=report["key"])["ContentLength"])
        assert stored == report["bytes"], (stored, report["bytes"])

    fc_bytes = shell.steps["pg_dump -Fc -f file"]["bytes"]
    floor.bytes = report["raw_bytes"]  # the same output the flow read from pg_dump -Z0
    floor.rss_note = "pg_dump (bytes: the flow's pg_dump -Z0 output)"
    fc.bytes = fc_bytes
    fc.rss_note = "pg_dump (bytes: the -f file of c)"
    # The flow run's share of the process's CPU is not separable; the process numbers are the closest.
    flow = Row(
        "d. dbops nightly_dump (flow run)",
        child["flow_seconds"],
        proc.cpu,
        proc.server_cpu,
        proc.s3_api_cpu,
        proc.other_cpu,
        stored,
        child["self_maxrss_kb"] / 1024,
        "flow process (VmHWM); children: "
        + ", ".join(f"{k} {v / 1024:.0f}" for k, v in sorted(child["children_peak_kb"].items())),
    )
    rows = [fc, floor, shell]
    for name, step in shell.steps.items():
        rows.append(
            Row(
                f"   c: {name}",
                step["wall"],
                step["cpu"],
                step["server_cpu"],
                step["s3_api_cpu"],
                step["other_cpu"],
                step["bytes"],
                step["maxrss_kb"] / 1024,
                step["what"],
            )
        )
    rows.append(flow)
    rows.append(Row.of("   d: whole process (interpreter, imports, flow)", proc, rss_note="incl. children"))
    for name, seconds in sorted(child["tasks"].items(), key=lambda kv: -kv[1]):
        rows.append(Row(f"   d: task {name}", seconds))
    dump = child.get("dump") or {}
    if dump:
        rows.append(Row("   d:   pg_dump output ended", dump["pg_dump_output_ended_s"]))
        rows.append(Row("   d:   S3 CompleteMultipartUpload (moto)", dump["complete_multipart_s"]))
    print()
    print(
        f"PostgreSQL {server_version}, database {db['database_bytes'] / MiB:.0f} MiB, "
        f"pg_dump -Z0 output {report['raw_bytes'] / MiB:.0f} MiB, {os.cpu_count()} cores, one run each; "
        "CPU columns: the measured command (own), PostgreSQL backends, moto + Prefect API, other processes"
    )
    print_table(rows, floor.wall, fc.wall, shell.wall)

    speedup = shell.wall / flow.wall
    ratio = flow.wall / floor.wall
    targets = [
        {
            "target": f"flow >= {MIN_SPEEDUP_VS_SHELL}x faster than the shell-script way",
            "value": f"{speedup:.2f}x ({shell.wall:.1f} s vs {flow.wall:.1f} s)",
            "pass": speedup >= MIN_SPEEDUP_VS_SHELL,
        },
        {
            "target": f"flow within {MAX_RATIO_VS_FLOOR}x of the extraction floor (pg_dump -Fc -Z0)",
            "value": f"{ratio:.2f}x ({flow.wall:.1f} s vs {floor.wall:.1f} s)",
            "pass": ratio <= MAX_RATIO_VS_FLOOR,
        },
        {
            "target": "flow output <= pg_dump -Fc output",
            "value": f"{stored:,} vs {fc_bytes:,} bytes ({stored / fc_bytes:.1%})",
            "pass": stored <= fc_bytes,
        },
        {
            "target": f"flow process peak RSS < {MAX_FLOW_RSS_MB} MB",
            "value": f"{flow.rss_mb:.0f} MB",
            "pass": (flow.rss_mb or 0) < MAX_FLOW_RSS_MB,
        },
    ]
    print()
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']}")
    print(
        f"      (whole flow process instead of the flow run: {shell.wall / proc.wall:.2f}x vs the shell way, "
        f"{proc.wall / floor.wall:.2f}x the floor)"
    )
    busy = [r for r in rows if r.other_cpu is not None and r.other_cpu > 0.1 * r.wall]
    if busy:
        print(
            "note: other processes used CPU during "
            + ", ".join(r.label.strip()[:2] for r in busy)
            + "; those rows are slower than on an idle machine"
        )
    return {
        "machine": machine(),
        "postgres": server_version,
        "pg_dump": str(pg_dump),
        "flow_compression_level": level if level is not None else "flow default",
        "database": db,
        "warmup": asdict(warm),
        "rows": [asdict(r) for r in rows],
        "flow": {"process": asdict(proc), **child},
        "targets": targets,
    }


if __name__ == "__main__":
    sys.exit(main())
