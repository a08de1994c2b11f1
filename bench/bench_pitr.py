"""Point-in-time recovery RTO, split into download / replay / start (dbops only, for now).

    uv run python -m bench.bench_pitr [--scale 60] [--wal-seconds 60]

A throwaway archiving cluster (`cp %p DIR/%f`), `pgbench -i -s SCALE` (about 15 MiB per scale unit), a base
backup made like the tests do (pg_basebackup -Ft -X none, zstd, BaseBackupManifest; the base-backup flow
will replace that factory), then `pgbench -T WAL_SECONDS` to write WAL after it, then recovery to a time
just before the end with flows.core.pitr.recovery.recover_cluster. Prints the report's RTO split, segments
replayed and bytes downloaded.

Not yet: the side-by-side `pgbackrest restore --type=time` of issue 13 (pgBackRest is installed on the CI
image; its stanza, repo and archive-push setup are the missing part).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=60)
    parser.add_argument("--wal-seconds", type=int, default=60)
    args = parser.parse_args()

    from flows.core.localstore import LocalObjectStore
    from flows.core.pgtools import find_tool
    from flows.core.pitr.extract import server_user
    from flows.core.pitr.recovery import recover_cluster
    from flows.core.pitr.selection import choose_base_backup
    from flows.core.pitr.targets import parse_target
    from flows.core.pitr.workdir import free_local_port
    from flows.core.postgres import libpq_environment
    from flows.core.wal_archive import WalArchive
    from tests.harness.basebackup import archiving_cluster, catalog_of, switch_and_archive, take_base_backup
    from tests.harness.factories import conn_params

    with archiving_cluster() as (cluster, archive_dir):
        version = int(cluster.sql("SHOW server_version_num")[0][0])
        pgbench = str(find_tool("pgbench", version).path)
        with libpq_environment(conn_params(cluster, "postgres")) as env:
            subprocess.run(
                [pgbench, "-i", "-q", "-s", str(args.scale)], env=env, check=True, capture_output=True
            )
            root = cluster.base_dir.parent
            (root / "store").mkdir()
            store = LocalObjectStore(root / "store")
            t = time.monotonic()
            manifest = take_base_backup(cluster, store, "bench", "postgres")
            print(
                f"base backup: {manifest.raw_bytes / 2**20:.0f} MiB tar, "
                f"{manifest.bytes / 2**20:.0f} MiB stored, "
                f"{time.monotonic() - t:.1f} s"
            )
            subprocess.run(
                [pgbench, "-T", str(args.wal_seconds), "-c", "2"], env=env, check=True, capture_output=True
            )
        target_time = datetime.now(UTC)
        cluster.sql(
            "CREATE TABLE bench_after_target (t timestamptz DEFAULT now())"
        )  # a commit past the target
        switch_and_archive(cluster)
        wal = sum(p.stat().st_size for p in archive_dir.iterdir())
        print(f"archive: {wal / 2**20:.0f} MiB of WAL")
        archive = WalArchive(LocalObjectStore(archive_dir))
        target = parse_target(time=target_time)
        choice = choose_base_backup(catalog_of(manifest), target, archive)
        scratch = Path(tempfile.mkdtemp(prefix="dbops-bench-pitr-"))
        os.chmod(scratch, 0o755)
        try:
            report, _server = recover_cluster(
                database="postgres",
                store=store,
                archive=archive,
                choice=choice,
                target=target,
                data_directory=scratch / "data",
                port=free_local_port(),
                login_user=cluster.superuser,
                login_database="postgres",
                user=server_user(),
                ahead=16,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"RTO {report.rto_seconds:.1f} s = download {report.download_seconds:.1f} s + replay "
        f"{report.replay_seconds:.1f} s + start {report.start_seconds:.1f} s; "
        f"{report.segments_replayed} segments "
        f"replayed, {report.bytes_downloaded / 2**20:.0f} MiB downloaded; reached {report.reached_lsn}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
