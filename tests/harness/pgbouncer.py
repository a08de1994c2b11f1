"""A real PgBouncer (Debian's `pgbouncer` package) in front of a test cluster.

Transaction pooling by default, as applications run it; a free port on 127.0.0.1; scram-sha-256 for
clients with the cluster superuser's password in a 0600 userlist (PgBouncer then logs in to PostgreSQL
with the same password); that user is also an admin of the console (database `pgbouncer`). Started as the
`postgres` OS user when we are root (PgBouncer refuses root, like PostgreSQL), ready when a connection to
the console answers, and always stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from tests.harness.pg import PgCluster, free_port, wait_until

PGBOUNCER = os.environ.get("DBOPS_PGBOUNCER", "/usr/sbin/pgbouncer")


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or (PGBOUNCER if Path(PGBOUNCER).exists() else None)
    if not found:
        raise RuntimeError("pgbouncer not found: install Debian's `pgbouncer` package (.ci/install-deps)")
    return found


@dataclass
class PgBouncer:
    """One running PgBouncer; `port` is where clients connect, `cluster` what it pools."""

    cluster: PgCluster
    base_dir: Path
    port: int
    pool_mode: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "pgbouncer.log"

    def conninfo(self, dbname: str) -> str:
        return psycopg.conninfo.make_conninfo(
            host=self.host,
            port=self.port,
            dbname=dbname,
            user=self.cluster.superuser,
            password=self.cluster.password,
            connect_timeout=10,
        )

    def connect(self, dbname: str, autocommit: bool = True, **kw: Any) -> psycopg.Connection:
        return psycopg.connect(self.conninfo(dbname), autocommit=autocommit, **kw)

    def admin(self, command: str) -> list[dict[str, object]]:
        """A console command (SHOW POOLS, RELOAD...) as rows of dicts."""
        with psycopg.connect(self.conninfo("pgbouncer"), autocommit=True) as conn:
            cur = conn.execute(command, prepare=False)
            if not cur.description:
                return []
            names = [d.name for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _server_user() -> str | None:
    return "postgres" if os.geteuid() == 0 else None


@contextmanager
def pgbouncer(
    cluster: PgCluster,
    pool_mode: str = "transaction",
    default_pool_size: int = 5,
    reserve_pool_size: int = 0,
    databases: Mapping[str, str] | None = None,
    settings: Mapping[str, str] | None = None,
) -> Iterator[PgBouncer]:
    """Start PgBouncer in front of `cluster`; `databases` maps pooled names to database names
    (default: every database, `* = host=... port=...`)."""
    binary = pgbouncer_binary()
    tmp = Path(tempfile.mkdtemp(prefix="dbops-pgbouncer-"))
    user = _server_user()
    bouncer = PgBouncer(cluster=cluster, base_dir=tmp, port=free_port(), pool_mode=pool_mode)
    target = f"host={cluster.host} port={cluster.port}"
    db_lines = [f"{name} = {target} dbname={dbname}" for name, dbname in (databases or {}).items()]
    if databases is None:
        db_lines = [f"* = {target}"]
    conf = {
        "listen_addr": bouncer.host,
        "listen_port": str(bouncer.port),
        "unix_socket_dir": "",
        "auth_type": "scram-sha-256",
        "auth_file": str(tmp / "userlist.txt"),
        "admin_users": cluster.superuser,
        "pool_mode": pool_mode,
        "default_pool_size": str(default_pool_size),
        "reserve_pool_size": str(reserve_pool_size),
        "max_client_conn": "100",
        "logfile": str(bouncer.log_file),
        "pidfile": str(tmp / "pgbouncer.pid"),
        "ignore_startup_parameters": "extra_float_digits",
        **dict(settings or {}),
    }
    ini = tmp / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        + "\n".join(db_lines)
        + "\n\n[pgbouncer]\n"
        + "".join(f"{k} = {v}\n" for k, v in conf.items())
    )
    userlist = tmp / "userlist.txt"
    fd = os.open(userlist, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'"{cluster.superuser}" "{cluster.password}"\n')
    if user:
        os.chmod(tmp, 0o755)
        for path in (tmp, ini, userlist):
            shutil.chown(path, user)
    cmd = (["runuser", "-u", user, "--"] if user else []) + [binary, str(ini)]
    bouncer.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def ready() -> bool:
        if bouncer.process is not None and bouncer.process.poll() is not None:
            err = bouncer.process.stderr.read().decode(errors="replace") if bouncer.process.stderr else ""
            raise RuntimeError(
                f"pgbouncer exited with {bouncer.process.returncode}: {err}{bouncer.log_tail()}"
            )
        try:
            bouncer.admin("SHOW VERSION")
            return True
        except psycopg.OperationalError:
            return False

    try:
        wait_until(ready, timeout=30, interval=0.05, what="pgbouncer to accept connections")
        yield bouncer
    finally:
        proc = bouncer.process
        if proc is not None and proc.poll() is None:
            # runuser forwards SIGTERM to pgbouncer; SIGINT is PgBouncer's "safe shutdown", SIGTERM immediate
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(tmp, ignore_errors=True)
