"""The local stack behind `make run`: dbops on one machine, the embedded default.

    1. a local Prefect server (SQLite under .state/prefect; PostgreSQL with DBOPS_PREFECT_DB=postgres, a
       database `prefect` in the sandbox cluster, or DBOPS_PREFECT_DB=postgresql+asyncpg://...), unless
       PREFECT_API_URL points elsewhere
    2. a sandbox PostgreSQL with WAL archiving on (.state/pg, archive in .state/wal_archive) holding the
       sample application's schema and data as production (`imagemanager`) and staging
       (`imagemanager_staging`), unless DBOPS_DATABASE_URL names a real database
    3. local backup storage (.state/backups), or S3 when DBOPS_STORAGE_URL=s3://bucket/folder is set
    4. `dbops setup` (blocks, work pool, concurrency limits), then `prefect deploy --all` from prefect.yaml
    5. with `make run NOTIFY=1` (`--notify-local`): a local alert receiver that prints every alert here,
       and `dbops setup --notify` pointing the alerts (failed, nothing ran, resolved) at it
    6. a process worker on the `dbops` pool (`--workers N`: N of them, each from its own directory and
       PREFECT_HOME under <state>/workers/, as separate hosts would be)
    7. one base backup, one nightly dump and one WAL archive check, triggered at once and followed to the end
Then it prints the UI address, what ran and where the backup landed, the storage, and commands for a second
shell, and keeps serving until Ctrl-C, SIGTERM or SIGHUP (`--once` stops right away, for CI). Everything
lives in one state folder, reused by the next run; `<state>/run/` records the pids of what it started and
the server's URL (deployments/stackstate.py), so the next start adopts or stops what a killed run left
behind and `dbops` in a second shell finds the server. Every line also goes to `<state>/logs/stack.log`,
and the shutdown completes even when the terminal (or the `tee` it was piped into) is gone.
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

from deployments import stackstate
from deployments.crash_detection import CRASH_AUTOMATION, DEFAULT_HEARTBEAT_SECONDS, detection_seconds
from deployments.deploy import prefect_bin
from flows.core.errors import DbopsError, StackError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE = ROOT / ".state"
PROD_BLOCK = "imagemanager-prod"
STAGING_BLOCK = "imagemanager-staging"
SCRATCH_BLOCK = "imagemanager-scratch"
# The `restore` deployment's default target: a database that does not exist until the first restore
# creates it (mode=create), on the staging server, so the deployment completes with its defaults.
RESTORED_BLOCK = "imagemanager-restored"
RESTORED_DATABASE = "imagemanager_restored"
STORAGE_BLOCK = "imagemanager-backups"
LOCAL_ALERTS_BLOCK = "dbops-local-alerts"
PREFECT_DB_ENV = "DBOPS_PREFECT_DB"
PREFECT_DATABASE = "prefect"  # DBOPS_PREFECT_DB=postgres: the server's database in the sandbox cluster


STACK_LOG: list[Path] = []  # <state>/logs/stack.log once the state folder is known
_BROKEN: set[int] = set()  # file descriptors whose reader went away


def say(text: str, err: bool = False) -> None:
    """Print a line to the terminal and to <state>/logs/stack.log.

    Writing to the terminal may fail: `make run 2>&1 | tee run.log` loses its `tee` to the same Ctrl-C
    that starts the shutdown, and every later write to the pipe raises BrokenPipeError. The shutdown must
    go on regardless, so a failed write points that descriptor at /dev/null and the line still reaches
    stack.log."""
    for path in STACK_LOG:
        try:
            with path.open("a") as f:
                f.write(text + "\n")
        except OSError:
            pass
    stream = sys.stderr if err else sys.stdout
    fd = 2 if err else 1
    if fd in _BROKEN:
        return
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):
        _BROKEN.add(fd)
        _silence(fd)


def _silence(fd: int) -> None:
    """Point a dead stdout/stderr at /dev/null, so later writes (ours, a library's, the interpreter's
    flush at exit) cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    replacement = open(os.devnull, "w")  # noqa: SIM115 - replaces sys.stdout/stderr for the process's life
    if fd == 1:
        sys.stdout = replacement
    else:
        sys.stderr = replacement


def log(msg: str) -> None:
    say(f"== {msg}")


