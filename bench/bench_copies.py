"""What one copy location costs the nightly dump: the flow's wall time with 0 and with 1 copy on the same
S3 endpoint and account (the copy is made server-side, CopyObject / UploadPartCopy), as a ratio.

    uv run python -m bench.bench_copies [--size 500MB] [--runs 3] [--keep] [--workdir DIR]

Builds the imagemanager database as bench_dump does (a kept --workdir of bench_dump is reused), starts the
moto S3 server with two buckets and a Prefect API, then runs nightly_dump(verify="list") in its own Python
process (bench_dump's flow child) into `primary` and into `primary,copy`, `--runs` times each in ABBA
order with the buckets emptied before each run, and compares the best run of each: the issue's target
is at most 1.30x. The peak RSS of the flow process (VmHWM) is printed for both, so a copy that buffered a
whole object in memory would show. Everything runs on this machine: moto, PostgreSQL and the Prefect API
share its cores with the flow, and the CPU other processes used during each run is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from bench import bench_dump
from bench.bench_dump import OUT_DIR, ROOT, MiB, Watch, build_database, measure_flow, save_blocks

COPY_BUCKET = f"{bench_dump.BUCKET}-copy"
COPY_BLOCK = "bench-s3-copy"
#: the issue's target: one copy on the same endpoint adds at most 30 % to the nightly dump's wall time
MAX_RATIO_ONE_COPY = 1.30


def save_copy_block(s3_url: str) -> str:
    """A second bucket on the same endpoint with the same credentials: the copy goes server-side."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY

    creds = AwsCredentials(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_url),
    )
    S3Bucket(bucket_name=COPY_BUCKET, credentials=creds, bucket_folder="").save(COPY_BLOCK, overwrite=True)
    return f"s3-bucket/{COPY_BLOCK}"


def empty_buckets(client: Any) -> None:
    for bucket in (bench_dump.BUCKET, COPY_BUCKET):
        keys = [{"Key": o["Key"]} for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def run_all(cluster: Any, workdir: Path, runs: int) -> dict[str, Any]:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from tests.harness.s3 import s3_endpoint

    print("== moto S3 server (two buckets) and Prefect API")
    with s3_endpoint() as s3, prefect_test_harness(server_startup_timeout=120):
        s3.create_bucket(bench_dump.BUCKET)
        s3.create_bucket(COPY_BUCKET)
        database, primary = save_blocks(cluster, s3.url)
        copy = save_copy_block(s3.url)
        api_url = str(PREFECT_API_URL.value())
        api_server = SubprocessASGIServer._instances.get(None)
        api_process = getattr(api_server, "server_process", None)
        postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
        bench_dump.WATCH = Watch(postmaster, s3.process.pid, api_process.pid if api_process else None)
        measured: dict[str, list[dict[str, Any]]] = {"0 copies": [], "1 copy": []}
        try:
            print("== warm-up: one nightly_dump into the primary (not measured)")
            measure_flow(database, primary, api_url, workdir, None)
            variants = [("0 copies", primary), ("1 copy", f"{primary},{copy}")]
            for i in range(runs):
                # ABBA order, so neither variant always runs second; empty buckets, so moto (which keeps
                # every object in memory) is no bigger for one variant than for the other
                for label, storage in variants if i % 2 == 0 else variants[::-1]:
                    empty_buckets(s3.client())
                    proc, child = measure_flow(database, storage, api_url, workdir, None)
                    report = child["report"]
                    statuses = [loc["status"] for loc in report.get("locations", [])]
                    if label == "1 copy" and statuses != ["written", "copied"]:
                        raise RuntimeError(f"the copy did not land: {report.get('locations')}")
                    measured[label].append(
                        {
                            "flow_seconds": child["flow_seconds"],
                            "process_seconds": proc.wall,
                            "peak_rss_mb": child["self_maxrss_kb"] / 1024,
                            "other_cpu_seconds": proc.other_cpu,
                            "tasks": child["tasks"],
                            "bytes": report["bytes"],
                            "copy": report["locations"][1]["detail"] if label == "1 copy" else "",
                        }
                    )
                    print(
                        f"   run {i + 1} {label:8}: flow {child['flow_seconds']:.1f} s, "
                        f"peak RSS {child['self_maxrss_kb'] / 1024:.0f} MB, other processes' CPU "
                        f"{proc.other_cpu:.1f} s"
                        + (f" ({measured[label][-1]['copy']})" if label == "1 copy" else "")
                    )
        finally:
            bench_dump.WATCH = None

    best = {label: min(rows, key=lambda r: r["flow_seconds"]) for label, rows in measured.items()}
    zero, one = best["0 copies"], best["1 copy"]
    ratio = one["flow_seconds"] / zero["flow_seconds"]
    copy_task = one["tasks"].get("copy_backup_to", 0.0)
    print()
    print(f"nightly_dump, {zero['bytes'] / MiB:.0f} MiB stored, best of {runs} run(s) each:")
    print(f"{'':12} {'wall s':>8} {'peak RSS MB':>12} {'copy task s':>12}")
    print(f"{'0 copies':12} {zero['flow_seconds']:>8.1f} {zero['peak_rss_mb']:>12.0f} {'':>12}")
    print(f"{'1 copy':12} {one['flow_seconds']:>8.1f} {one['peak_rss_mb']:>12.0f} {copy_task:>12.1f}")
    target = {
        "target": f"1 copy on the same endpoint (server-side) <= {MAX_RATIO_ONE_COPY}x the dump alone",
        "value": f"{ratio:.2f}x ({one['flow_seconds']:.1f} s vs {zero['flow_seconds']:.1f} s)",
        "pass": ratio <= MAX_RATIO_ONE_COPY,
    }
    print()
    print(f"{'PASS' if target['pass'] else 'FAIL'}  {target['target']}: {target['value']}")
    return {"runs": measured, "best": best, "ratio": ratio, "targets": [target]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_copies", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="500MB", help="approximate size of the data (default 500MB)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each variant (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (cluster)")
    parser.add_argument("--workdir", type=Path, help="work directory; one kept by --keep is reused as is")
    args = parser.parse_args(argv)

    from deployments.sandbox import persistent_cluster
    from examples.imagemanager.generate import parse_size

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    keep = bool(args.workdir) or args.keep
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="dbops-bench-copies-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)  # the server may run as the postgres user and must reach its data directory
    started = datetime.now(UTC)
    t0 = time.monotonic()
    cluster = None
    try:
        print(f"== cluster in {workdir}")
        cluster = persistent_cluster(workdir / "pg")
        print(f"== imagemanager database, ~{args.size}")
        db = build_database(cluster, workdir, parse_size(args.size))
        print(f"   {db['database_bytes'] / MiB:.0f} MiB on disk" + (" (reused)" if db["reused"] else ""))
        results = run_all(cluster, workdir, max(1, args.runs))
    finally:
        if cluster is not None:
            cluster.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"\nkept {workdir} (reuse it with --workdir {workdir})")
    results |= {
        "database": db,
        "started_at": started.isoformat(timespec="seconds"),
        "bench_seconds": round(time.monotonic() - t0, 1),
    }
    out = OUT_DIR / "bench_copies.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out.relative_to(ROOT)} (whole bench: {results['bench_seconds']:.0f} s)")
    return 0 if all(t["pass"] for t in results["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
