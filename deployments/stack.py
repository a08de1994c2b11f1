"""The local stack behind `make run`: dbops on one machine, the embedded default.

    1. a local Prefect server (SQLite under .state/prefect), unless PREFECT_API_URL points elsewhere
    2. a sandbox PostgreSQL with WAL archiving on (.state/pg, archive in .state/wal_archive) holding the
       sample application's schema and data as production (`imagemanager`) and staging
       (`imagemanager_staging`), unless DBOPS_DATABASE_URL names a real database
    3. local backup storage (.state/backups), or S3 when DBOPS_STORAGE_URL=s3://bucket/folder is set
    4. `dbops setup` (blocks, work pool, concurrency limits), then `prefect deploy --all` from prefect.yaml
    5. a process worker on the `dbops` pool
    6. one nightly dump and one WAL archive check, triggered at once and followed to the end
Then it prints the UI address, what ran and where the backup landed, and keeps serving until Ctrl-C
(`--once` stops right away, for CI). Everything lives in one state folder, reused by the next run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from deployments.deploy import prefect_bin
from flows.core.errors import DbopsError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE = ROOT / ".state"
PROD_BLOCK = "imagemanager-prod"
STAGING_BLOCK = "imagemanager-staging"
SCRATCH_BLOCK = "imagemanager-scratch"
STORAGE_BLOCK = "imagemanager-backups"


def log(msg: str) -> None:
    print(f"== {msg}", flush=True)


class Stack:
    def __init__(self, state: Path, port: int | None = None) -> None:
        self.state = state.resolve()
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.cluster: Any = None
        self.port = port
        self.storage_slug = ""
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.state / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
        }

    # -- Prefect ------------------------------------------------------------------------------------------

    def start_prefect(self) -> str:
        if os.environ.get("PREFECT_API_URL"):
            log(f"using the Prefect API at {os.environ['PREFECT_API_URL']}")
            return os.environ["PREFECT_API_URL"]
        from deployments.sandbox import free_port

        port_file = self.state / "prefect" / "port"
        port_file.parent.mkdir(parents=True, exist_ok=True)
        port = self.port or (int(port_file.read_text()) if port_file.exists() else 4200)
        if not _port_free(port):
            port = free_port()
        port_file.write_text(str(port))
        url = f"http://127.0.0.1:{port}/api"
        log(f"starting a local Prefect server on {url} (SQLite in {self.state / 'prefect'})")
        argv = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        self._spawn("prefect server", argv)
        _wait_http(f"{url}/health", timeout=180, what="the Prefect server", procs=self.procs)
        self.env["PREFECT_API_URL"] = url
        os.environ["PREFECT_API_URL"] = url
        os.environ["PREFECT_HOME"] = self.env["PREFECT_HOME"]
        return url

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name.replace(' ', '-')}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv] if argv[0] != "prefect" else [prefect_bin(), *argv[1:]],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    # -- PostgreSQL ---------------------------------------------------------------------------------------

    def start_postgres(self) -> dict[str, str]:
        """The sandbox cluster with archiving on; returns the setup config's database URLs."""
        from deployments.demo import DEMO_IMAGES, alembic_upgrade
        from deployments.sandbox import persistent_cluster
        from examples.imagemanager.generate import generate

        if os.environ.get("DBOPS_DATABASE_URL"):
            log("using the databases in DBOPS_DATABASE_URL and DBOPS_STAGING_URL")
            staging = os.environ["DBOPS_STAGING_URL"]
            return {
                "prod": os.environ["DBOPS_DATABASE_URL"],
                "staging": staging,
                # restore drills create and drop their scratch databases on the staging server
                "scratch": urlunsplit(urlsplit(staging)._replace(path="/postgres")),
                "archive": os.environ["DBOPS_WAL_ARCHIVE_DIR"],
            }
        archive = self.state / "wal_archive"
        archive.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            import shutil

            shutil.chown(archive, "postgres")
        settings = {
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": f"'test ! -f {archive}/%f && cp %p {archive}/%f'",
            "archive_timeout": "60",
        }
        log(f"sandbox PostgreSQL in {self.state / 'pg'} (WAL archive in {archive})")
        cluster = persistent_cluster(self.state / "pg", settings=settings)
        if cluster.sql("SHOW archive_mode")[0][0] != "on":
            command = settings["archive_command"][1:-1]
            cluster.set(wal_level="replica", archive_mode="on", archive_command=command)
            cluster.restart()
        self.cluster = cluster
        for db in ("imagemanager", "imagemanager_staging"):
            if not cluster.sql("SELECT 1 FROM pg_database WHERE datname = %s", params=(db,)):
                cluster.create_database(db)
            alembic_upgrade(cluster.host, cluster.port, cluster.superuser, cluster.password, db)
            if cluster.sql("SELECT count(*) FROM data_instances", dbname=db)[0][0] == 0:
                log(f"generating sample data in {db} ({DEMO_IMAGES} images)")
                generate(cluster.conninfo(db), images=DEMO_IMAGES, seed=0)
        base = f"postgresql://{cluster.superuser}@{cluster.host}:{cluster.port}"
        os.environ["DBOPS_SANDBOX_PASSWORD"] = cluster.password
        return {
            "prod": f"{base}/imagemanager",
            "staging": f"{base}/imagemanager_staging",
            "scratch": f"{base}/postgres",
            "archive": str(archive),
        }

    # -- dbops setup and deployments ----------------------------------------------------------------------

    def setup(self, urls: dict[str, str]) -> None:
        from deployments.setup import DatabaseConfig, SetupConfig, StorageConfig, run_setup

        storage_url = os.environ.get("DBOPS_STORAGE_URL", "")
        if storage_url.startswith("s3://"):
            bucket, _, folder = storage_url[5:].partition("/")
            storage = StorageConfig(
                type="s3",
                bucket=bucket,
                folder=folder,
                endpoint_url=os.environ.get("DBOPS_S3_ENDPOINT_URL"),
                region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                access_key_id_env="AWS_ACCESS_KEY_ID",
                secret_access_key_env="AWS_SECRET_ACCESS_KEY",
            )
            storage_slug = f"s3-bucket/{STORAGE_BLOCK}"
        else:
            storage = StorageConfig(type="local", path=str(self.state / "backups"))
            storage_slug = f"local-file-system/{STORAGE_BLOCK}"
        password_env = None if "DBOPS_DATABASE_URL" in os.environ else "DBOPS_SANDBOX_PASSWORD"
        databases = {PROD_BLOCK: DatabaseConfig(url=urls["prod"], password_env=password_env, protected=True)}
        if urls.get("staging"):
            databases[STAGING_BLOCK] = DatabaseConfig(url=urls["staging"], password_env=password_env)
        if urls.get("scratch"):
            databases[SCRATCH_BLOCK] = DatabaseConfig(url=urls["scratch"], password_env=password_env)
        variables: dict[str, object] = {"dbops_storage": storage_slug}
        if urls.get("archive"):
            variables["dbops_wal_archive"] = {"directory": urls["archive"]}
        config = SetupConfig(
            work_pool="dbops",
            databases=databases,
            storage={STORAGE_BLOCK: storage},
            variables=variables,
        )
        log("dbops setup")
        report = run_setup(config)
        print(report.render(), flush=True)
        self.storage_slug = storage_slug

    def deploy(self) -> None:
        from deployments.deploy import deploy

        log("dbops deploy: check prefect.yaml, then prefect deploy --all")
        if deploy() != 0:
            raise RuntimeError("deploying prefect.yaml failed; see above")

    def start_worker(self) -> None:
        log("starting a process worker on the dbops pool")
        self._spawn("prefect worker", ["prefect", "worker", "start", "--pool", "dbops", "--type", "process"])

    def run_first_jobs(self) -> int:
        from deployments.trigger import trigger_and_wait

        worst = 0
        for deployment in ("nightly-dump/nightly-dump", "wal-archive-check/wal-archive-check"):
            log(f"running {deployment}")
            # On a fresh sandbox nothing may be archived yet: the active probe switches WAL and waits.
            parameters = {"active": True} if deployment.startswith("wal") else None
            code = trigger_and_wait(deployment, parameters, timeout=900, tags=("trigger:make-run",))
            worst = max(worst, code)
        return worst

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log(f"stopped {name}")
        if self.cluster is not None:
            self.cluster.stop()
            log("stopped the sandbox PostgreSQL")