class Stack:
    def __init__(self, state: Path, port: int | None = None) -> None:
        self.state = state.resolve()
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.adopted: list[tuple[str, int]] = []  # leftovers of an earlier run, not our children
        self.notes: list[str] = []  # what happened to leftovers and the port, for the banner
        self.cluster: Any = None
        self.port = port
        self.storage_slug = ""
        self.prefix = "prod"
        self.receiver: Any = None  # the local alert receiver (`make run NOTIFY=1`)
        self.first_jobs = True  # `--no-first-jobs` clears it: the banner then says nothing ran
        # What every process of the stack gets. Never the Prefect database's URL (it may carry a password):
        # only the server's own environment has it (`prefect_database`), not the workers or their runs.
        self.env = {
            **{k: v for k, v in os.environ.items() if k != PREFECT_DB_ENV},
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

        adopted = [pid for name, pid in self.adopted if name == "prefect server"]
        url = stackstate.recorded_api_url(self.state) or ""
        if adopted:
            log(f"using the Prefect server left running by an earlier run on {url} (pid {adopted[0]})")
        else:
            port_file = self.state / "prefect" / "port"
            port_file.parent.mkdir(parents=True, exist_ok=True)
            wanted = self.port or (int(port_file.read_text()) if port_file.exists() else 4200)
            port = wanted
            if not port_free(port):
                port = free_port()
                self.notes.append(
                    f"port {wanted} is held by another program, so the Prefect server listens on {port}"
                )
                log(self.notes[-1])
            port_file.write_text(str(port))
            url = f"http://127.0.0.1:{port}/api"
            where, database_env = self.prefect_database()
            log(f"starting a local Prefect server on {url} ({where})")
            self.env.update(prefect_server_env(port))
            proc = self.spawn("prefect server", prefect_server_argv(port), extra_env=database_env)
            stackstate.write_pid(self.state, "prefect-server", proc.pid)
            stackstate.write_api_url(self.state, url)
            wait_http(f"{url}/health", timeout=180, what="the Prefect server", procs=self.procs)
        self.env["PREFECT_API_URL"] = url
        os.environ["PREFECT_API_URL"] = url
        os.environ["PREFECT_HOME"] = self.env["PREFECT_HOME"]
        return url

    def prefect_database(self) -> tuple[str, dict[str, str]]:
        """Where the local server keeps its state (for the log line) and the environment that says so.

        DBOPS_PREFECT_DB unset (or `sqlite`): SQLite under <state>/prefect, Prefect's embedded default.
        `postgres`: a database `prefect` in the sandbox cluster, created when missing, as Prefect recommends
        for production. A `postgresql+asyncpg://` URL: that database. The password reaches the server
        through its environment only (never argv): for the sandbox the URL names
        `${PREFECT_API_DATABASE_PASSWORD}`, which Prefect fills in from the variable of that name."""
        setting = os.environ.get(PREFECT_DB_ENV, "").strip()
        if setting in ("", "sqlite"):
            return f"SQLite in {self.state / 'prefect'}", {}
        if setting.startswith("postgresql+asyncpg://"):
            return f"PostgreSQL at {redact_url(setting)}", {"PREFECT_API_DATABASE_CONNECTION_URL": setting}
        if setting != "postgres":
            raise StackError(
                f"{PREFECT_DB_ENV}={setting.split('://')[0]}... is not understood; use `postgres` (a "
                "database in the sandbox cluster), a postgresql+asyncpg:// URL, or leave it unset for SQLite"
            )
        if self.cluster is None:
            raise StackError(
                f"{PREFECT_DB_ENV}=postgres puts Prefect's database in the sandbox PostgreSQL, which "
                "DBOPS_DATABASE_URL replaces; set it to a postgresql+asyncpg://user:password@host/db URL"
            )
        from psycopg import sql

        cluster = self.cluster
        if not cluster.sql("SELECT 1 FROM pg_database WHERE datname = %s", params=(PREFECT_DATABASE,)):
            cluster.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PREFECT_DATABASE)))
        url = (
            f"postgresql+asyncpg://{cluster.superuser}:${{PREFECT_API_DATABASE_PASSWORD}}"
            f"@{cluster.host}:{cluster.port}/{PREFECT_DATABASE}"
        )
        env = {"PREFECT_API_DATABASE_CONNECTION_URL": url, "PREFECT_API_DATABASE_PASSWORD": cluster.password}
        return f"PostgreSQL: database {PREFECT_DATABASE} in the sandbox cluster on port {cluster.port}", env

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        cwd: Path = ROOT,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start one process of the stack, its output appended to <state>/logs/<name>.log."""
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name.replace(' ', '-')}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv] if argv[0] != "prefect" else [prefect_bin(), *argv[1:]],
            cwd=cwd,
            env={**self.env, **(extra_env or {})},
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
                "restored": urlunsplit(urlsplit(staging)._replace(path=f"/{RESTORED_DATABASE}")),
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
        before = _postmaster_pid(self.state / "pg")
        cluster = persistent_cluster(self.state / "pg", settings=settings)
        if before is not None and before == _postmaster_pid(self.state / "pg"):
            self.notes.append(
                "adopted the sandbox PostgreSQL an earlier run left running "
                f"(pid {before}, port {cluster.port})"
            )
            log(self.notes[-1])
        if cluster.sql("SHOW archive_mode")[0][0] != "on":
            command = settings["archive_command"][1:-1]
            cluster.set(wal_level="replica", archive_mode="on", archive_command=command)
            cluster.restart()
        self.cluster = cluster
        for db in ("imagemanager", "imagemanager_staging"):
            if not cluster.sql("SELECT 1 FROM pg_database WHERE datname = %s", params=(db,)):
                cluster.create_database(db)
            alembic_upgrade(cluster.host, cluster.port, cluster.superuser, cluster.password, db, quiet=True)
            if cluster.sql("SELECT count(*) FROM data_instances", dbname=db)[0][0] == 0:
                log(f"generating sample data in {db} ({DEMO_IMAGES} images)")
                generate(cluster.conninfo(db), images=DEMO_IMAGES, seed=0)
        base = f"postgresql://{cluster.superuser}@{cluster.host}:{cluster.port}"
        os.environ["DBOPS_SANDBOX_PASSWORD"] = cluster.password
        return {
            "prod": f"{base}/imagemanager",
            "staging": f"{base}/imagemanager_staging",
            "scratch": f"{base}/postgres",
            "restored": f"{base}/{RESTORED_DATABASE}",
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
        if urls.get("restored"):
            databases[RESTORED_BLOCK] = DatabaseConfig(url=urls["restored"], password_env=password_env)
        variables: dict[str, object] = {"dbops_storage": storage_slug}
        if urls.get("archive"):
            variables["dbops_wal_archive"] = {"directory": urls["archive"]}
        config = SetupConfig(
            work_pool="dbops",
            databases=databases,
            storage={STORAGE_BLOCK: storage},
            variables=variables,
            # the stack's workers send a heartbeat every 30 s (Prefect's minimum): crash within 90 s
            crash_detection_seconds=detection_seconds(),
        )
        log("dbops setup")
        report = run_setup(config)
        say(report.render())
        self.storage_slug = storage_slug
        log(
            f"automation {CRASH_AUTOMATION}: a run silent for {config.crash_detection_seconds} s is marked "
            "Crashed"
        )

    def deploy(self) -> None:
        from deployments.deploy import deploy

        log("dbops deploy: check prefect.yaml, then prefect deploy --all")
        # prefect deploy's own output (its advice to start a worker, once per deployment) goes to a log:
        # the stack starts the worker itself. On failure the log's tail is shown.
        deploy_log = self.state / "logs" / "prefect-deploy.log"
        deploy_log.parent.mkdir(parents=True, exist_ok=True)
        if deploy(out=say, capture=deploy_log) != 0:
            tail = deploy_log.read_text(errors="replace").splitlines()[-30:]
            say("\n".join(tail), err=True)
            raise StackError(f"deploying prefect.yaml failed; the output is in {deploy_log}")
        import yaml

        names = [d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]]
        log(f"deployed {len(names)} deployments: {', '.join(names)}")

    # -- alerts -------------------------------------------------------------------------------------------

    def start_alert_receiver(self) -> str:
        """`make run NOTIFY=1`: a receiver on 127.0.0.1 that prints every alert here (and in stack.log),
        and Prefect's webhook block pointing at it; returns the block's slug for `dbops setup --notify`."""
        from deployments.alert_receiver import AlertReceiver, format_alert, webhook_block

        self.receiver = AlertReceiver(on_alert=lambda alert: say(format_alert(alert))).start()
        # the same block document every run (only its URL changes), so the automations stay as they are
        webhook_block(self.receiver.url).save(LOCAL_ALERTS_BLOCK, overwrite=True)
        log(f"alerts go to a local receiver on {self.receiver.url}; each one is printed here")
        return f"custom-webhook/{LOCAL_ALERTS_BLOCK}"

    def setup_alerts(self, notify: str) -> None:
        """After the deployments exist: the alerts are per deployment (deployments/alerts.py)."""
        from deployments.setup import SetupReport, ensure_notification

        log(f"dbops setup --notify {notify}")
        report = SetupReport()
        ensure_notification(notify, report)
        say(report.render())

    def start_worker(self, count: int = 1, limit: int | None = None) -> None:
        """One process worker from the repository root; with `count` > 1, every worker (the first too)
        from a directory of its own under <state>/workers/<n>/ (the repository's entries linked in) with a
        PREFECT_HOME of its own: nothing on disk is shared between them, as between separate hosts. Their
        flow runs still load the code from where `prefect deploy` ran (prefect.yaml has no pull step)."""
        if count == 1:
            log("starting a process worker on the dbops pool")
            proc = self.spawn("prefect worker", worker_argv("dbops-worker", limit))
            stackstate.write_pid(self.state, "prefect-worker", proc.pid)
            return
        log(f"starting {count} process workers on the dbops pool, each from its own directory")
        for n in range(1, count + 1):
            home = worker_home(self.state, n)
            proc = self.spawn(
                worker_unit(n).replace("-", " "),
                worker_argv(f"dbops-worker-{n}", limit),
                cwd=home,
                extra_env={"PREFECT_HOME": str(home / ".prefect")},
            )
            stackstate.write_pid(self.state, worker_unit(n), proc.pid)

    def run_first_jobs(self) -> int:
        from deployments.trigger import trigger_and_wait

        worst = 0
        # The base backup first, as on the schedule (01:00 before the 02:00 dump): with the archive it is
        # what point-in-time recovery starts from.
        for deployment in (
            "base-backup/base-backup",
            "nightly-dump/nightly-dump",
            "wal-archive-check/wal-archive-check",
        ):
            log(f"running {deployment}")
            # On a fresh sandbox nothing may be archived yet: the active probe switches WAL and waits.
            parameters = {"active": True} if deployment.startswith("wal") else None
            label = deployment.split("/")[0]

            def show(line: str, label: str = label) -> None:
                say(f"   {label} | {line.strip()}")

            code = trigger_and_wait(
                deployment,
                parameters,
                timeout=900,
                tags=("trigger:make-run",),
                out=show,
            )
            worst = max(worst, code)
        return worst

    def take_over_leftovers(self) -> None:
        """Before anything starts: one `make run` per state folder, and what an earlier one left running
        (killed with SIGKILL, or its shutdown cut short) is adopted when it still works, stopped otherwise.
        Never two Prefect servers on one SQLite state."""
        other = stackstate.live_pid(self.state, "stack")
        if other is not None and other != os.getpid():
            raise StackError(
                f"another `make run` (pid {other}) is serving {self.state}; use that one, stop it first "
                f"(Ctrl-C in its terminal, or kill {other}), or set DBOPS_STATE_DIR to another folder"
            )
        stackstate.write_pid(self.state, "stack", os.getpid())
        if os.environ.get("PREFECT_API_URL"):
            return
        server = stackstate.live_pid(self.state, "prefect-server")
        url = stackstate.recorded_api_url(self.state)
        if server is not None:
            if url and _answers(f"{url}/health"):
                self.adopted.append(("prefect server", server))
                self.notes.append(f"adopted the Prefect server an earlier run left running (pid {server})")
            else:
                stackstate.stop_pid(server)
                self.notes.append(f"stopped a Prefect server an earlier run left behind (pid {server})")
            log(self.notes[-1])
        for unit in stackstate.recorded_workers(self.state):
            worker = stackstate.live_pid(self.state, unit)
            if worker is not None:
                # A new worker is started below with this run's settings; the old one must not compete.
                stackstate.stop_pid(worker)
                self.notes.append(f"stopped a process worker an earlier run left behind (pid {worker})")
                log(self.notes[-1])

    def stop(self) -> None:
        """Stop everything this run started or adopted, in reverse order. Each step is guarded: one that
        fails (or a terminal that went away) must not leave the ones after it running."""
        if self.receiver is not None:
            try:
                self.receiver.stop()
                log("stopped the local alert receiver")
            except Exception as exc:
                say(f"make run: stopping the alert receiver failed ({exc})", err=True)
        units: list[tuple[str, subprocess.Popen[bytes] | int]] = [*self.adopted, *self.procs]
        for name, proc in reversed(units):
            try:
                if isinstance(proc, int):
                    stackstate.stop_pid(proc)
                else:
                    stackstate.stop_child(proc)
                stackstate.forget(self.state, name.replace(" ", "-"))
                log(f"stopped {name}")
            except Exception as exc:  # keep stopping the rest
                say(
                    f"make run: stopping {name} failed ({exc}); check with `ps` and stop it by hand", err=True
                )
        if self.cluster is not None:
            try:
                self.cluster.stop()
                log("stopped the sandbox PostgreSQL")
            except Exception as exc:
                say(
                    f"make run: stopping the sandbox PostgreSQL failed ({exc}); run pg_ctl stop -D "
                    f"{self.cluster.data_dir}",
                    err=True,
                )
        if stackstate.live_pid(self.state, "stack") == os.getpid():
            stackstate.forget(self.state, "stack")


def worker_argv(name: str, limit: int | None = None) -> list[str]:
    """`limit`: at most that many flow runs at once on this worker (memory per job decides it)."""
    argv = ["prefect", "worker", "start", "--pool", "dbops", "--type", "process", "--name", name]
    return argv + (["--limit", str(limit)] if limit else [])


def worker_unit(n: int) -> str:
    """The pid-file and log name of worker `n` of several (`prefect-worker-<n>`)."""
    return f"prefect-worker-{n}"


def worker_home(state: Path, n: int) -> Path:
    """Worker `n`'s own working directory: the repository's top-level entries linked in (a symlink farm),
    so it could be a checkout on another host; recreated on every start."""
    home = state / "workers" / str(n)
    home.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in ("__pycache__",):
            continue
        link = home / entry.name
        if not link.is_symlink():
            link.symlink_to(entry)
    return home


def redact_url(url: str) -> str:
    """A database URL without its password, for the log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def prefect_server_argv(port: int) -> list[str]:
    return ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]


