"""`make run`: the nightly dump on the embedded default, from nothing to a restorable backup.

Everything lives in one state folder (`.state/` in the repository, or $DBOPS_STATE_DIR):
    .state/pg/        a sandbox PostgreSQL cluster holding the sample imagemanager database
    .state/backups/   local backup storage (a Prefect local-file-system block points here)
    .state/prefect/   PREFECT_HOME: the local Prefect API's SQLite database, blocks, logs
A second `make run` reuses all three: same cluster, same blocks, one more backup.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from deployments.sample_app import alembic_upgrade  # also imported from here by stack.py

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("DBOPS_STATE_DIR", ROOT / ".state")).resolve()
os.environ.setdefault("PREFECT_HOME", str(STATE / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

DB_BLOCK = "imagemanager-sandbox"
STORAGE_BLOCK = "sandbox-backups"
DEMO_IMAGES = int(os.environ.get("DBOPS_DEMO_IMAGES", "50000"))


def prepare_sandbox():  # -> PgCluster
    from deployments.sandbox import persistent_cluster
    from examples.imagemanager.generate import generate

    print(f"== sandbox PostgreSQL in {STATE / 'pg'}")
    cluster = persistent_cluster(STATE / "pg")
    if not cluster.sql("SELECT 1 FROM pg_database WHERE datname = 'imagemanager'"):
        cluster.create_database("imagemanager")
    alembic_upgrade(cluster.host, cluster.port, cluster.superuser, cluster.password, "imagemanager")
    rows = cluster.sql("SELECT count(*) FROM data_instances", dbname="imagemanager")[0][0]
    if rows == 0:
        print(f"== generating sample data ({DEMO_IMAGES} images)")
        counts = generate(cluster.conninfo("imagemanager"), images=DEMO_IMAGES, seed=0)
        print("   " + ", ".join(f"{table}: {n}" for table, n in counts.items()))
    return cluster


def save_blocks(cluster) -> None:
    from prefect.filesystems import LocalFileSystem

    from blocks import PostgresDatabase

    PostgresDatabase(
        host=cluster.host,
        port=cluster.port,
        database="imagemanager",
        user=cluster.superuser,
        password=cluster.password,
        application_name="dbops-demo",
    ).save(DB_BLOCK, overwrite=True)
    (STATE / "backups").mkdir(parents=True, exist_ok=True)
    LocalFileSystem(basepath=str(STATE / "backups")).save(STORAGE_BLOCK, overwrite=True)


def main() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    cluster = prepare_sandbox()
    try:
        from flows.core.retention import RetentionPolicy
        from flows.nightly_dump import nightly_dump

        save_blocks(cluster)
        print("== nightly_dump into local storage")
        report = nightly_dump(
            database=DB_BLOCK,
            storage=f"local-file-system/{STORAGE_BLOCK}",
            prefix="sandbox",
            retention=RetentionPolicy(keep_last=3, keep_daily=7),
        )
        dump = STATE / "backups" / report.key
        manifest = STATE / "backups" / report.manifest_key
        print(
            f"""
== backup done
   dump      {dump}
   manifest  {manifest}
   size      {report.bytes} bytes stored, {report.raw_bytes} bytes of pg_dump output
   sha256    {report.sha256}
   verified  {report.verification}
   retention {report.retention}

To restore it by hand into a new database (plain PostgreSQL tools, no dbops needed):
   sha256sum {dump}          # must print {report.sha256}
   createdb -h HOST -p PORT -U USER imagemanager_restored
   zstd -dc {dump} | pg_restore -h HOST -p PORT -U USER --no-owner -d imagemanager_restored
The sandbox cluster is stopped now; `make run` starts it again (port {cluster.port}, password in
{STATE / "pg" / "sandbox.env"}).
"""
        )
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
