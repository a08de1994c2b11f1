"""How nightly_dump compares with pg_dump alone and with the usual backup shell script.

    uv run python -m bench.bench_dump [--size 1GB] [--keep] [--workdir DIR]

Builds an imagemanager database (Alembic head, then examples/imagemanager/generate.py) in a throwaway
PostgreSQL cluster, starts the moto S3 server and a Prefect API (prefect_test_harness), then measures one
run each of:

  a. pg_dump -Fc > /dev/null        pg_dump with its own zlib compression, nothing stored
  b. pg_dump -Fc -Z0 > /dev/null    the extraction floor: no compression, nothing stored
  c. the shell-script way           pg_dump -Fc -f FILE; tar -czf FILE.tar.gz FILE; upload the tarball
  d. the dbops flow                 nightly_dump(verify="list") into the same S3 endpoint, in its own
                                    Python process so that process's peak RSS can be read

and prints a table, the targets with PASS/FAIL, and writes bench/out/bench_dump.json.
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
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
SAMPLE = ROOT / "examples" / "imagemanager"
DBNAME = "imagemanager"
BUCKET = "bench-backups"
DB_BLOCK = "bench-imagemanager"
S3_BLOCK = "bench-s3"
MiB = 1024 * 1024

#: the targets: flow vs the shell script, vs the extraction floor, output size, memory
MIN_SPEEDUP_VS_SHELL = 1.8
MAX_RATIO_VS_FLOOR = 1.2
MAX_FLOW_RSS_MB = 300


@dataclass
class Measured:
    """One process run to completion: wall time and what os.wait4 says about it."""

    wall: float
    maxrss_kb: int  # the process and the descendants it waited for (e.g. tar's gzip)
    cpu: float  # user + system seconds, same scope

    @property
    def rss_mb(self) -> float:
        return self.maxrss_kb / 1024


@dataclass
class Row:
    label: str
    wall: float
    cpu: float | None = None
    bytes: int | None = None
    rss_mb: float | None = None
    rss_note: str = ""
    steps: dict[str, Any] = field(default_factory=dict)


def run_measured(argv: list[str], *, env: dict[str, str], stdout: Path | None = None) -> Measured:
    """Run argv to completion, reaped with os.wait4: its wall time, peak RSS and CPU time."""
    with tempfile.TemporaryFile() as err, open(stdout or os.devnull, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-4000:].decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited with {proc.returncode}:\n{tail}")
    return Measured(wall, usage.ru_maxrss, usage.ru_utime + usage.ru_stime)


# -- setup: cluster, database, S3, Prefect -----------------------------------------------------------------


def open_cluster(workdir: Path):  # -> PgCluster
    """A cluster in WORKDIR/pg: created on first use; a kept WORKDIR is reused (same password, new port)."""
    from deployments.sandbox import PgCluster, free_port

    meta = workdir / "cluster.json"
    if meta.exists():
        saved = json.loads(meta.read_text())
        cluster = PgCluster(base_dir=workdir / "pg", port=free_port(), password=saved["password"])
        with (cluster.data_dir / "postgresql.auto.conf").open("a") as f:
            f.write(f"port = {cluster.port}\n")  # the last setting wins
    else:
        cluster = PgCluster(base_dir=workdir / "pg", port=free_port())
        cluster.init()
        fd = os.open(meta, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"password": cluster.password}, f)
    cluster.start()
    return cluster


def alembic_upgrade(cluster: Any) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": f"postgresql+psycopg://{cluster.superuser}@{cluster.host}:{cluster.port}/{DBNAME}",
        "PGPASSWORD": cluster.password,
    }
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=SAMPLE, env=env, check=True,
        capture_output=True,
    )


def build_database(cluster: Any, workdir: Path, target_bytes: int) -> dict[str, Any]:
    """imagemanager at Alembic head with ~target_bytes of data, vacuumed; skipped when a kept one matches."""
    from examples.imagemanager.generate import generate

    marker = workdir / "database.json"
    if marker.exists() and json.loads(marker.read_text()).get("target_bytes") == target_bytes:
        info = json.loads(marker.read_text())
        info["reused"] = True
        return info
    if cluster.sql("SELECT 1 FROM pg_database WHERE datname = %s", params=[DBNAME]):
        cluster.sql(f"DROP DATABASE {DBNAME}")
    t0 = time.monotonic()
    cluster.create_database(DBNAME)
    alembic_upgrade(cluster)
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


def save_blocks(cluster: Any, s3_url: str) -> tuple[str, str]:
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from blocks import PostgresDatabase
    from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY

    PostgresDatabase(
        host=cluster.host, port=cluster.port, database=DBNAME, user=cluster.superuser,
        password=cluster.password, application_name="dbops-bench",
    ).save(DB_BLOCK, overwrite=True)
    creds = AwsCredentials(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_url),
    )
    S3Bucket(bucket_name=BUCKET, credentials=creds, bucket_folder="").save(S3_BLOCK, overwrite=True)
    return DB_BLOCK, f"s3-bucket/{S3_BLOCK}"


# -- the measurements --------------------------------------------------------------------------------------


def measure_pg_dump(pg_dump: Path, env: dict[str, str], label: str, *args: str) -> Row:
    m = run_measured([str(pg_dump), "--no-password", *args, DBNAME], env=env)
    return Row(label, m.wall, m.cpu, None, m.rss_mb, "pg_dump")


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
    # what `aws s3 cp` does (it is not installed here): s3transfer's multipart upload_file
    code = (
        "import sys, boto3; boto3.client('s3', endpoint_url=sys.argv[1])"
        ".upload_file(sys.argv[2], sys.argv[3], sys.argv[4])"
    )
    uploaded = run_measured(
        [sys.executable, "-c", code, s3_url, str(tarball), BUCKET, f"shell/{tarball.name}"], env=upload_env
    )
    steps = {
        "pg_dump -Fc -f file": asdict(dumped) | {"bytes": dump.stat().st_size},
        "tar -czf": asdict(tarred) | {"bytes": tarball.stat().st_size},
        "upload (boto3 upload_file)": asdict(uploaded),
    }
    peak = max((dumped, tarred, uploaded), key=lambda m: m.maxrss_kb)
    which = {id(dumped): "pg_dump", id(tarred): "tar+gzip", id(uploaded): "python uploader"}[id(peak)]
    return Row(
        "c. shell script: pg_dump -Fc -f, tar -czf, upload",
        dumped.wall + tarred.wall + uploaded.wall,
        dumped.cpu + tarred.cpu + uploaded.cpu,
        tarball.stat().st_size,
        peak.rss_mb,
        which,
        steps,
    )


def measure_flow(database: str, storage: str, api_url: str, workdir: Path) -> tuple[Row, dict[str, Any]]:
    """nightly_dump in a child Python process: os.wait4 on it, and the child's own getrusage numbers."""
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
    try:
        m = run_measured(argv, env=env, stdout=log)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n(flow output in {log})") from None
    child = json.loads(result_path.read_text())
    return Measured(m.wall, m.maxrss_kb, m.cpu), child