def prefect_server_env(port: int) -> dict[str, str]:
    """What a local server needs beyond its PREFECT_HOME. The UI address: the server builds the run links
    in alert messages (`{{ flow_run|ui_url }}`) from it, and without PREFECT_API_URL in its own
    environment it has none, so every link would read "None"."""
    return {"PREFECT_UI_URL": f"http://127.0.0.1:{port}"}


def _interrupt(signum: int, frame: object) -> None:
    # Only the first signal counts; the ones after it must not interrupt the shutdown it starts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise KeyboardInterrupt


def _postmaster_pid(pg: Path) -> int | None:
    """The sandbox server's pid while it runs (first line of postmaster.pid), else None."""
    try:
        pid = int((pg / "cluster" / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if stackstate.alive(pid) else None


def port_free(port: int) -> bool:
    """Whether a server can bind 127.0.0.1:port now (a port in TIME-WAIT counts as free)."""
    import socket

    with socket.socket() as s:
        # SO_REUSEADDR as the server (uvicorn) binds: connections of the previous run in TIME-WAIT on
        # this port do not keep it from binding, only a program listening on it does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5).read()
        return True
    except OSError:
        return False


def wait_http(url: str, timeout: float, what: str, procs: list) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs:
            if proc.poll() is not None:
                raise StackError(f"{name} exited with {proc.returncode}; see .state/logs/")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise StackError(f"{what} did not answer at {url} within {timeout:.0f} s")


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


def banner(stack: Stack, url: str, code: int, latest: str) -> str:
    """What a person needs next: where the UI is, what ran, and commands for a second terminal."""
    ui = url.removesuffix("/api")
    env_lines = [f"export PREFECT_API_URL={url}"]
    if stack.state != (ROOT / ".state").resolve():
        env_lines.append(f"export DBOPS_STATE_DIR={stack.state}")
    commands = [
        f"uv run dbops backups list --storage {stack.storage_slug} --prefix {stack.prefix}",
        "uv run dbops run nightly-dump --wait",
        "uv run dbops migrate --wait",
    ]
    pad = "\n" + " " * 18
    ran = (
        f"base-backup, nightly-dump, wal-archive-check ({'all completed' if code == 0 else 'see log'})"
        if stack.first_jobs
        else "nothing yet (--no-first-jobs)"
    )
    alerts = (
        f"printed here as they arrive (local receiver {stack.receiver.url})"
        if stack.receiver is not None
        else "none wired (`make run NOTIFY=1` prints them here; README: Alerts)"
    )
    return f"""
== dbops is up
   Prefect UI     {ui}
   ran            {ran}
   latest backup  {latest}
   storage        {stack.storage_slug}, prefix {stack.prefix}
   state folder   {stack.state}   (a second `make run` reuses it; `make clean` removes it)
   leftovers      {"; ".join(stack.notes) if stack.notes else "none: everything was started by this run"}
   alerts         {alerts}
   schedules      base-backup 01:00, nightly-dump 02:00, wal-archive-check every 15 min,
                  weekly-reindex Sun 03:00, restore-drill Sun 05:00, db-health hourly (UTC);
                  migrate runs only when triggered
   second shell   `dbops` finds this server by itself; `prefect` commands need:
                  {pad.join(env_lines)}
   try            {pad.join(commands)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop after the first jobs (CI)")
    parser.add_argument(
        "--notify-local",
        action="store_true",
        help="alerts to a local receiver that prints them here (what `make run NOTIFY=1` passes)",
    )
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("DBOPS_STATE_DIR", DEFAULT_STATE)))
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("DBOPS_WORKERS", "1")),
        help="process workers on the dbops pool, each from its own directory when more than one",
    )
    parser.add_argument(
        "--worker-limit",
        type=int,
        default=int(os.environ.get("DBOPS_WORKER_LIMIT", "0")) or None,
        help="at most this many flow runs at once per worker (default: no limit)",
    )
    parser.add_argument(
        "--no-first-jobs",
        action="store_true",
        help="serve without running the first base backup, dump and WAL check (tests drive the runs)",
    )
    args = parser.parse_args(argv)
    check_environment()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A worker that polls every few seconds: the first jobs start at once instead of up to 15 s later.
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "3")
    # Flow runs send a heartbeat this often; a run whose worker died stops sending and the server marks it
    # Crashed (deployments/crash_detection.py). Prefect's default is 180 s; 30 is its minimum.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(DEFAULT_HEARTBEAT_SECONDS))
    # SIGTERM (systemd, docker stop, a CI timeout) shuts down as cleanly as Ctrl-C. SIGINT is set too: a
    # shell starts background jobs (`make run &`) with SIGINT ignored, and Ctrl-C must still stop it all.
    # SIGHUP (the terminal closed) as well, unless it is ignored on purpose (`nohup make run`).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _interrupt)
    stack = Stack(args.state)
    (stack.state / "logs").mkdir(parents=True, exist_ok=True)
    STACK_LOG[:] = [stack.state / "logs" / "stack.log"]
    code = 1
    try:
        stack.take_over_leftovers()
        # PostgreSQL first: with DBOPS_PREFECT_DB=postgres the Prefect server keeps its state in it.
        urls = stack.start_postgres()
        url = stack.start_prefect()
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):
            stack.setup(urls)
            stack.deploy()
            if args.notify_local:
                stack.setup_alerts(stack.start_alert_receiver())
            stack.start_worker(args.workers, args.worker_limit)
            stack.first_jobs = not args.no_first_jobs
            code = stack.run_first_jobs() if stack.first_jobs else 0
            latest = latest_backup_line(stack.storage_slug)
        say(banner(stack, url, code, latest))
        if not args.once:
            say("Serving; press Ctrl-C to stop.")
            while True:
                signal.pause()
    except KeyboardInterrupt:
        log("stopping (Ctrl-C or SIGTERM)")
    except DbopsError as exc:
        say(f"make run: {exc}", err=True)
        code = 1
    finally:
        # Ctrl-C in a terminal reaches make, uv and us, and uv forwards its own copy: a second SIGINT (or an
        # impatient one) must not cut the shutdown short and leave the server or the cluster running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        stack.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