def _interrupt(signum: int, frame: object) -> None:
    # Only the first signal counts; the ones after it must not interrupt the shutdown it starts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _wait_http(url: str, timeout: float, what: str, procs: list) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see .state/logs/")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s")


def latest_backup_line(storage_slug: str) -> str:
    from blocks.storage import load_store
    from flows.core.catalog import read_catalog

    store = load_store(storage_slug)
    newest = read_catalog(store, "prod", "imagemanager").newest()
    return f"{store.url}/{newest.manifest.dump_key}" if newest else "(none)"


def check_environment(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Real databases instead of the sandbox need all three: staging for migrate's rehearsal and the
    drills, and the WAL archive directory for the archive check. Say so before anything starts."""
    if environ.get("DBOPS_DATABASE_URL"):
        missing = [name for name in ("DBOPS_STAGING_URL", "DBOPS_WAL_ARCHIVE_DIR") if not environ.get(name)]
        if missing:
            raise SystemExit(
                f"make run: DBOPS_DATABASE_URL is set, so also set {' and '.join(missing)} (the staging "
                "database migrate rehearses on, whose server also hosts the restore drills; the directory "
                "archive_command copies WAL to), or unset DBOPS_DATABASE_URL to use the sandbox"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop after the first jobs (CI)")
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("DBOPS_STATE_DIR", DEFAULT_STATE)))
    args = parser.parse_args(argv)
    check_environment()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A worker that polls every few seconds: the first jobs start at once instead of up to 15 s later.
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "3")
    # SIGTERM (systemd, docker stop, a CI timeout) shuts down as cleanly as Ctrl-C. SIGINT is set too: a
    # shell starts background jobs (`make run &`) with SIGINT ignored, and Ctrl-C must still stop it all.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    stack = Stack(args.state)
    code = 1
    try:
        url = stack.start_prefect()
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):
            urls = stack.start_postgres()
            stack.setup(urls)
            stack.deploy()
            stack.start_worker()
            code = stack.run_first_jobs()
            latest = latest_backup_line(stack.storage_slug)
        ui = url.removesuffix("/api")
        print(
            f"""
== dbops is up
   Prefect UI     {ui}
   ran            nightly-dump and wal-archive-check ({'all completed' if code == 0 else 'see above'})
   latest backup  {latest}
   state folder   {stack.state}   (a second `make run` reuses it; `make clean` removes it)
   schedules      nightly-dump 02:00, wal-archive-check every 15 min, weekly-reindex Sun 03:00,
                  restore-drill Sun 05:00 (UTC); migrate runs only when triggered
""",
            flush=True,
        )
        if not args.once:
            print("Serving; press Ctrl-C to stop.", flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        log("stopping (Ctrl-C or SIGTERM)")
    except (RuntimeError, DbopsError) as exc:
        print(f"make run: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # Ctrl-C in a terminal reaches make, uv and us, and uv forwards its own copy: a second SIGINT (or an
        # impatient one) must not cut the shutdown short and leave the server or the cluster running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