def flow_child(database: str, storage: str, result_path: str) -> int:
    """Runs in the child process: import, run the flow, report timings and our own peak RSS."""
    t0 = time.monotonic()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.nightly_dump import nightly_dump

    t1 = time.monotonic()
    state = nightly_dump(database=database, storage=storage, verify="list", return_state=True)
    t2 = time.monotonic()
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = state.result()
    flow_run_id = state.state_details.flow_run_id
    tasks: dict[str, float] = {}
    with get_client(sync_client=True) as client:
        for run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))):
            if run.start_time and run.end_time:
                name = run.name.rsplit("-", 1)[0]
                tasks[name] = tasks.get(name, 0.0) + (run.end_time - run.start_time).total_seconds()
    out = {
        "import_seconds": t1 - t0,
        "flow_seconds": t2 - t1,
        "self_maxrss_kb": me.ru_maxrss,
        "self_cpu": me.ru_utime + me.ru_stime,
        "children_maxrss_kb": kids.ru_maxrss,
        "children_cpu": kids.ru_utime + kids.ru_stime,
        "report": report.model_dump(mode="json"),
        "tasks": tasks,
    }
    Path(result_path).write_text(json.dumps(out, indent=2))
    return 0


# -- reporting ---------------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row], floor: float, fc: float, shell: float) -> None:
    head = (
        f"{'':52} {'wall s':>7} {'x floor':>8} {'x -Fc':>6} {'shell/':>7} {'CPU s':>6} "
        f"{'output bytes':>14} {'peak RSS MB':>12}"
    )
    print(head)
    print(f"{'':52} {'':>7} {'':>8} {'':>6} {'this':>7}")
    print("-" * len(head))
    for r in rows:
        if r.label.startswith("   "):  # a step or detail line: time and bytes only
            print(
                f"{r.label:52} {r.wall:7.1f} {'':>8} {'':>6} {'':>7} {fmt(r.cpu, '6.1f'):>6} "
                f"{fmt(r.bytes, ',d'):>14} {fmt(r.rss_mb, '7.0f'):>7} {r.rss_note}"
            )
            continue
        print(
            f"{r.label:52} {r.wall:7.1f} {r.wall / floor:8.2f} {r.wall / fc:6.2f} {shell / r.wall:7.2f} "
            f"{fmt(r.cpu, '6.1f'):>6} {fmt(r.bytes, ',d'):>14} {fmt(r.rss_mb, '7.0f'):>7} {r.rss_note}"
        )


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
    parser.add_argument("--workdir", type=Path, help="reuse a work directory kept by an earlier --keep run")
    parser.add_argument("--flow-child", nargs=3, metavar=("DB", "STORAGE", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flow_child:
        return flow_child(*args.flow_child)

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
        cluster = open_cluster(workdir)
        print(f"== imagemanager database, ~{args.size} (Alembic head + generate.py, then VACUUM FREEZE)")
        db = build_database(cluster, workdir, target)
        print(
            "   " + ("reused from an earlier run; " if db["reused"] else "")
            + f"{db['database_bytes'] / MiB:.0f} MiB on disk, rows: {db['rows']}"
        )
        results = run_all(cluster, workdir, db)
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


def run_all(cluster: Any, workdir: Path, db: dict[str, Any]) -> dict[str, Any]:
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.core.dump import find_tool
    from flows.core.postgres import ConnParams, libpq_environment
    from tests.harness.s3 import s3_endpoint

    version_num = int(cluster.sql("SHOW server_version_num")[0][0])
    pg_dump = find_tool("pg_dump", version_num).path
    params = ConnParams(
        host=cluster.host, port=cluster.port, database=DBNAME, user=cluster.superuser,
        password=cluster.password, application_name="bench",
    )
    print("== moto S3 server and Prefect API")
    with s3_endpoint() as s3, prefect_test_harness(server_startup_timeout=120), libpq_environment(params) as env:
        s3.create_bucket(BUCKET)
        database, storage = save_blocks(cluster, s3.url)
        api_url = str(PREFECT_API_URL.value())

        print("== warm-up: pg_dump -Fc -Z0 > /dev/null (not measured)")
        warm = run_measured([str(pg_dump), "--no-password", "-Fc", "-Z0", DBNAME], env=env)
        print(f"   {warm.wall:.1f} s")
        print("== b. pg_dump -Fc -Z0 > /dev/null")
        floor = measure_pg_dump(pg_dump, env, "b. pg_dump -Fc -Z0 > /dev/null (extraction floor)", "-Fc", "-Z0")
        print(f"   {floor.wall:.1f} s")
        print("== a. pg_dump -Fc > /dev/null")
        fc = measure_pg_dump(pg_dump, env, "a. pg_dump -Fc > /dev/null", "-Fc")
        print(f"   {fc.wall:.1f} s")
        print("== c. shell script: pg_dump -Fc -f file; tar -czf; upload")
        shell = measure_shell_way(pg_dump, env, workdir, s3.url)
        print(f"   {shell.wall:.1f} s")
        print("== d. nightly_dump flow (separate Python process)")
        proc, child = measure_flow(database, storage, api_url, workdir)
        print(f"   flow run {child['flow_seconds']:.1f} s, process {proc.wall:.1f} s")
        report = child["report"]
        head = s3.client().head_object(Bucket=BUCKET, Key=report["key"])
        stored = int(head["ContentLength"])
        assert stored == report["bytes"], (stored, report["bytes"])

    fc_bytes = shell.steps["pg_dump -Fc -f file"]["bytes"]
    floor.bytes = report["raw_bytes"]  # the same output the flow read from pg_dump -Z0
    floor.rss_note = "pg_dump (bytes: the flow's pg_dump -Z0 output)"
    fc.bytes = fc_bytes
    fc.rss_note = "pg_dump (bytes: the -f file of c)"
    flow = Row(
        "d. dbops nightly_dump (flow run)",
        child["flow_seconds"],
        child["self_cpu"] + child["children_cpu"],
        stored,
        child["self_maxrss_kb"] / 1024,
        f"flow process; pg_dump/pg_restore child: {child['children_maxrss_kb'] / 1024:.0f}",
    )
    rows = [fc, floor, shell]
    for name, step in shell.steps.items():
        rows.append(Row(f"   c: {name}", step["wall"], step["cpu"], step.get("bytes"), step["maxrss_kb"] / 1024))
    rows.append(flow)
    rows.append(
        Row("   d: whole process (interpreter, imports, flow)", proc.wall, proc.cpu, None, proc.rss_mb,
            "wait4: process + children")
    )
    for name, seconds in sorted(child["tasks"].items(), key=lambda kv: -kv[1]):
        rows.append(Row(f"   d: task {name}", seconds))
    print()
    print(
        f"PostgreSQL {cluster.sql('SHOW server_version')[0][0]}, database {db['database_bytes'] / MiB:.0f} MiB, "
        f"pg_dump -Z0 output {report['raw_bytes'] / MiB:.0f} MiB; {os.cpu_count()} cores; one run each"
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
        f"      (with the whole flow process instead of the flow run: {shell.wall / proc.wall:.2f}x vs the "
        f"shell way, {proc.wall / floor.wall:.2f}x the floor)"
    )
    return {
        "machine": machine(),
        "postgres": cluster.sql("SHOW server_version")[0][0],
        "pg_dump": str(pg_dump),
        "database": db,
        "warmup_seconds": round(warm.wall, 2),
        "rows": [asdict(r) for r in rows],
        "flow": {"process": asdict(proc), **child},
        "targets": targets,
    }


if __name__ == "__main__":
    sys.exit(main())
